"""The Quant-Noise algorithms as short, pure tensor functions (no modules, no fairseq).

Fan et al. 2020, eq. (3)-(4): on each training forward a random subset J of weight blocks b_kl is
replaced by its quantized value, phi(b_kl) for (k, l) in J, the rest stays exact; gradients pass to
every weight with the straight-through estimator.  A *block* is ``block_size`` contiguous entries of
one row of ``weight.reshape(out, -1)`` (see quantnoise.nn for what that is per layer type).

Scalar fake quantization follows Jacob et al. 2018: q = clamp(round(w / s) + z, qmin, qmax),
w_hat = (q - z) * s, with z = 0 for the symmetric grid (Q8BERT's choice).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


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


def replace_blocks(w: Tensor, mask: Tensor, block_size: int, values: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A copy of w whose selected blocks are ``values(flat_blocks (N, bs), selected_index (n,))``,
    shaped (n, bs).  Only the selected blocks are computed on: cost ~ one copy of w + p of the work."""
    flat = blocks(w, block_size).reshape(-1, block_size)  # (out * nb, bs)
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (n_sel,)
    out = flat.clone()
    out.index_copy_(0, idx, values(flat, idx).to(w.dtype))
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
    dropped), else 1/(1-p).  ``out``: a reusable buffer of that shape and dtype."""
    if out is None or out.shape != (n_rows, n_blocks) or out.dtype != dtype or out.device != torch.device(device):
        out = torch.empty(n_rows, n_blocks, dtype=dtype, device=device)
    return out.bernoulli_(1.0 - p, generator=generator).mul_(1.0 / (1.0 - p))


def drop_blocks(w: Tensor, factors: Tensor, block_size: int) -> Tensor:
    """Selected blocks zeroed, the rest scaled by 1/(1-p) (fairseq's iPQ proxy): one multiply by
    the per-block ``factors`` of ``drop_factors`` (4x faster on CPU than a broadcast masked_fill). New tensor."""
    return (blocks(w, block_size) * factors.unsqueeze(-1)).view_as(w)  # (out, nb, bs) * (out, nb, 1)


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


def scalar_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and zero point covering [lo, hi] (and 0, so zero is exact), Jacob et al. 2018 eq. (1)."""
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
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s, elementwise with broadcasting."""
    q = x.div(scale).round_().add_(zero).clamp_(qmin, qmax)
    return q.sub_(zero).mul_(scale)


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int,
                  granularity: str, group_size: int) -> Tensor:
    """Dequantized int grid values of the whole w; scale/zero shaped like ``minmax``'s output."""
    g = group_view(w, granularity, group_size)
    return fake_quantize_values(g, scale, zero, qmin, qmax).view_as(w)


def activation_range(x: Tensor, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Per-tensor range of an activation, 0-d (lo, hi): (-max|x|, max|x|) for the symmetric grid
    (Q8BERT's EMA tracks max|x|), (min x, max x) for the affine one."""
    lo, hi = torch.aminmax(x.detach())
    if symmetric:
        a = torch.maximum(-lo, hi)
        return -a, a
    return lo, hi


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
        q = flat.index_select(0, idx).div_(s).round_().add_(z).clamp_(qmin, qmax)  # in place on the copy
        return q.sub_(z).mul_(s)

    return replace_blocks(w, mask, block_size, values)


# ------------------------------------------------------------------------------------------- pq
def nearest_centroid(x: Tensor, centroids: Tensor, chunk: int = 8192) -> Tensor:
    """Index of the nearest centroid (L2) for each row of x (n, d); centroids (k, d). int64 (n,)."""
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
