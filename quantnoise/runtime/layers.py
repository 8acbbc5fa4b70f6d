"""Run a ``.qnz`` compressed: layers that keep what the file stores and compute from it.

quantnoise.compress's layers decode their whole weight on every forward (they exist to fine-tune
centroids); these are for inference only.  They subclass the layer they replace and hold
  - ``CodesLinear`` / ``CodesEmbedding``: pq ``codes`` (out, in / bs) uint8|int16 + ``centroids`` (k, bs);
  - ``IntLinear`` / ``IntEmbedding``: int-N weights, ``qweight`` int8 (out, in) for 8 bits or the file's
    bytes packed 8 / width per byte (int4: two per byte, int2: four) + ``qscale`` (out, 1) fp32.  The loader
    (``load.runtime_width``) holds int3 4 bits wide and int5-7 as int8, so they run int4's / int8's kernels; a
    layer built with width 3, 5, 6 or 7 (the file's bit stream as it is) runs decode + matmul.
Nothing decodes a whole weight in a forward (``.weight`` does, for code that reads it):
  - pq Linear, few tokens (fp32 CPU, compiled kernels built, tokens x rows <= ``kernels.DIRECT_TOKEN_ROWS``): no
    table: each code's centroid loaded and multiplied with the input in registers (``kernels.pq_linear_direct``);
  - pq Linear, a few more tokens: look-up table (Jegou et al. 2011, asymmetric distance; AQLM's LUT GEMM):
    table[t, j, c] = <x[t, j*bs:(j+1)*bs], C[c]>  (T, in/bs, k), then y[t, o] = sum_j table[t, j, codes[o, j]];
    many tokens (more than ~out/12 with the compiled kernels, 1 without: ``kernels.lut_wins``): decode
    a chunk of rows at a time (the whole weight when the input or output activations are as large) and matmul.
  - int4 Linear, few tokens (up to ``kernels.INT4_MAX_TOKENS``, fp32 CPU, compiled kernels built): the packed
    nibbles widened to fp32 in registers and multiplied there (``kernels.int4_linear``: the file's bytes, no
    copy, no activation quantization).
  - int4 (many tokens, or no compiled kernel) / int2 Linear: a packed row's bytes are pq codes over the fixed
    codebook of the 256 byte values, so the pq kernels run them (then the row scales).
  - int8 Linear on CPU: fbgemm's dynamic int8 GEMM (``torch.ops.quantized.linear_dynamic``, the kernel of
    ``torch.ao.quantization.quantize_dynamic``) on a packed copy of the int8 weight; the activations are
    quantized on the fly, one scale per call (per token in batch-1 generation).  Without fbgemm:
    ``torch._int_mm`` with one activation scale per token.  Elsewhere (CUDA): decode a chunk of rows at a
    time and matmul.
  - Embeddings decode only the looked-up rows (an id outside [0, rows) raises IndexError, as nn.Embedding does).
The table kernels and fbgemm have no backward: a forward that autograd must see (input or bias requiring grad)
takes the decode path, whose input gradient is the decoded layer's.  Lazy fbgemm packing (``pack_`` at the first
forward) is thread-safe; a packed IntLinear loads its own state dict (then repacks).
The arithmetic is in quantnoise/runtime/kernels.py (the table product and the decode also compiled:
quantnoise/runtime/csrc/pq_lut.cpp, when built).  The layers hold the tensors ``quantnoise.export.read_qnz`` read, without copying them (int8: fbgemm's
packed copy replaces them).  Device and dtype follow the input.  ``quantnoise.runtime.load.fill_model_`` puts them into a model built on
the ``meta`` device; quantnoise/qn_fairseq/runtime.py builds fairseq models that way.
"""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import kernels as K

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ preconditions
def check_pq(codes: Tensor, centroids: Tensor, shape) -> None:
    """ValueError unless codes / centroids are a pq weight of ``shape`` (out, in) the kernels may run: centroids
    (k, bs) with bs dividing ``in``, uint8 / int16 codes, out * in / bs of them, each in [0, k).  Checked once, when
    a layer is built or loaded (the compiled kernels index the codebook with the codes unchecked)."""
    out, inn = shape
    if centroids.dim() != 2 or centroids.shape[0] < 1 or centroids.shape[1] < 1 or inn % centroids.shape[1]:
        raise ValueError(f"pq layer {tuple(shape)}: centroids of shape {tuple(centroids.shape)}, expected (k, block) "
                         f"with the block dividing {inn}")
    k, bs = centroids.shape
    if codes.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64) or codes.numel() != out * (inn // bs):
        raise ValueError(f"pq layer {tuple(shape)}: {codes.numel()} {str(codes.dtype)[6:]} codes, expected "
                         f"{out * (inn // bs)} integer codes (blocks of {bs})")
    if codes.numel() and not codes.is_meta:
        lo, hi = torch.aminmax(codes.reshape(-1))
        if int(lo) < 0 or int(hi) >= k:
            raise ValueError(f"pq layer {tuple(shape)}: codes in [{int(lo)}, {int(hi)}] but the codebook has {k} "
                             f"centroids (codes must lie in [0, {k}))")


def check_int(qweight: Tensor, qscale: Tensor, bits: int, width: int, shape) -> None:
    """ValueError unless qweight / qscale are an int-N weight of ``shape`` (out, in): int8 (out, in) for width 8,
    else ceil(out * in * width / 8) packed bytes (width >= bits); one scale per row."""
    out, inn = shape
    if not (isinstance(bits, int) and isinstance(width, int) and 2 <= bits <= width <= 8):
        raise ValueError(f"int layer {tuple(shape)}: bits {bits!r} packed {width!r} wide is no int-N layout")
    ok = (qweight.dtype == torch.int8 and tuple(qweight.shape) == (out, inn)) if width == 8 else \
        (qweight.dtype == torch.uint8 and qweight.numel() == -(-out * inn * width // 8))
    if not ok:
        raise ValueError(f"int{bits} layer {tuple(shape)}: qweight {str(qweight.dtype)[6:]} {tuple(qweight.shape)} "
                         f"does not hold its weights")
    if qscale.numel() != out:
        raise ValueError(f"int{bits} layer {tuple(shape)}: {qscale.numel()} scales for {out} rows")


def needs_grad(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether autograd must see this forward: the table kernels and fbgemm have no backward, so such a forward
    takes the decode path (differentiable in x, bias and a codebook that requires grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def check_ids(ids: Tensor, n: int) -> None:
    """IndexError, as nn.Embedding raises, for an id outside [0, n) (indexing would wrap -1 to the last row)."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= n:
            raise IndexError(f"index {int(lo) if int(lo) < 0 else int(hi)} is out of range of an embedding of {n} rows")


_PACK_LOCK = threading.Lock()  # lazy fbgemm packing (first forward): one thread packs, the others wait (rare: once
# per layer)


# ---------------------------------------------------------------------------------- layers
class RuntimeMixin:
    """No ``weight`` Parameter; ``weight`` decodes (for code that reads it: a full fp32 copy)."""

    weight_transposed = False  # True: a layer holding its weight as (in, out) (GPT-2's Conv1D), computed as a Linear of W.T

    @property
    def weight(self) -> Tensor:
        return self.decode_rows(torch.arange(self.weight_shape[0], device=self.qscale_or_centroids.device))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight_shape)}, {self.kind}, kernel={self.kernel}"


class _PQ(RuntimeMixin):
    kind = "pq"

    def _init_pq(self, codes: Tensor, centroids: Tensor, shape) -> None:
        check_pq(codes, centroids, shape)
        self.weight_shape = tuple(shape)
        self.register_buffer("codes", codes.reshape(shape[0], -1))  # (out, in / bs)
        self.register_buffer("centroids", centroids)  # (k, bs)
        self.kernel = "auto"

    @property
    def qscale_or_centroids(self) -> Tensor:
        return self.centroids

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # loaded codes index the codebook unchecked too: checked before they replace the layer's own
        check_pq(state_dict.get(prefix + "codes", self.codes), state_dict.get(prefix + "centroids", self.centroids),
                 self.weight_shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def decode_rows(self, rows: Tensor, dtype=None) -> Tensor:
        return K.pq_rows(self.codes[rows], self.centroids, dtype or self.centroids.dtype)


class CodesLinear(_PQ, nn.Linear):
    """pq Linear from its codes: ``choose_kernel``: the compiled no-table kernel for few tokens, the look-up table
    for a few more, chunked decode + matmul for many."""

    def __init__(self, in_features: int, out_features: int, codes: Tensor, centroids: Tensor, bias: Optional[Tensor]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_pq(codes, centroids, (out_features, in_features))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def choose_kernel(self, x: Tensor) -> str:
        """``kernel`` unless "auto": "direct" (compiled, no table: few tokens), "lut" (look-up table) or "decode"
        (decode + matmul: many tokens), by ``kernels.direct_wins`` / ``kernels.lut_wins``.  "direct" set by hand
        where the compiled op cannot run (CUDA, bf16, no build) is the table."""
        codes = self._buffers["codes"]
        if self.kernel != "auto":
            return "lut" if self.kernel == "direct" and not K.use_compiled(x, codes) else self.kernel
        if K.direct_wins(x, codes):
            return "direct"
        return "lut" if K.lut_wins(x, codes, self._buffers["centroids"].shape[1]) else "decode"

    def forward(self, x: Tensor) -> Tensor:
        # batch-1 generation calls this once per layer and token: the buffers read once (a Module attribute
        # lookup each costs as much as a small kernel's arithmetic), the compiled no-table op called directly
        x2 = x.reshape(-1, self.in_features)
        codes, cents, bias = self._buffers["codes"], self._buffers["centroids"], self.bias
        kernel = self.choose_kernel(x2)
        if kernel in ("direct", "lut") and needs_grad(x2, bias, cents):  # no backward: decode instead
            kernel = "decode"
        if kernel == "direct":
            y = K.pq_linear_direct(x2, codes, cents, bias)
        elif kernel == "lut":
            y = K.pq_linear_lut(x2, codes, cents, bias=bias)
        else:
            y = K.pq_linear_decode(x2, codes, cents, bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


class CodesEmbedding(_PQ, nn.Embedding):
    """pq Embedding: decodes the looked-up rows only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, codes: Tensor, centroids: Tensor,
                 padding_idx: Optional[int] = None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self._init_pq(codes, centroids, (num_embeddings, embedding_dim))
        self.kernel = "rows"

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings)
        return self.decode_rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


class _Int(RuntimeMixin):
    kind = "int"

    def _init_int(self, qweight: Tensor, qscale: Tensor, bits: int, width: int, shape) -> None:
        """qweight: int8 (out, in) for width 8 (see ``stored_int``), else the file's packed bytes."""
        check_int(qweight, qscale, bits, width, shape)
        self.weight_shape, self.bits, self.width = tuple(shape), bits, width
        self.kind = f"int{bits}"
        self.register_buffer("qweight", qweight)
        self.register_buffer("qscale", qscale.reshape(shape[0], 1))  # (out, 1) fp32
        self._packed = None  # fbgemm's packed int8 weight (CPU), replacing ``qweight`` once made

    @property
    def qscale_or_centroids(self) -> Tensor:
        return self.qscale

    def int8_weight(self) -> Tensor:
        q = self._buffers.get("qweight")  # read before _packed: packing sets _packed, then drops qweight
        if q is not None:
            return q
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def decode_rows(self, rows: Tensor, dtype=None) -> Tensor:
        dtype = dtype or self.qscale.dtype
        if self.width == 8:
            return self.int8_weight()[rows].to(dtype) * self.qscale[rows].to(dtype)
        return K.int_rows(self.qweight, self.qscale, self.width, self.bits, rows, self.weight_shape[1], dtype)

    def decode_range(self, start: int, stop: int, dtype=None) -> Tensor:
        """Decoded rows start..stop-1 (a contiguous run: no per-value gather)."""
        dtype = dtype or self.qscale.dtype
        if self.width == 8:
            q = self.int8_weight()
            return q[start:stop].to(dtype) * self.qscale[start:stop].to(dtype)
        return K.int_row_range(self.qweight, self.qscale, self.width, self.bits, start, stop, self.weight_shape[1], dtype)

    @property
    def weight(self) -> Tensor:
        return self.decode_range(0, self.weight_shape[0])


class IntLinear(_Int, nn.Linear):
    """int-N Linear.  8 bits on CPU: fbgemm's int8 GEMM (``kernel="fbgemm"``, the weight packed once) or
    ``torch._int_mm`` (``"int_mm"``).  2 / 4 bits: the packed bytes as pq codes over a fixed 256-entry
    codebook (``"lut"`` for few tokens, ``"bytes"``: decode + matmul); 4 bits wide, fp32 on CPU with the compiled
    kernels, up to ``kernels.INT4_MAX_TOKENS`` tokens: ``"int4"`` (the nibbles widened in registers).  Otherwise (CUDA int8, rows not
    byte-aligned) chunks of rows decoded then matmul (``"decode"``)."""

    def __init__(self, in_features: int, out_features: int, qweight: Tensor, qscale: Tensor, bits: int,
                 width: int, bias: Optional[Tensor]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_int(qweight, qscale, bits, width, (out_features, in_features))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.kernel = "auto"
        # each row starts on a byte and no value straddles two (width 2 / 4): a row's bytes are pq codes
        aligned = width < 8 and 8 % width == 0 and in_features * width % 8 == 0
        self.register_buffer("book", K.byte_codebook(width, bits).clone() if aligned else None, persistent=False)

    def pack_(self) -> "IntLinear":
        """Replace the int8 weight by fbgemm's packed copy (same bytes; CPU only).  Undone by ``.to()``.  Thread-safe
        (a lazy pack at the first forward of several threads packs once; the others read ``qweight`` or the copy)."""
        if self._packed is not None or self.width != 8 or not K.fbgemm_available():
            return self
        with _PACK_LOCK:
            if self._packed is None and self.qweight.device.type == "cpu":
                self._share_packed(self._prepack(self.qweight))
        return self

    def _prepack(self, q: Tensor):
        scale = self.qscale.reshape(-1).double()
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; fbgemm needs one here
            warnings.simplefilter("ignore", UserWarning)
            w = torch._make_per_channel_quantized_tensor(q, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(w, None)

    def _share_packed(self, packed) -> None:
        """Compute with ``packed`` (this weight's fbgemm copy, possibly another layer's: a tied weight) from now on."""
        self._packed = packed  # first: a thread that finds qweight gone finds the packed copy
        self._buffers.pop("qweight", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self._packed is not None
        if packed:  # the state dict holds the plain int8 qweight (_save_to_state_dict): load it as a buffer, repack
            self.register_buffer("qweight", self.int8_weight())
            self._packed = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        check_int(self.qweight, self.qscale, self.bits, self.width, self.weight_shape)
        if packed:
            self.pack_()

    def _apply(self, fn, recurse=True):
        if self._packed is not None:  # device / dtype moves see the plain int8 weight, then repack on CPU
            q, self._packed = self.int8_weight(), None
            self.register_buffer("qweight", q)
            super()._apply(fn, recurse)
            return self.pack_()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "qweight"] = self.int8_weight()

    def choose_kernel(self, x: Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        if self.width < 8:
            if self.book is None:
                return "decode"
            if K.int4_compiled(x, self.width, self.in_features):
                return "int4"
            return "lut" if K.lut_wins(x, self.qweight.view(self.out_features, -1), self.book.shape[1]) else "bytes"
        if x.device.type != "cpu":
            return "decode"
        return "fbgemm" if self._packed is not None or K.fbgemm_available() else "int_mm"

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = self.choose_kernel(x2)
        if kernel in ("fbgemm", "lut", "int_mm", "int4") and needs_grad(x2, self.bias):  # no backward: decode instead
            kernel = "bytes" if kernel in ("lut", "int4") else "decode"
        if kernel == "int4":  # compiled: the nibbles widened in registers, bias added there
            y = K.int4_linear(x2, self.qweight, self.qscale, self.bits, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if kernel == "fbgemm":
            self.pack_()
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._packed, K.fbgemm_reduce_range()).to(x.dtype)
        elif kernel == "bytes":  # packed bytes = pq codes over byte_codebook, rows scaled as decoded, bias in the GEMM
            y = K.pq_linear_decode(x2, self.qweight.view(self.out_features, -1), self.book, self.bias, self.qscale)
            return y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "lut":  # the same codes by look-up table, then the row scales
            y = K.pq_linear_lut(x2, self.qweight.view(self.out_features, -1), self.book)
            y = y * self.qscale.t().to(y.dtype)
        elif kernel == "int_mm":
            xs = x2.float().abs().amax(1, keepdim=True).clamp_min(1e-30) / 127  # (T, 1) per-token scale
            xq = torch.round(x2.float() / xs).to(torch.int8)
            y = (torch._int_mm(xq, self.int8_weight().t()).float() * xs * self.qscale.t()).to(x.dtype)
        else:
            rows = max(1, K.DECODE_ROWS_ELEMS // self.in_features)
            y = torch.cat([x2 @ self.decode_range(s, min(s + rows, self.out_features), x.dtype).t()
                           for s in range(0, self.out_features, rows)], -1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class IntEmbedding(_Int, nn.Embedding):
    """int-N Embedding: unpacks and scales the looked-up rows only."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qweight: Tensor, qscale: Tensor, bits: int,
                 width: int, padding_idx: Optional[int] = None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self._init_int(qweight, qscale, bits, width, (num_embeddings, embedding_dim))
        self.kernel = "rows"

    def forward(self, ids: Tensor) -> Tensor:
        check_ids(ids, self.num_embeddings)
        return self.decode_rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
