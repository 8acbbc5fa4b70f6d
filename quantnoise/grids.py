"""llama.cpp's Q4_0 and Q8_0 weight grids as short, pure tensor functions (no modules, no gguf import).

Both cut each row of a weight ``w (out, in)`` into blocks of ``BLOCK = 32`` consecutive input weights
and give every block one scale ``d``, stored in fp16 (ggml's ``block_q4_0`` / ``block_q8_0``):

- Q4_0: ``m`` = the block's entry of largest |w| *with its sign* (the first one on a tie), ``d = m / -8``,
  ``q = trunc(w / d + 8.5)`` clamped to [0, 15] (so ``m`` itself maps to 0, i.e. -8), decoded as
  ``fp16(d) * (q - 8)``.
- Q8_0: ``d = max|w| / 127``, ``q = round_half_away(w / d)`` in [-127, 127], decoded as ``fp16(d) * q``.

Note the two precisions: the integers are computed with the fp32 ``d`` (``w * (1 / d)``, in fp32), but the
decoded value uses ``d`` rounded to fp16.  Everything here follows gguf-py's ``quants.py`` (llama.cpp's
reference ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``) operation by operation, in fp32, so the
results are bit-identical to it (tests/test_grids.py compares them): the weight a Quant-Noise layer trains
against is the weight llama.cpp reads back.  Device and dtype follow the input; the results are fp32.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from . import functional as QF
from .config import GRID_BITS  # grid name -> integer bits

BLOCK = 32  # weights per scale, along the input dimension (ggml's QK4_0 = QK8_0 = 32)
BLOCK_BYTES: Dict[str, int] = {"q4_0": 2 + BLOCK // 2, "q8_0": 2 + BLOCK}  # fp16 scale + the packed integers


def check_grid(grid: str) -> None:
    """ValueError unless ``grid`` is a known grid name."""
    if grid not in GRID_BITS:
        raise ValueError(f"grid={grid!r} is unknown: choose one of {', '.join(GRID_BITS)}")


def grid_blocks(w: Tensor, grid: str, name: str = "weight") -> Tensor:
    """``w`` (out, in) as fp32 blocks (out, in / 32, 32); a one-line ValueError for any other shape."""
    check_grid(grid)
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{name} of shape {tuple(w.shape)} is not on the {grid} grid: it needs a 2-d (out, in) weight "
                         f"with in a multiple of {BLOCK}; exclude the layer or pad its input to a multiple of {BLOCK}")
    return w.detach().to(torch.float32).reshape(w.shape[0], -1, BLOCK)


def _inverse(d: Tensor) -> Tensor:
    """1 / d, and 0 where d == 0 (an all-zero block: every integer becomes the zero code)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)  # a true fp32 division


# ------------------------------------------------------------------------------------------- q4_0
def q4_0_quantize(w: Tensor, name: str = "weight") -> Tuple[Tensor, Tensor]:
    """(d fp16 (out, in / 32), q uint8 (out, in) in [0, 15]): Q4_0's scales and 4-bit codes of ``w``."""
    x = grid_blocks(w, "q4_0", name)  # (out, nb, 32) fp32
    m = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (out, nb, 1): the signed entry of largest |w|
    d = m / torch.full_like(m, -8.0)
    q = (x * _inverse(d)).add_(8.5).trunc_().clamp_(0, 15)  # trunc(w / d + 8.5), m -> 0
    return d.squeeze(-1).to(torch.float16), q.to(torch.uint8).reshape(w.shape[0], -1)


def q4_0_dequantize(d: Tensor, q: Tensor) -> Tensor:
    """fp16(d) * (q - 8), fp32 (out, in), from ``q4_0_quantize``'s (d, q)."""
    x = q.reshape(q.shape[0], -1, BLOCK).to(torch.float32).sub_(8.0)  # (out, nb, 32)
    return (d.to(torch.float32).unsqueeze(-1) * x).reshape(q.shape)


def q4_0_fake(w: Tensor) -> Tensor:
    """``w`` (out, in) on llama.cpp's Q4_0 grid (quantize, then dequantize), fp32."""
    return q4_0_dequantize(*q4_0_quantize(w))


