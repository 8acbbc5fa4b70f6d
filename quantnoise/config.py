"""Typed configuration for Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for
Extreme Model Compression").  One dataclass, usable directly in Python and as a Hydra structured
config; every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` naming the
field, the value and what is allowed."""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from typing import Optional

SCHEMES = ("drop", "scalar", "pq")
GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "ema")
CLIPS = ("minmax", "mse")  # scalar weight range: min/max | MSE-optimal clip (functional.mse_clip)
ACT_GRANULARITIES = ("tensor", "token", "channel")
# llama.cpp's weight grids (quantnoise.grids): integer bits of each; blocks of 32 input weights, one fp16 scale each
GRID_BITS = {"q4_0": 4, "q8_0": 8}
# The largest pq block: a stored code (one byte) decodes to MAX_BLOCK_SIZE weights, so a .qnz decodes to at most
# ~4 * MAX_BLOCK_SIZE times its size in fp32 (iPQ uses 4-9; a larger block is a crafted file: a 0.5 MB file with
# 4096-wide blocks decodes to 16 GiB)
MAX_BLOCK_SIZE = 64


def is_int(v) -> bool:
    """An integer of any integral type, but not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number (int, float, numpy scalar) that is not a bool and not NaN."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v


def regex_error(pattern) -> Optional[str]:
    """Why ``pattern`` (None or a regex string) is not usable as a layer-name pattern; None if it is."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        return f"use a regular expression as a string, not a {type(pattern).__name__}"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"not a regular expression ({e})"
    return None


def grid_error(grid, scheme: str, bits, clip: str, rows_per_scale) -> Optional[str]:
    """Why ``grid`` cannot go with these scalar settings (QuantNoiseConfig's and LayerRule's); None if it can.
    ``bits`` may be left at its default 8 (it then becomes the grid's)."""
    if not isinstance(grid, str) or grid not in GRID_BITS:
        return f"choose one of {', '.join(GRID_BITS)}, or None for quantnoise's own scalar grid"
    if scheme != "scalar":
        return f"a grid is a scalar scheme: use scheme=scalar, not {scheme!r}"
    if bits not in (8, GRID_BITS[grid]):
        return f"{grid} is {GRID_BITS[grid]}-bit but bits={bits!r}: use bits={GRID_BITS[grid]} (or leave it out)"
    if clip != "minmax" or rows_per_scale != 1:
        return f"{grid} sets its own scale per block of 32 weights: use clip=minmax, rows_per_scale=1"
    return None


