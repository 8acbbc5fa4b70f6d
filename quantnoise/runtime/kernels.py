"""The arithmetic of quantnoise.runtime's compressed layers: short pure functions of tensors.

- pq Linear by look-up table (Jegou et al. 2011's asymmetric distance computation; AQLM's LUT GEMM):
  table[t, j, c] = <x[t, j*bs:(j+1)*bs], C[c]>  (T, in/bs, k), then y[t, o] = sum_j table[t, j, codes[o, j]];
- pq Linear with no table, for few tokens: each row's centroids loaded as the codes select them and multiplied
  with the input in registers (``pq_linear_direct``, compiled only; its pure reference ``pq_linear_direct_pure``,
  decode + matmul);
- pq Linear by decode + matmul: C[codes] for a chunk of rows at a time (``pq_linear_decode``), then matmul;
- int-N: values at any element index of quantnoise.export's packed layout (any width 2..8), decoded rows.
- int4 Linear for few tokens: the packed nibbles widened in registers (``int4_linear``, compiled only; its
  pure reference ``int4_linear_pure``).
Pure PyTorch; device and dtype follow the input.  Two steps also have compiled CPU kernels
(quantnoise/runtime/csrc/pq_lut.cpp, built by ``python -m quantnoise.runtime``), used for fp32 CPU inputs when built:
the look-up-table product (``torch.ops.quantnoise.pq_lut_linear``: the table, laid out token-fastest and made
tile by tile, and its gather-sum in one call, tokens in groups of ``COMPILED_MAX_TOKENS``) and the decode
(``torch.ops.quantnoise.pq_decode``).  The pure PyTorch path
(``compiled=False``) computes the same sums in another order (equal within fp32 rounding) and the same decode
(identical), tests/runtime/test_runtime_layers.py.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..export import unpack
from . import ext as runtime_ext

# Crossover of the pq Linear between the look-up table and decode + matmul, in tokens per call, from
# `python benchmarks/infer.py WORK --kernels --threads 1` (shapes 512x512, 2048x512, 512x2048, 768x768,
# 3072x768, 768x3072; BENCHMARKS.md).  With the compiled kernels the table wins up to ~out/12 tokens for
# b=8, k=256 pq (512 rows: ~64 tokens, 768: ~90, 2048: ~200, 3072: over 256) and up to ~out/190 .. out/128 for
# int4's bytes (b=2: a 4x larger table per token and 4x more look-ups); the rule  T <= out * bs^2 /
# LUT_ROWS_FACTOR  fits both.  Pure PyTorch: the table for 1 token only (table / decode 0.74-0.88 at 1 token,
# 0.84-2.2 at 4).
LUT_ROWS_FACTOR = 768
LUT_MAX_TOKENS_PURE = 1
DECODE_ROWS_ELEMS = 1 << 20  # weights decoded per chunk at least (4 MB in fp32)
LUT_CHUNK_CODES = 1 << 18  # codes turned into int64 table indices per chunk (2 MB)
COMPILED_MAX_TOKENS = 16  # tokens per call of the compiled table product (csrc/pq_lut.cpp kMaxTokens)
# The compiled pq Linear with no table (``pq_linear_direct``) up to T * out <= DIRECT_TOKEN_ROWS tokens x output rows,
# the table beyond (then decode + matmul, ``lut_wins``).  It does fp32's multiply-adds (out x in per token) from
# the codes' bytes; the table k x in per token plus out x in / bs adds and a ~10 us fixed cost.  From 1-thread
# micro-benchmarks (BENCHMARKS.md, issue 19, "pq with no table"; b=8 and b=4, k=256, under load 5-8): no table
# is faster at 1 token on every shape (384 .. 2048 rows), to ~24-32 tokens on 384 / 512-row layers, the table
# from ~8-16 tokens on 1536 / 2048-row layers (b=4: no table wins more widely: its table gathers twice as often).
# Fitted per instruction set, the two CPUs this was measured on (BENCHMARKS.md, issue 19, "crossover"): 12288 with
# AVX-512 (Intel Sapphire Rapids); 16384 with AVX2 only (AMD EPYC Zen 3: no table still 1.2x faster at 4 tokens on
# 4,096 rows and 8 tokens on 2,048, the table ahead from 16 tokens on 1,024 rows).  One token: no table on both.
DIRECT_TOKEN_ROWS = 12288 if b"avx512f" in runtime_ext._cpu() else 16384


# ------------------------------------------------------------------------------ pure functions
def pq_rows(codes: Tensor, centroids: Tensor, dtype: torch.dtype, compiled: Optional[bool] = None) -> Tensor:
    """Decoded rows (n, in) of codes (n, m): centroids[codes], in ``dtype``.  Compiled (``pq_decode``: copies
    straight from the uint8 / int16 codes) for fp32 on CPU when built; else ``index_select``, which copies whole
    centroid rows (17x faster than advanced indexing ``centroids[codes]`` on CPU, 1 thread, 2048x512, b=8)."""
    cents = centroids.to(dtype)
    if compiled is None:  # the compiled decode has no backward: a codebook that needs a gradient is indexed
        compiled = (cents.device.type == "cpu" and dtype == torch.float32 and codes.dtype in (torch.uint8, torch.int16)
                    and not (cents.requires_grad and torch.is_grad_enabled()) and runtime_ext.available())
    if compiled and runtime_ext.available():
        return torch.ops.quantnoise.pq_decode(codes.contiguous(), cents.contiguous())
    return cents.index_select(0, codes.reshape(-1).long()).reshape(codes.shape[0], codes.shape[1] * cents.shape[1])


_COMPILED_CODES = (torch.uint8, torch.int16)


def use_compiled(x: Tensor, codes: Tensor) -> bool:
    """Whether ``pq_linear_lut`` runs the compiled table product for this input (when not told)."""
    return (x.is_cpu and x.dtype == torch.float32 and codes.dtype in _COMPILED_CODES and x.shape[0] >= 1
            and runtime_ext.available())


def lut_wins(x: Tensor, codes: Tensor, bs: int) -> bool:
    """Whether the look-up table beats decode + matmul for x (T, in) and codes (out, in / bs) (measured: see
    ``LUT_ROWS_FACTOR``)."""
    if not use_compiled(x, codes):
        return x.shape[0] <= LUT_MAX_TOKENS_PURE
    return x.shape[0] <= max(1, codes.shape[0] * bs * bs // LUT_ROWS_FACTOR)


def direct_wins(x: Tensor, codes: Tensor) -> bool:
    """Whether the compiled pq Linear with no table runs for x (T, in) and codes (out, in / bs) (fp32 CPU,
    compiled kernels built, T * out <= ``DIRECT_TOKEN_ROWS``)."""
    return use_compiled(x, codes) and x.shape[0] * codes.shape[0] <= DIRECT_TOKEN_ROWS


def pq_linear_direct(x: Tensor, codes: Tensor, centroids: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x (T, in) @ decode(codes, centroids).T [+ bias]: (T, out), compiled (fp32 CPU): for each output row and
    block, the centroid its code selects multiplied with the input's block in registers, for a tile of rows x
    tokens; no table, no decoded copy; x read in place at its row stride.  Equal to ``pq_linear_direct_pure``
    within fp32 rounding (the same products, summed in another order)."""
    if centroids.dtype != torch.float32:
        centroids = centroids.float()
    return torch.ops.quantnoise.pq_direct_linear(x, codes if codes.is_contiguous() else codes.contiguous(), centroids,
                                                 bias)