def q4_0_pack(d: Tensor, q: Tensor) -> Tensor:
    """ggml's ``block_q4_0`` bytes, uint8 (out, in / 32 * 18): per block the fp16 scale (little-endian), then
    16 bytes whose low nibble is code j and high nibble code j + 16."""
    qb = q.reshape(q.shape[0], -1, 2, BLOCK // 2)  # (out, nb, 2, 16)
    packed = qb[:, :, 0] | (qb[:, :, 1] << 4)  # (out, nb, 16)
    scale = d.contiguous().view(torch.uint8).reshape(d.shape[0], -1, 2)  # (out, nb, 2)
    return torch.cat([scale, packed], -1).reshape(q.shape[0], -1)


# ------------------------------------------------------------------------------------------- q8_0
def _round_half_away(v: Tensor) -> Tensor:
    """round(v), halves away from zero, exactly as gguf-py's ``np_roundf`` (``floor(|v| + 0.5)`` would round
    0.49999997 up in fp32)."""
    a = v.abs()
    f = a.floor()
    return v.sign() * (f + (2.0 * (a - f)).floor_())


def q8_0_quantize(w: Tensor, name: str = "weight") -> Tuple[Tensor, Tensor]:
    """(d fp16 (out, in / 32), q int8 (out, in) in [-127, 127]): Q8_0's scales and codes of ``w``."""
    x = grid_blocks(w, "q8_0", name)  # (out, nb, 32) fp32
    amax = x.abs().amax(-1, keepdim=True)  # (out, nb, 1)
    d = amax / torch.full_like(amax, 127.0)  # a true division, as numpy's (not a multiply by 1/127)
    q = _round_half_away(x * _inverse(d))
    return d.squeeze(-1).to(torch.float16), q.to(torch.int8).reshape(w.shape[0], -1)


def q8_0_dequantize(d: Tensor, q: Tensor) -> Tensor:
    """fp16(d) * q, fp32 (out, in), from ``q8_0_quantize``'s (d, q)."""
    x = q.reshape(q.shape[0], -1, BLOCK).to(torch.float32)
    return (x * d.to(torch.float32).unsqueeze(-1)).reshape(q.shape)


def q8_0_fake(w: Tensor) -> Tensor:
    """``w`` (out, in) on llama.cpp's Q8_0 grid (quantize, then dequantize), fp32."""
    return q8_0_dequantize(*q8_0_quantize(w))


def q8_0_pack(d: Tensor, q: Tensor) -> Tensor:
    """ggml's ``block_q8_0`` bytes, uint8 (out, in / 32 * 34): per block the fp16 scale, then 32 int8 codes."""
    scale = d.contiguous().view(torch.uint8).reshape(d.shape[0], -1, 2)
    codes = q.contiguous().view(torch.uint8).reshape(q.shape[0], -1, BLOCK)
    return torch.cat([scale, codes], -1).reshape(q.shape[0], -1)


# ----------------------------------------------------------------------------------------- by name
QUANTIZE = {"q4_0": q4_0_quantize, "q8_0": q8_0_quantize}
DEQUANTIZE = {"q4_0": q4_0_dequantize, "q8_0": q8_0_dequantize}
PACK = {"q4_0": q4_0_pack, "q8_0": q8_0_pack}


def grid_fake(w: Tensor, grid: str) -> Tensor:
    """``w`` (out, ...) on ``grid``, in fp32, rows flattened to (out, -1) and back to w's shape."""
    check_grid(grid)
    rows = w.reshape(w.shape[0], -1)
    return DEQUANTIZE[grid](*QUANTIZE[grid](rows)).reshape(w.shape)


def grid_noise(w: Tensor, mask: Tensor, grid: str, block_size: int) -> Tensor:
    """Quant-Noise on the grid: w (out, ...) with the noise blocks ``mask`` (out, row / block_size) selects
    replaced by their values on ``grid`` (each 32-block's scale still comes from the whole 32-block, as in
    llama.cpp), in w's dtype (``functional.replace_blocks``).  With every block selected: ``grid_fake(w)``."""
    on_grid = QF.blocks(grid_fake(w, grid), block_size).reshape(-1, block_size)  # (out * nb, bs) fp32
    return QF.replace_blocks(w, mask, block_size, lambda flat, idx: on_grid[idx])


def grid_pack(w: Tensor, grid: str, name: str = "weight") -> Tensor:
    """The GGUF bytes of ``w`` (out, in) on ``grid``: uint8 (out, in / 32 * BLOCK_BYTES[grid])."""
    check_grid(grid)
    return PACK[grid](*QUANTIZE[grid](w, name))


def grid_codes(w: Tensor, grid: str, name: str = "weight") -> Tuple[Tensor, Tensor]:
    """``w`` (out, in) on ``grid`` as a scalar layer's (q int8 (out, in), scale fp32 (out * in / 32, 1)):
    one scale per block of 32 (``compress.layers.scalar_decode`` then gives ``grid_fake(w)`` exactly).  Q4_0's
    codes are stored as q - 8 in [-8, 7] with its fp16 scale (negative when the block's largest |w| is
    positive); ``grid_from_codes`` gives the (d, q) back."""
    d, q = QUANTIZE[grid](w, name)
    q = q.to(torch.int8) - 8 if grid == "q4_0" else q
    return q, d.to(torch.float32).reshape(-1, 1)


def grid_from_codes(q: Tensor, scale: Tensor, grid: str) -> Tuple[Tensor, Tensor]:
    """(d fp16 (out, in / 32), q as ``QUANTIZE[grid]`` returns it) from ``grid_codes``' (q, scale); a one-line
    ValueError when they are not on the grid (codes out of range, a scale that is not an fp16 value)."""
    check_grid(grid)
    out = q.shape[0]
    lo, hi = (-8, 7) if grid == "q4_0" else (-128, 127)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes in [{int(q.min())}, {int(q.max())}] are not {grid} codes (in [{lo}, {hi}])")
    if scale.numel() * BLOCK != q.numel():
        raise ValueError(f"{scale.numel()} scales for a {tuple(q.shape)} weight: {grid} has one per {BLOCK} weights")
    d = scale.reshape(out, -1).to(torch.float16)
    if not torch.equal(d.to(scale.dtype), scale.reshape(out, -1)):
        raise ValueError(f"the scales are not fp16 values, so they are not {grid} scales")
    return d, ((q.to(torch.int16) + 8).to(torch.uint8) if grid == "q4_0" else q.to(torch.int8))
