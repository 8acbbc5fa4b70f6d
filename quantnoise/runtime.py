"""Run a ``.qnz`` compressed: layers that keep what the file stores and compute from it.

quantnoise.ipq's layers decode their whole weight on every forward (they exist to fine-tune
centroids); these are for inference only.  They subclass the layer they replace and hold
  - ``CodesLinear`` / ``CodesEmbedding``: pq ``codes`` (out, in / bs) uint8|int16 + ``centroids`` (k, bs);
  - ``IntLinear`` / ``IntEmbedding``: int-N weights, ``qweight`` int8 (out, in) for 8 bits or the file's
    bytes packed 8 / width per byte (int4: two per byte, int2: four) + ``qscale`` (out, 1) fp32.
Nothing decodes a whole weight in a forward (``.weight`` does, for code that reads it):
  - pq Linear, few tokens: look-up table (Jegou et al. 2011, asymmetric distance; AQLM's LUT GEMM):
    table[t, j, c] = <x[t, j*bs:(j+1)*bs], C[c]>  (T, in/bs, k), then y[t, o] = sum_j table[t, j, codes[o, j]];
    many tokens (more than ~out/12 with the compiled kernels, 1 without: ``runtime_kernels.lut_wins``): decode
    a chunk of rows at a time (the whole weight when the input or output activations are as large) and matmul.
  - int4 / int2 Linear: a packed row's bytes are pq codes over the fixed codebook of the 256 byte values, so
    the pq kernels run them (then the row scales).
  - int8 Linear on CPU: fbgemm's dynamic int8 GEMM (``torch.ops.quantized.linear_dynamic``, the kernel of
    ``torch.ao.quantization.quantize_dynamic``) on a packed copy of the int8 weight; the activations are
    quantized on the fly, one scale per call (per token in batch-1 generation).  Without fbgemm:
    ``torch._int_mm`` with one activation scale per token.  Elsewhere (CUDA): decode a chunk of rows at a
    time and matmul.
  - Embeddings decode only the looked-up rows.
The arithmetic is in quantnoise/runtime_kernels.py (the table's gather-sum also compiled: quantnoise/csrc/pq_lut.cpp,
when built).  The layers hold the tensors ``quantnoise.export.read_qnz`` read, without copying them (int8: fbgemm's
packed copy replaces them).  Device and dtype follow the input.  ``fill_model_`` puts them into a model built on the ``meta``
device; quantnoise/qn_fairseq/runtime.py builds fairseq models that way (``load_qnz`` below).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import runtime_kernels as K
from .export import DTYPES, decode
from .nn import QuantNoiseMixin

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- layers
class RuntimeMixin:
    """No ``weight`` Parameter; ``weight`` decodes (for code that reads it: a full fp32 copy)."""

    @property
    def weight(self) -> Tensor:
        return self.decode_rows(torch.arange(self.weight_shape[0], device=self.qscale_or_centroids.device))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight_shape)}, {self.kind}, kernel={self.kernel}"


class _PQ(RuntimeMixin):
    kind = "pq"

    def _init_pq(self, codes: Tensor, centroids: Tensor, shape) -> None:
        self.weight_shape = tuple(shape)
        self.register_buffer("codes", codes.reshape(shape[0], -1))  # (out, in / bs)
        self.register_buffer("centroids", centroids)  # (k, bs)
        self.kernel = "auto"

    @property
    def qscale_or_centroids(self) -> Tensor:
        return self.centroids

    def decode_rows(self, rows: Tensor, dtype=None) -> Tensor:
        return K.pq_rows(self.codes[rows], self.centroids, dtype or self.centroids.dtype)


class CodesLinear(_PQ, nn.Linear):
    """pq Linear from its codes: look-up table for few tokens, chunked decode + matmul for many."""

    def __init__(self, in_features: int, out_features: int, codes: Tensor, centroids: Tensor, bias: Optional[Tensor]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_pq(codes, centroids, (out_features, in_features))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        lut = self.kernel == "lut" or (self.kernel == "auto" and K.lut_wins(x2, self.codes, self.centroids.shape[1]))
        if lut:
            y = K.pq_linear_lut(x2, self.codes, self.centroids, bias=self.bias)
        else:
            y = K.pq_linear_decode(x2, self.codes, self.centroids, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


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
        return self.decode_rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


class _Int(RuntimeMixin):
    kind = "int"

    def _init_int(self, qweight: Tensor, qscale: Tensor, bits: int, width: int, shape) -> None:
        """qweight: int8 (out, in) for width 8 (see ``stored_int``), else the file's packed bytes."""
        self.weight_shape, self.bits, self.width = tuple(shape), bits, width
        self.kind = f"int{bits}"
        self.register_buffer("qweight", qweight)
        self.register_buffer("qscale", qscale.reshape(shape[0], 1))  # (out, 1) fp32
        self._packed = None  # fbgemm's packed int8 weight (CPU), replacing ``qweight`` once made

    @property
    def qscale_or_centroids(self) -> Tensor:
        return self.qscale

    def int8_weight(self) -> Tensor:
        if self._packed is not None:
            return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()
        return self.qweight

    def decode_rows(self, rows: Tensor, dtype=None) -> Tensor:
        dtype = dtype or self.qscale.dtype
        if self.width == 8:
            q = self.int8_weight() if self._packed is not None else self.qweight
            return q[rows].to(dtype) * self.qscale[rows].to(dtype)
        return K.int_rows(self.qweight, self.qscale, self.width, self.bits, rows, self.weight_shape[1], dtype)


