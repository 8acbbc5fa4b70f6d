"""Typed configuration for Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for
Extreme Model Compression").  One dataclass, usable directly in Python and as a Hydra structured
config; every field is checked in ``__post_init__`` and a bad value raises ``ValueError`` naming the
field, the value and what is allowed."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

SCHEMES = ("drop", "scalar", "pq")
GRANULARITIES = ("tensor", "channel", "group")
OBSERVERS = ("minmax", "ema")


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
    observer: str = field(default="minmax", metadata={"help": "scalar: range from current min/max | ema of min/max"})
    ema_momentum: float = field(default=0.01, metadata={"help": "scalar, observer=ema: weight of the newest min/max"})
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

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"quant-noise {name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.scheme not in SCHEMES:
            raise bad("scheme", f"choose one of {', '.join(SCHEMES)}")
        if not isinstance(self.p, (int, float)) or not 0.0 <= float(self.p) <= 1.0:
            raise bad("p", "use a probability in [0, 1]")
        if self.scheme == "drop" and self.p >= 1.0:
            raise bad("p", "scheme 'drop' needs p in [0, 1) (p=1 would zero every weight); use scalar or pq for p=1")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad("block_size", "use a positive integer that divides each layer's row length")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise bad("bits", "use an integer from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"choose one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise bad("group_size", "use a positive integer")
        if self.observer not in OBSERVERS:
            raise bad("observer", f"choose one of {', '.join(OBSERVERS)}")
        if not 0.0 < self.ema_momentum <= 1.0:
            raise bad("ema_momentum", "use a value in (0, 1]")
        if not isinstance(self.n_centroids, int) or self.n_centroids < 2:
            raise bad("n_centroids", "use an integer >= 2 (256 fits codes in one byte)")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise bad("kmeans_iters", "use a positive integer")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise bad("refresh_every", "use a positive integer")
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise bad(name, f"not a regular expression ({e})") from None
        if self.eval_quantized and self.scheme == "drop":
            raise bad("eval_quantized", "needs scheme scalar or pq (drop has no quantized weights to evaluate)")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int)
                                          or not 2 <= self.act_bits <= 16):
            raise bad("act_bits", "use an integer from 2 to 16 (8 for Q8BERT), or None to leave activations in float")
        if not isinstance(self.act_ema_momentum, (int, float)) or not 0.0 < self.act_ema_momentum <= 1.0:
            raise bad("act_ema_momentum", "use a value in (0, 1]")
        self.p = float(self.p)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def act_qmin(self) -> int:
        return -(2 ** (self.act_bits - 1) - 1) if self.act_symmetric else 0

    @property
    def act_qmax(self) -> int:
        return 2 ** (self.act_bits - 1) - 1 if self.act_symmetric else 2**self.act_bits - 1