@dataclass
class QuantNoiseConfig:
    scheme: str = field(default="drop", metadata={"help": "noise scheme: drop | scalar | pq"})
    p: float = field(default=0.1, metadata={"help": "probability that a weight block is noised on a training forward"})
    block_size: int = field(default=8, metadata={"help": "contiguous weights per block along a row of weight.view(out, -1)"})
    # scalar
    bits: int = field(default=8, metadata={"help": "scalar: integer bits, 2..8"})
    symmetric: bool = field(default=True, metadata={"help": "scalar: symmetric (zero point 0) or asymmetric (affine) grid"})
    granularity: str = field(default="channel", metadata={"help": "scalar: one scale per tensor | channel (output row) | group"})
    group_size: int = field(default=64, metadata={"help": "scalar, granularity=group: weights per scale along a row"})
    rows_per_scale: int = field(default=1, metadata={"help": "scalar, granularity=channel: consecutive output rows sharing "
                                                              "one scale (Q-BERT's group-wise scales: head_dim on q/k/v = one per head)"})
    observer: str = field(default="minmax", metadata={"help": "scalar: range from current min/max | ema of min/max"})
    ema_momentum: float = field(default=0.01, metadata={"help": "scalar, observer=ema: weight of the newest min/max"})
    clip: str = field(default="minmax", metadata={"help": "scalar: symmetric range = max|w| per scale group (minmax) | mse: "
                                                           "r * max|w|, r of 20 in [0.3, 1] minimising the group's squared "
                                                           "error, searched on every forward (for int2-4; needs symmetric, "
                                                           "observer=minmax)"})
    grid: Optional[str] = field(default=None, metadata={"help": "scalar: None | q4_0 | q8_0: llama.cpp's grid instead (blocks "
                                                               "of 32 inputs, one fp16 scale each; bits, ranges and "
                                                               "granularity are the grid's), what save_gguf writes"})
    # pq
    n_centroids: int = field(default=256, metadata={"help": "pq: codebook size per layer (capped at the layer's block count)"})
    kmeans_iters: int = field(default=20, metadata={"help": "pq: k-means iterations per codebook refresh"})
    refresh_every: int = field(default=1000, metadata={"help": "pq: rebuild the codebook every N training forwards"})
    # which layers
    include: Optional[str] = field(default=None, metadata={"help": "regex searched in module names; None = every supported layer"})
    exclude: Optional[str] = field(default=None, metadata={"help": "regex searched in module names; matching layers are left alone"})
    # behaviour
    seed: int = field(default=0, metadata={"help": "seed of the block masks and k-means; same seed, same masks"})
    eval_quantized: bool = field(default=False, metadata={"help": "in eval mode quantize every block (scalar/pq) instead of none"})
    # activations (Q8BERT, Zafrir et al. 2019): inputs of every wrapped Linear, always fake-quantized
    act_bits: Optional[int] = field(default=None, metadata={"help": "Linear input activations: integer bits 2..16; None = not quantized"})
    act_ema_momentum: float = field(default=0.01, metadata={"help": "activations: weight of the newest batch in the EMA of their range (training only)"})
    act_symmetric: bool = field(default=True, metadata={"help": "activations: symmetric grid on the EMA of max|x| (Q8BERT) | affine on EMA min/max"})
    act_granularity: str = field(default="tensor", metadata={"help": "activations: one scale per tensor, EMA (Q8BERT) | token: per row, "
                                                                     "from the row itself on every forward | channel: per input feature, EMA"})

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"quant-noise {name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
            raise bad("scheme", f"choose one of {', '.join(SCHEMES)}")
        if not is_real(self.p) or not 0.0 <= float(self.p) <= 1.0:
            raise bad("p", "use a probability in [0, 1]")
        if self.scheme == "drop" and self.p >= 1.0:
            raise bad("p", "scheme 'drop' needs p in [0, 1) (p=1 would zero every weight); use scalar or pq for p=1")
        if not is_int(self.block_size) or self.block_size < 1:
            raise bad("block_size", "use a positive integer that divides each layer's row length")
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise bad("bits", "use an integer from 2 to 8")
        if not isinstance(self.symmetric, bool):
            raise bad("symmetric", "use true or false")
        if not isinstance(self.granularity, str) or self.granularity not in GRANULARITIES:
            raise bad("granularity", f"choose one of {', '.join(GRANULARITIES)}")
        if not is_int(self.group_size) or self.group_size < 1:
            raise bad("group_size", "use a positive integer")
        if not is_int(self.rows_per_scale) or self.rows_per_scale < 1:
            raise bad("rows_per_scale", "use a positive integer that divides each layer's output rows (1 = per row)")
        if self.rows_per_scale > 1 and (self.scheme != "scalar" or self.granularity != "channel"):
            raise bad("rows_per_scale", "groups of rows share a scale only with scheme=scalar, granularity=channel")
        if not isinstance(self.observer, str) or self.observer not in OBSERVERS:
            raise bad("observer", f"choose one of {', '.join(OBSERVERS)}")
        if not isinstance(self.clip, str) or self.clip not in CLIPS:
            raise bad("clip", f"choose one of {', '.join(CLIPS)}")
        if self.clip == "mse" and (not self.symmetric or self.observer != "minmax"):
            raise bad("clip", "mse searches a symmetric range on the current weights: use symmetric=true, observer=minmax")
        if not is_real(self.ema_momentum) or not 0.0 < float(self.ema_momentum) <= 1.0:
            raise bad("ema_momentum", "use a number in (0, 1]")
        if not is_int(self.n_centroids) or self.n_centroids < 2:
            raise bad("n_centroids", "use an integer >= 2 (256 fits codes in one byte)")
        if not is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise bad("kmeans_iters", "use a positive integer")
        if not is_int(self.refresh_every) or self.refresh_every < 1:
            raise bad("refresh_every", "use a positive integer")
        for name in ("include", "exclude"):
            error = regex_error(getattr(self, name))
            if error:
                raise bad(name, error)
        if not is_int(self.seed):
            raise bad("seed", "use an integer")
        if not isinstance(self.eval_quantized, bool):
            raise bad("eval_quantized", "use true or false")
        if self.eval_quantized and self.scheme == "drop":
            raise bad("eval_quantized", "needs scheme scalar or pq (drop has no quantized weights to evaluate)")
        if self.act_bits is not None and (not is_int(self.act_bits) or not 2 <= self.act_bits <= 16):
            raise bad("act_bits", "use an integer from 2 to 16 (8 for Q8BERT), or None to leave activations in float")
        if not is_real(self.act_ema_momentum) or not 0.0 < float(self.act_ema_momentum) <= 1.0:
            raise bad("act_ema_momentum", "use a number in (0, 1]")
        if not isinstance(self.act_symmetric, bool):
            raise bad("act_symmetric", "use true or false")
        if not isinstance(self.act_granularity, str) or self.act_granularity not in ACT_GRANULARITIES:
            raise bad("act_granularity", f"choose one of {', '.join(ACT_GRANULARITIES)} (tensor for Q8BERT)")
        if self.grid is not None:
            error = grid_error(self.grid, self.scheme, self.bits, self.clip, self.rows_per_scale)
            if error is None and (self.observer != "minmax" or not self.symmetric):
                error = "llama.cpp's grids take each block's range from its weights: use observer=minmax, symmetric=true"
            if error is None and (self.granularity == "tensor" or self.granularity == "group" and self.group_size != 32):
                error = "a grid has one scale per 32 inputs: leave granularity at channel (or group with group_size=32)"
            if error:
                raise bad("grid", error)
            self.bits = GRID_BITS[self.grid]
        self.p, self.ema_momentum = float(self.p), float(self.ema_momentum)
        self.act_ema_momentum = float(self.act_ema_momentum)
        for name in ("block_size", "bits", "group_size", "rows_per_scale", "n_centroids", "kmeans_iters", "refresh_every", "seed"):
            setattr(self, name, int(getattr(self, name)))  # e.g. a numpy integer from a sweep script
        if self.act_bits is not None:
            self.act_bits = int(self.act_bits)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1