class IntLinear(_Int, nn.Linear):
    """int-N Linear.  8 bits on CPU: fbgemm's int8 GEMM (``kernel="fbgemm"``, the weight packed once) or
    ``torch._int_mm`` (``"int_mm"``).  2 / 4 bits: the packed bytes as pq codes over a fixed 256-entry
    codebook (``"lut"`` for few tokens, ``"bytes"``: decode + matmul).  Otherwise (CUDA int8, rows not
    byte-aligned) chunks of rows decoded then matmul (``"decode"``)."""

    def __init__(self, in_features: int, out_features: int, qweight: Tensor, qscale: Tensor, bits: int,
                 width: int, bias: Optional[Tensor]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_int(qweight, qscale, bits, width, (out_features, in_features))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.kernel = "auto"
        aligned = width < 8 and in_features * width % 8 == 0  # each row starts on a byte: its bytes are pq codes
        self.register_buffer("book", K.byte_codebook(width, bits).clone() if aligned else None, persistent=False)

    def pack_(self) -> "IntLinear":
        """Replace the int8 weight by fbgemm's packed copy (same bytes; CPU only).  Undone by ``.to()``."""
        if self._packed is None and self.width == 8 and self.qweight.device.type == "cpu" and K.fbgemm_available():
            scale = self.qscale.reshape(-1).double()
            with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; fbgemm needs one here
                warnings.simplefilter("ignore", UserWarning)
                w = torch._make_per_channel_quantized_tensor(self.qweight, scale, torch.zeros_like(scale, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(w, None)
            del self._buffers["qweight"]
        return self

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
            return "lut" if K.lut_wins(x, self.qweight.view(self.out_features, -1), self.book.shape[1]) else "bytes"
        if x.device.type != "cpu":
            return "decode"
        return "fbgemm" if self._packed is not None or K.fbgemm_available() else "int_mm"

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = self.choose_kernel(x2)
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
            idx = torch.arange(self.out_features, device=x.device)
            y = torch.cat([x2 @ self.decode_rows(idx[s:s + rows], x.dtype).t()
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
        return self.decode_rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


# ------------------------------------------------------------------------- filling a model
def stored_int(packed: Tensor, bits: int, width: int, shape) -> Tensor:
    """The runtime form of a stored int-N weight: int8 (out, in) for 8-bit packing (the same bytes,
    q = u - qmax), the packed bytes as they are otherwise."""
    if width != 8:
        return packed
    return torch.sub(packed, 2 ** (bits - 1) - 1).view(torch.int8).reshape(shape)  # u - qmax mod 256: no int16 copy


def _centroids(tensors: Dict[str, Tensor], name: str, e: dict) -> Tensor:
    c = tensors[f"{name}.centroids"].float()  # fp16 -> fp32 exactly; (k, bs): a few KB
    if e["centroids"] == "int8":
        c = c * tensors[f"{name}.centroids_scale"].float()
    return c


def runtime_layer(like: nn.Module, name: str, e: dict, tensors: Dict[str, Tensor]) -> nn.Module:
    """The compressed runtime layer replacing ``like`` (a plain Linear / Embedding, on any device), built
    from the .qnz tensors of layer ``name`` (map entry ``e``); its bias is ``like``'s until filled."""
    shape = tuple(e["shape"])
    if tuple(like.weight.shape) != shape:
        raise ValueError(f"layer {name}: the .qnz stores shape {list(shape)} but the model has "
                         f"{list(like.weight.shape)}; the file does not belong to this architecture")
    pq = e["scheme"] == "pq"
    if not pq:
        q, scale = stored_int(tensors[f"{name}.qweight"], e["bits"], e["pack_width"], shape), tensors[f"{name}.qscale"]
        scale = scale.repeat_interleave(e.get("rows_per_scale", 1), 0)  # group-wise -> one per row, exactly
    if not _keeps_base_forward(like):  # e.g. fairseq's LearnedPositionalEmbedding: looks up positions, not ids
        return None
    if isinstance(like, nn.Linear):
        bias = like.bias
        if pq:
            return CodesLinear(shape[1], shape[0], tensors[f"{name}.codes"], _centroids(tensors, name, e), bias)
        return IntLinear(shape[1], shape[0], q, scale, e["bits"], e["pack_width"], bias)
    if isinstance(like, nn.Embedding) and like.max_norm is None:
        if pq:
            return CodesEmbedding(shape[0], shape[1], tensors[f"{name}.codes"], _centroids(tensors, name, e),
                                  like.padding_idx)
        return IntEmbedding(shape[0], shape[1], q, scale, e["bits"], e["pack_width"], like.padding_idx)
    return None  # Conv etc.: decoded by fill_model_


def _keeps_base_forward(like: nn.Module) -> bool:
    """A runtime layer computes what nn.Linear / nn.Embedding's own forward computes: only a layer whose
    forward is that one (or a quant-noise wrapper of such a layer, the same thing in eval) may be replaced."""
    if isinstance(like, QuantNoiseMixin):
        return True
    return any(isinstance(like, base) and type(like).forward is base.forward for base in (nn.Linear, nn.Embedding))


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    mod = model.get_submodule(owner)
    if attr in mod._buffers:
        mod._buffers[attr] = value
    else:  # a Parameter, or a weight a runtime layer does not take
        setattr(mod, attr, nn.Parameter(value, requires_grad=False))


def fill_model_(model: nn.Module, tensors: Dict[str, Tensor], meta: dict, pack: bool = True) -> nn.Module:
    """Put the .qnz's contents into ``model`` (built on the ``meta`` device, or anywhere): runtime layers for
    its compressed Linear / Embedding layers, its other tensors as they are (in their original dtype), and
    a tied copy of a compressed weight (``aliases``) as a runtime Linear sharing the same codes.  Layers of
    other kinds (Conv) are decoded, alone.  Raises ValueError naming any parameter or buffer left unfilled.
    The tensors it takes are removed from ``tensors`` as it goes (peak memory: pass a copy to keep them).
    ``pack``: pack int8 weights for fbgemm now (else at the first CPU forward)."""
    built, freed = {}, 0
    for name, e in meta["layers"].items():
        like = model.get_submodule(name)
        new = runtime_layer(like, name, e, tensors)
        if new is None:
            logger.warning("runtime: layer %s (%s) has no compressed kernel; decoding it", name, type(like).__name__)
            part = decode({k: v for k, v in tensors.items() if k.startswith(name + ".")},
                          {"layers": {name: e}, "dense": {}, "aliases": {}})
            _set_tensor(model, f"{name}.weight", part[f"{name}.weight"])
            continue
        built[name] = new
        _set_submodule(model, name, new)
        for part in ("codes", "centroids", "centroids_scale", "qweight", "qscale"):
            t = tensors.pop(f"{name}.{part}", None)  # the file's copy goes as soon as the layer holds its own
            freed += 0 if t is None else t.numel() * t.element_size()
        if pack and isinstance(new, IntLinear):
            new.pack_()
        if freed > RELEASE_EVERY:  # int8: the file's bytes, their int8 form and fbgemm's packing leave holes
            release_freed_memory()
            freed = 0
    for key, e in meta["dense"].items():
        _set_tensor(model, key, tensors.pop(key).to(DTYPES[e["dtype"]]))
    for key, target in meta["aliases"].items():
        if target in meta["dense"]:  # a tied copy of an uncompressed tensor: the same tensor
            owner, _, attr = target.rpartition(".")
            _set_tensor(model, key, getattr(model.get_submodule(owner), attr).data)
            continue
        owner, _, attr = key.rpartition(".")
        like, src = model.get_submodule(owner), built.get(target)
        if attr == "weight" and isinstance(like, nn.Linear) and src is not None and owner not in built:
            new = _alias_linear(like, src)
            _set_submodule(model, owner, new)
            built[owner] = new
            if pack and isinstance(new, IntLinear):
                new.pack_()  # a second (packed) copy of a tied int8 weight: fbgemm needs its own layout
        else:  # e.g. RoBERTa's lm_head.weight, a bare Parameter read by F.linear
            logger.warning("runtime: %s is a tied copy of %s that is not a Linear layer; decoding it", key, target)
            _set_tensor(model, key, built[target].weight if target in built else model.get_submodule(target).weight)
    release_freed_memory()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the .qnz does not fill {len(left)} tensors of the model ({', '.join(left[:4])}); "
                         f"the file does not belong to this architecture")
    return model.eval()


RELEASE_EVERY = 4 << 20  # bytes of file tensors dropped between two ``release_freed_memory`` calls (16 MiB: the
# 16x1024 int8 LM's load peak was 1.16x its file, 4 MiB: 1.09x, scripts/bench_load_rss.py; a trim takes < 1 ms)


@functools.lru_cache(None)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):  # another libc: its own policy
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).  Loading frees each layer's
    file bytes as the layer is built, but glibc keeps the freed holes between the live blocks: without
    this, an int8 model's resident memory stays at ~2x the file after loading (a 16x1024 LM: 2.1x, with
    it 1.07x; ``/tmp``-style measurement in BENCHMARKS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _alias_linear(like: nn.Linear, src: nn.Module) -> nn.Module:
    """A runtime Linear computing with ``src``'s stored weight (same buffers, no copy)."""
    if isinstance(src, _PQ):
        new = CodesLinear(like.in_features, like.out_features, src.codes, src.centroids, like.bias)
    else:
        new = IntLinear(like.in_features, like.out_features, src.qweight, src.qscale, src.bits, src.width, like.bias)
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, new)


def runtime_summary(model: nn.Module) -> Dict[str, int]:
    """{"CodesLinear kernel=auto": count, ...}: which runtime layers a model holds."""
    out: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, RuntimeMixin):
            key = f"{type(m).__name__}[{m.kind}]"
            out[key] = out.get(key, 0) + 1
    return out


def load_qnz(path, data: Optional[str] = None, decoded: bool = False):
    """The fairseq model of a ``.qnz``, running compressed: built on the ``meta`` device and filled with
    runtime layers, so no fp32 copy of a compressed weight is made (``decoded=True``: the plain fp32
    model instead, as ``quantnoise decompress`` + fairseq would load it).  ``data``: the folder holding
    the model's dictionary (default: the training data path stored in the file).  Returns (model, cfg, task)."""
    return _plugin().load_model(path, data=data, decoded=decoded)


def _plugin():
    """quantnoise/qn_fairseq/runtime.py, imported as fairseq's ``--user-dir`` imports the plugin (top-level
    ``qn_fairseq``), so its models are registered once whichever way a process imports it first."""
    import importlib
    import sys

    from .commands.user_dir import plugin_dir

    if "qn_fairseq" not in sys.modules:
        sys.path.insert(0, str(plugin_dir().parent))
    return importlib.import_module("qn_fairseq.runtime")
