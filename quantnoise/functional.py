"""The Quant-Noise algorithms as short, pure tensor functions (no modules, no fairseq).

Fan et al. 2020, eq. (3)-(4): on each training forward a random subset J of weight blocks b_kl is
replaced by its quantized value, phi(b_kl) for (k, l) in J, the rest stays exact; gradients pass to
every weight with the straight-through estimator.  A *block* is ``block_size`` contiguous entries of
one row of ``weight.reshape(out, -1)`` (see quantnoise.nn for what that is per layer type).

Scalar fake quantization follows Jacob et al. 2018: q = clamp(round(w / s) + z, qmin, qmax),
w_hat = (q - z) * s, with z = 0 for the symmetric grid (Q8BERT's choice).

Half precision (fp16 / bf16 weights): scales, zero points, quantized values and distances are
computed in fp32 and the result is cast back with ``saturate``, so an all-zero row gets a positive
scale (fp32's smallest normal is 0 in fp16), ``w / s`` never overflows, and a value just above
fp16's largest (65504) after rounding to the grid or a 1/(1-p) rescale becomes 65504, not inf.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise is computed in: fp32 for fp16 / bf16 weights, the weight's own otherwise."""
    return torch.promote_types(dtype, torch.float32)


def saturate(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` with finite values beyond ``dtype``'s range clamped to its largest finite
    value (a plain cast gives inf: 65520 -> inf in fp16).  NaN stays NaN."""
    if x.dtype == dtype:
        return x
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def blocks(w: Tensor, block_size: int) -> Tensor:
    """View ``w`` (out, ...) as (out, n_blocks, block_size); ``block_size`` must divide the row."""
    return w.reshape(w.shape[0], -1, block_size)


def block_mask(n_rows: int, n_blocks: int, p: float, generator: torch.Generator, device,
               out: Optional[Tensor] = None) -> Tensor:
    """Bernoulli(p) block selection, (n_rows, n_blocks) bool; True = this block gets noise.
    ``out``: a reusable bool buffer of that shape (saves an allocation on every forward)."""
    if out is None or out.shape != (n_rows, n_blocks) or out.device != torch.device(device):
        out = torch.empty(n_rows, n_blocks, dtype=torch.bool, device=device)
    if p >= 1.0:
        return out.fill_(True)
    return out.bernoulli_(p, generator=generator)


def _int64(v: int) -> int:
    """The signed int64 with the same 64 bits as ``v``."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA, _M1, _M2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _splitmix64_(x: Tensor) -> Tensor:
    """SplitMix64's finalizer, in place on an int64 tensor (wrapping products, logical shifts)."""
    x.bitwise_xor_(x.bitwise_right_shift(30).bitwise_and_((1 << 34) - 1)).mul_(_M1)
    x.bitwise_xor_(x.bitwise_right_shift(27).bitwise_and_((1 << 37) - 1)).mul_(_M2)
    return x.bitwise_xor_(x.bitwise_right_shift(31).bitwise_and_((1 << 33) - 1))


def hashed_block_mask(seed: int, rows: Tensor, n_blocks: int, p: float) -> Tensor:
    """Bernoulli(p) block selection for the given ``rows`` of a table, (len(rows), n_blocks) bool,
    as a counter-based hash of (seed, row, block): block ``i = row * n_blocks + block`` is selected
    when SplitMix64(seed + i * gamma), read as a signed int64, is below the p-quantile.  A row's mask
    does not depend on which other rows are drawn with it (embedding rows looked up by different
    batches or ranks agree); the cost is ~12 integer ops per drawn block, nothing for other rows."""
    if p >= 1.0:
        return torch.ones(rows.shape[0], n_blocks, dtype=torch.bool, device=rows.device)
    per_block = torch.arange(n_blocks, device=rows.device, dtype=torch.int64).mul_(_GAMMA).add_(_int64(seed))
    state = (rows.to(torch.int64) * _int64(n_blocks * _GAMMA)).unsqueeze(1) + per_block  # (n, nb)
    return _splitmix64_(state) < _int64((1 << 63) + round(p * 2.0**64))  # P(uniform int64 < t) = p


def replace_blocks(w: Tensor, mask: Tensor, block_size: int, values: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A copy of w whose selected blocks are ``values(flat_blocks (N, bs), selected_index (n,))``,
    shaped (n, bs), in any float dtype (cast back to w's with ``saturate``).  Only the selected blocks
    are computed on: cost ~ one copy of w + p of the work."""
    flat = blocks(w, block_size).reshape(-1, block_size)  # (out * nb, bs)
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (n_sel,)
    out = flat.clone()
    out.index_copy_(0, idx, saturate(values(flat, idx), w.dtype))
    return out.view_as(w)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``noisy`` exactly; backward hands the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, noisy: Tensor) -> Tensor:
        return noisy

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


def straight_through(w: Tensor, noisy: Tensor) -> Tensor:
    """STE, w + (noisy - w).detach() in value, but bit-exact: the forward value *is* ``noisy``."""
    return _StraightThrough.apply(w, noisy.detach())


# ----------------------------------------------------------------------------------------- drop
def drop_factors(n_rows: int, n_blocks: int, p: float, generator: torch.Generator, device, dtype,
                 out: Optional[Tensor] = None) -> Tensor:
    """Per-block factors of drop noise, (n_rows, n_blocks): 0 with probability p (the block is
    dropped), else 1/(1-p).  ``out``: a reusable buffer of that shape and dtype.  The wrappers draw
    them in fp32 whatever the weight's dtype: the same masks in every dtype, an exact 1/(1-p)."""
    if out is None or out.shape != (n_rows, n_blocks) or out.dtype != dtype or out.device != torch.device(device):
        out = torch.empty(n_rows, n_blocks, dtype=dtype, device=device)
    return out.bernoulli_(1.0 - p, generator=generator).mul_(1.0 / (1.0 - p))


def drop_blocks(w: Tensor, factors: Tensor, block_size: int) -> Tensor:
    """Selected blocks zeroed, the rest scaled by 1/(1-p) (fairseq's iPQ proxy): one multiply by
    the per-block ``factors`` of ``drop_factors`` (4x faster on CPU than a broadcast masked_fill). New tensor
    of w's dtype: with fp32 factors and fp16 / bf16 w, multiplied in fp32 and saturated (65504 / (1-p) -> 65504)."""
    out = blocks(w, block_size) * factors.unsqueeze(-1)  # (out, nb, bs) * (out, nb, 1)
    return saturate(out, w.dtype).view_as(w)


# --------------------------------------------------------------------------------------- scalar
def group_view(w: Tensor, granularity: str, group_size: int) -> Tensor:
    """(rows, groups, n) view of w whose last dim shares one scale."""
    rows = w.reshape(w.shape[0], -1)
    if granularity == "tensor":
        return rows.reshape(1, 1, -1)
    if granularity == "channel":
        return rows.unsqueeze(1)
    return rows.reshape(rows.shape[0], -1, group_size)


def minmax(w: Tensor, granularity: str, group_size: int) -> Tuple[Tensor, Tensor]:
    """Range of w per scale group, each shaped (rows|1, groups|1, 1)."""
    lo, hi = torch.aminmax(group_view(w, granularity, group_size), dim=-1, keepdim=True)
    return lo, hi


def row_group_minmax(w: Tensor, rows_per_scale: int) -> Tuple[Tensor, Tensor]:
    """Range of each group of ``rows_per_scale`` consecutive rows of w (out, ...), repeated for every row of
    the group: (out, 1, 1) each, like ``minmax``'s channel output (Q-BERT's group-wise quantization)."""
    g = w.reshape(w.shape[0] // rows_per_scale, -1)  # (G, rows_per_scale * row)
    lo, hi = torch.aminmax(g, dim=1, keepdim=True)  # (G, 1)
    return (lo.repeat_interleave(rows_per_scale, 0).unsqueeze(-1), hi.repeat_interleave(rows_per_scale, 0).unsqueeze(-1))


# Clip ratios searched by ``mse_clip``: 20 evenly spaced in [0.3, 1.0] (1.0 = min-max, the unclipped range)
CLIP_RATIOS = tuple(round(0.3 + 0.7 * i / 19, 6) for i in range(20))


def mse_clip(g: Tensor, bits: int, ratios=CLIP_RATIOS, chunk: int = 1 << 22) -> Tensor:
    """MSE-clipped symmetric range of each scale group: g (..., n), one group per last-dim vector; returns
    a (..., 1), fp32, the a = r * max|g| (r in ``ratios``) whose grid (scale a / qmax, ``scalar_qparams``)
    minimises sum (Q(g) - g)^2 over the group (ties: the largest r).  Pure and deterministic: the same
    g gives the same a, so post-hoc quantization, fake quantization and export agree bit for bit.  Low
    widths need it: min-max int2 is ternary {-s, 0, s} with s = max|g|, rounding nearly every weight to 0."""
    qmax = 2 ** (bits - 1) - 1
    x = g.detach().to(compute_dtype(g.dtype)).reshape(-1, g.shape[-1])  # (G, n)
    amax = x.abs().amax(-1, keepdim=True)  # (G, 1)
    out = torch.empty_like(amax)
    step = max(1, chunk // max(1, x.shape[1]))
    for i in range(0, x.shape[0], step):  # row chunks bound the temporary to ~chunk values
        xs, am = x[i:i + step], amax[i:i + step]
        best_err = best = None
        for r in sorted(ratios, reverse=True):  # strict < keeps the larger ratio on a tie
            a = am * r
            s = a.div(qmax).clamp_min(torch.finfo(torch.float32).tiny)  # as scalar_qparams
            err = xs.div(s).round_().clamp_(-qmax, qmax).mul_(s).sub_(xs).square_().sum(-1, keepdim=True)
            if best is None:
                best_err, best = err, a
            else:
                take = err < best_err
                best_err, best = torch.where(take, err, best_err), torch.where(take, a, best)
        out[i:i + step] = best
    return out.reshape(*g.shape[:-1], 1)


def scalar_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and zero point covering [lo, hi] (and 0, so zero is exact), Jacob et al. 2018 eq. (1).
    Computed and returned in fp32 (or fp64 for fp64 input): in fp16 the smallest-scale clamp would
    be 0 and an all-zero group would give 0 / 0 = NaN."""
    lo, hi = lo.to(compute_dtype(lo.dtype)), hi.to(compute_dtype(hi.dtype))
    eps = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(lo.abs(), hi.abs()).div(qmax).clamp_min(eps)
        return scale, torch.zeros_like(scale)
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo).div(qmax).clamp_min(eps)
    zero = torch.round(-lo / scale).clamp_(0, qmax)
    return scale, zero


def fake_quantize_values(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s, elementwise with broadcasting; in fp32 for
    fp16 / bf16 x (the result too: cast it back with ``saturate``)."""
    q = x.to(compute_dtype(x.dtype)).div(scale).round_().add_(zero).clamp_(qmin, qmax)
    return q.sub_(zero).mul_(scale)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int,
                  granularity: str, group_size: int) -> Tensor:
    """Dequantized int grid values of the whole w (in w's dtype); scale/zero shaped like ``minmax``'s output."""
    g = group_view(w, granularity, group_size)
    return saturate(fake_quantize_values(g, scale, zero, qmin, qmax), w.dtype).view_as(w)


def activation_range(x: Tensor, symmetric: bool, granularity: str = "tensor") -> Tuple[Tensor, Tensor]:
    """Range (lo, hi) of an activation x (..., in) per scale: 0-d for ``tensor`` (Q8BERT), (..., 1) for
    ``token`` (each row of x: one scale per token, LLM.int8-style), (in,) for ``channel`` (each input
    feature over all rows); broadcastable to x.  (-max|x|, max|x|) for the symmetric grid, (min, max)
    for the affine one."""
    x = x.detach()
    if granularity == "tensor":
        lo, hi = torch.aminmax(x)
    elif granularity == "token":
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    else:
        lo, hi = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=0)
    if symmetric:
        a = torch.maximum(-lo, hi)
        return -a, a
    return lo, hi


def fake_quantize_activation(x: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> Tensor:
    """x on the ``bits`` grid covering [lo, hi] (broadcastable to x, e.g. from ``activation_range``),
    in x's dtype (scales and rounding in fp32 for fp16 / bf16), the gradient passed straight through."""
    scale, zero = scalar_qparams(lo, hi, bits, symmetric)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    q = fake_quantize_values(x.detach(), scale, zero, -qmax if symmetric else 0, qmax)
    return straight_through(x, saturate(q, x.dtype))


def block_qparams(scale: Tensor, zero: Tensor, idx: Tensor, blocks_per_row: int, block_size: int,
                  granularity: str, group_size: int) -> Tuple[Tensor, Tensor]:
    """Scale/zero for the blocks with flat index ``idx``, broadcastable to (n, block_size)."""
    if granularity == "tensor":
        return scale.reshape(1, 1), zero.reshape(1, 1)
    rows = idx // blocks_per_row
    if granularity == "channel":
        return scale.reshape(-1)[rows].unsqueeze(1), zero.reshape(-1)[rows].unsqueeze(1)
    cols = (idx % blocks_per_row).unsqueeze(1) * block_size + torch.arange(block_size, device=idx.device)
    groups = cols // group_size  # (n, bs): a block may straddle groups
    s2, z2 = scale.reshape(scale.shape[0], -1), zero.reshape(zero.shape[0], -1)
    return s2[rows.unsqueeze(1), groups], z2[rows.unsqueeze(1), groups]


def scalar_blocks(w: Tensor, mask: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int,
                  granularity: str, group_size: int, block_size: int) -> Tensor:
    """w with the selected blocks fake-quantized (scale/zero from ``scalar_qparams``). New tensor."""
    nb = w[0].numel() // block_size

    def values(flat: Tensor, idx: Tensor) -> Tensor:
        s, z = block_qparams(scale, zero, idx, nb, block_size, granularity, group_size)
        sel = flat.index_select(0, idx).to(compute_dtype(flat.dtype))  # fp32 copy for fp16 / bf16 w
        q = sel.div_(s).round_().add_(z).clamp_(qmin, qmax)  # in place on the copy
        return q.sub_(z).mul_(s)

    return replace_blocks(w, mask, block_size, values)


# ------------------------------------------------------------------------------------------- pq
def nearest_centroid(x: Tensor, centroids: Tensor, chunk: int = 8192) -> Tensor:
    """Index of the nearest centroid (L2) for each row of x (n, d); centroids (k, d). int64 (n,).
    Distances in fp32 for fp16 / bf16 inputs (squared fp16 values overflow above 256)."""
    dt = compute_dtype(torch.promote_types(x.dtype, centroids.dtype))
    x, centroids = x.to(dt), centroids.to(dt)
    c2 = centroids.pow(2).sum(1)  # (k,)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        out[i : i + chunk] = torch.addmm(c2, xi, centroids.t(), alpha=-2.0).argmin(1)  # (n, k)
    return out


def pq_blocks(w: Tensor, mask: Tensor, centroids: Tensor, codes: Tensor, block_size: int) -> Tensor:
    """w with each selected block replaced by its assigned centroid; ``codes`` (out * nb,) holds the
    assignment of every block (from the last codebook refresh). New tensor."""
    return replace_blocks(w, mask, block_size, lambda flat, idx: centroids[codes[idx].long()])


def pq_decode(codes: Tensor, centroids: Tensor, shape) -> Tensor:
    """Rebuild a weight of ``shape`` from block codes (out * nb,) and centroids (k, bs)."""
    return centroids[codes.long()].reshape(shape)