def pq_linear_direct_pure(x: Tensor, codes: Tensor, centroids: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The pure PyTorch reference of ``pq_linear_direct``: decode the whole weight (``index_select``), matmul."""
    w = pq_rows(codes, centroids, x.dtype, compiled=False)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def pq_linear_lut(x: Tensor, codes: Tensor, centroids: Tensor, compiled: Optional[bool] = None,
                  bias: Optional[Tensor] = None) -> Tensor:
    """x (T, in) @ decode(codes, centroids).T [+ bias] by look-up table: (T, out), in x's dtype.  ``compiled``:
    table and gather-sum in C++ (default: where ``use_compiled``; tokens in groups of ``COMPILED_MAX_TOKENS``)
    or in pure PyTorch."""
    T, (out, m), (k, bs) = x.shape[0], codes.shape, centroids.shape
    if (use_compiled(x, codes) if compiled is None else compiled) and runtime_ext.available():
        cents, codes = centroids.float(), codes.contiguous()
        ys = [torch.ops.quantnoise.pq_lut_linear(x[s:s + COMPILED_MAX_TOKENS], codes, cents, bias)
              for s in range(0, T, COMPILED_MAX_TOKENS)]
        return torch.cat(ys) if len(ys) > 1 else ys[0]
    return _pq_linear_lut_pure(x, codes, centroids, bias)


def _pq_linear_lut_pure(x: Tensor, codes: Tensor, centroids: Tensor, bias: Optional[Tensor]) -> Tensor:
    T, (out, m), (k, bs) = x.shape[0], codes.shape, centroids.shape
    table = x.reshape(T * m, bs) @ centroids.to(x.dtype).t()  # (T*m, k): one GEMM, = (T, m, k)
    offs = torch.arange(m, device=x.device) * k  # (m,): where block position j's table starts
    rows = max(1, LUT_CHUNK_CODES // m)
    if T == 1:
        flat = table.reshape(m * k)
        y = torch.cat([flat.take(codes[s:s + rows].long() + offs).sum(1) for s in range(0, out, rows)]).unsqueeze(0)
    else:
        flat = table.reshape(T, m * k).t().contiguous()  # (m*k, T): one table entry per row
        y = torch.cat([F.embedding_bag(codes[s:s + rows].long() + offs, flat, mode="sum")
                       for s in range(0, out, rows)]).t()
    return y if bias is None else y + bias.to(y.dtype)  # (T, out)


def pq_linear_decode(x: Tensor, codes: Tensor, centroids: Tensor, bias: Optional[Tensor] = None,
                     row_scale: Optional[Tensor] = None) -> Tensor:
    """x (T, in) @ (decode(codes, centroids) * row_scale).T + bias, decoding at a time as many rows as make
    ``DECODE_ROWS_ELEMS`` weights or T x max(in, out) elements, whichever is more (the transient stays within
    the size of the layer's input or output activations; for many tokens the whole weight: one GEMM, no
    concatenation, x read once).  ``row_scale`` (out, 1): int-N rows; ``bias`` (out,): added by the GEMM."""
    out, m = codes.shape
    inn = m * centroids.shape[1]
    rows = max(1, max(DECODE_ROWS_ELEMS, x.shape[0] * max(out, inn)) // inn)

    def part(s: int, e: int) -> Tensor:
        w = pq_rows(codes[s:e], centroids, x.dtype)
        if row_scale is not None:
            w = w.mul_(row_scale[s:e].to(x.dtype))
        return F.linear(x, w, None if bias is None else bias[s:e].to(x.dtype))

    if rows >= out:
        return part(0, out)
    return torch.cat([part(s, s + rows) for s in range(0, out, rows)], -1)


def unpack_at(packed: Tensor, width: int, idx: Tensor) -> Tensor:
    """The values (uint8) at flat element indices ``idx`` of ``packed`` (quantnoise.export.pack layout: one bit
    stream, value i in bits [i*width, (i+1)*width), little end first).  A value of width 3, 5, 6, 7 may straddle
    two bytes: read 16 bits (the byte after the last is never needed: its bits would be masked off)."""
    bit = idx * width
    byte, shift = bit // 8, (bit % 8).to(torch.int32)
    if 8 % width == 0:  # 2, 4, 8: a value never leaves its byte
        return (packed[byte] >> shift.to(torch.uint8)) & (2**width - 1)
    nxt = (byte + 1).clamp_(max=packed.numel() - 1)
    word = packed[byte].to(torch.int32) | (packed[nxt].to(torch.int32) << 8)
    return ((word >> shift) & (2**width - 1)).to(torch.uint8)


def int_rows(packed: Tensor, scale: Tensor, width: int, bits: int, rows: Tensor, cols: int, dtype) -> Tensor:
    """Decoded rows (n, cols) of a packed int-N weight: (u - qmax) * scale[rows]."""
    idx = rows.long().unsqueeze(1) * cols + torch.arange(cols, device=packed.device)  # (n, cols)
    q = unpack_at(packed, width, idx).to(torch.int16) - (2 ** (bits - 1) - 1)
    return q.to(dtype) * scale[rows.long()].to(dtype)


def int_row_range(packed: Tensor, scale: Tensor, width: int, bits: int, start: int, stop: int, cols: int,
                  dtype) -> Tensor:
    """Decoded rows start..stop-1 (stop - start, cols) of a packed int-N weight: a contiguous run of the bit
    stream, unpacked from the 8-value group it starts in (``export.unpack``: whole groups, no per-value
    gather), then (u - qmax) * scale[row]."""
    v0, v1 = start * cols, stop * cols
    a = v0 - v0 % 8  # 8 values = ``width`` whole bytes: the stream restarts on a byte there
    u = unpack(packed[a * width // 8: -(-v1 * width // 8)], width, v1 - a)[v0 - a:]
    q = u.to(torch.int16) - (2 ** (bits - 1) - 1)
    return q.to(dtype).reshape(stop - start, cols) * scale[start:stop].to(dtype)


# int4 Linear straight from the packed nibbles (compiled ``int4_linear``) up to this many tokens per call, decode +
# matmul beyond: against the byte look-up table and decode + matmul, 1 thread, shapes 2048x512 and 512x2048, the
# compiled kernel wins at 1-64 tokens and loses to decode + matmul from 128 (BENCHMARKS.md, issue 19)
INT4_MAX_TOKENS = 64


def int4_compiled(x: Tensor, width: int, inn: int) -> bool:
    """Whether ``int4_linear`` runs for x (T, in) and an int-N weight held ``width`` bits wide."""
    return (width == 4 and inn % 2 == 0 and x.device.type == "cpu" and x.dtype == torch.float32
            and 1 <= x.shape[0] <= INT4_MAX_TOKENS and runtime_ext.available())


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, bits: int, bias: Optional[Tensor] = None) -> Tensor:
    """x (T, in) @ ((u - qmax) * scale).T [+ bias] for an int-N weight held 4 bits wide (``packed``: the
    (out * in / 2) bytes of quantnoise.export's layout; ``scale`` (out, 1)), compiled: the nibbles widened to
    fp32 in registers, fp32 products (equal to the decoded layer within fp32 rounding)."""
    return torch.ops.quantnoise.int4_linear(x.contiguous(), packed.reshape(-1), scale.reshape(-1).float().contiguous(),
                                            2 ** (bits - 1) - 1, bias)


def int4_linear_pure(x: Tensor, packed: Tensor, scale: Tensor, bits: int, bias: Optional[Tensor] = None) -> Tensor:
    """The pure PyTorch reference of ``int4_linear``: unpack the nibbles, (u - qmax) * scale, matmul."""
    out, inn = scale.numel(), x.shape[1]
    u = torch.stack([packed.reshape(-1) & 15, packed.reshape(-1) >> 4], 1).reshape(out, inn)
    w = (u.to(torch.int16) - (2 ** (bits - 1) - 1)).to(x.dtype) * scale.reshape(out, 1).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@functools.lru_cache(None)
def fbgemm_reduce_range() -> bool:
    """fbgemm without VNNI adds u8 x s8 pairs in int16, which can saturate: quantize activations to 7
    bits there (what torch.ao's dynamic quantization does on x86); 8 bits where VNNI is present."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.lru_cache(None)
def byte_codebook(width: int, bits: int) -> Tensor:
    """(256, 8 / width) fp32: the integer values q held by each possible byte of a packed int-N weight.  A
    byte-aligned packed row is then pq codes (its bytes) over this fixed codebook, so int4 / int2 layers
    run on the pq kernels above (look-up table for few tokens, decode + matmul for many), scaled per row."""
    b = torch.arange(256, dtype=torch.int16).unsqueeze(1)
    q = (b >> torch.arange(0, 8, width, dtype=torch.int16)) & (2**width - 1)
    return (q - (2 ** (bits - 1) - 1)).float()
