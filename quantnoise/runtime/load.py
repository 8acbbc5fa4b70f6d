"""Fill a model with runtime layers from a ``.qnz``'s tensors: the model is built on the ``meta`` device
(no memory, no random init), its compressed Linear / Embedding layers become quantnoise.runtime.layers' layers
holding the file's codes / int weights (no fp32 copy of a compressed weight is made), its other tensors are
set as they are.  ``quantnoise.load_qnz(path, model)`` does it for any model, ``load_fairseq`` for a fairseq
model (quantnoise/qn_fairseq/runtime.py); both go through ``fill_model_``.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .. import extensions
from ..export import DTYPES, decode, legacy_pack_width, pack, unpack
from ..compress.layers import mixed_class
from ..nn import QuantNoiseMixin, set_submodule
from . import layers as runtime_layers
from .layers import CodesEmbedding, CodesLinear, IntEmbedding, IntLinear, RuntimeMixin, _PQ

logger = logging.getLogger(__name__)


def runtime_width(bits: int) -> int:
    """Bits per value the runtime holds an int-N weight in: 2, 4 or 8, the widths its kernels run (int2 / int4:
    the packed bytes are pq codes over a 256-entry codebook; int8: fbgemm).  So int3 runs int4's kernels, held
    4 bits wide in memory (the file stores 3), and int5-7 run int8's, held as int8."""
    return legacy_pack_width(bits)


def stored_int(packed: Tensor, bits: int, width: int, shape) -> Tensor:
    """The runtime form of an int-N weight stored ``width`` bits wide: for ``runtime_width(bits)`` 8, int8
    (out, in) (q = u - qmax; for width 8 the same bytes), otherwise the values packed ``runtime_width`` bits
    wide (the file's bytes as they are when the file stores them so; int3 is repacked 3 -> 4 bits)."""
    rw, n = runtime_width(bits), math.prod(shape)
    if width != rw:
        u = unpack(packed, width, n)
        packed = u if rw == 8 else pack(u, rw)
    if rw != 8:
        return packed
    return torch.sub(packed, 2 ** (bits - 1) - 1).view(torch.int8).reshape(shape)  # u - qmax mod 256: no int16 copy


def _centroids(tensors: Dict[str, Tensor], name: str, e: dict) -> Tensor:
    c = tensors[f"{name}.centroids"].float()  # fp16 -> fp32 exactly (fp32: as stored); (k, bs): a few KB
    if e["centroids"] == "int8":
        c = c * tensors[f"{name}.centroids_scale"].float()
    return c


def runtime_layer(like: nn.Module, name: str, e: dict, tensors: Dict[str, Tensor]) -> nn.Module:
    """The compressed runtime layer replacing ``like`` (a plain Linear / Embedding, on any device), built
    from the .qnz tensors of layer ``name`` (map entry ``e``); its bias is ``like``'s until filled."""
    shape, extra = tuple(e["shape"]), extensions.runtime_classes(like)
    if bool(e.get("transposed")) != bool(extra and extra[0].weight_transposed):
        raise ValueError(f"layer {name}: the .qnz stores {'a transposed' if e.get('transposed') else 'an (out, in)'} "
                         f"weight but the model's layer there is a {type(like).__name__}; the file does not belong "
                         f"to this architecture")
    if tuple(like.weight.shape)[::-1 if e.get("transposed") else 1] != shape:
        raise ValueError(f"layer {name}: the .qnz stores shape {list(shape)} but the model has "
                         f"{list(like.weight.shape)}; the file does not belong to this architecture")
    pq = e["scheme"] == "pq"
    if not pq:
        q, scale = stored_int(tensors[f"{name}.qweight"], e["bits"], e["pack_width"], shape), tensors[f"{name}.qscale"]
        scale = scale.repeat_interleave(e.get("rows_per_scale", 1), 0)  # group-wise -> one per row, exactly
    own = not _keeps_base_forward(like)
    if own and not _delegates_to_base(like):  # e.g. fairseq's LearnedPositionalEmbedding: F.embedding(self.weight)
        return None
    if isinstance(like, nn.Linear) or extra:  # extra: e.g. GPT-2's Conv1D, a Linear of W.T
        codes_cls, int_cls = extra or (CodesLinear, IntLinear)
        bias = like.bias
        if pq:
            new = codes_cls(shape[1], shape[0], tensors[f"{name}.codes"], _centroids(tensors, name, e), bias)
        else:
            new = int_cls(shape[1], shape[0], q, scale, e["bits"], runtime_width(e["bits"]), bias)
    elif isinstance(like, nn.Embedding) and like.max_norm is None:
        if pq:
            new = CodesEmbedding(shape[0], shape[1], tensors[f"{name}.codes"], _centroids(tensors, name, e),
                                 like.padding_idx)
        else:
            new = IntEmbedding(shape[0], shape[1], q, scale, e["bits"], runtime_width(e["bits"]), like.padding_idx)
    else:
        return None  # Conv etc.: decoded by fill_model_
    return _with_own_forward(new, like) if own else new


def _delegates_to_base(like: nn.Module) -> bool:
    """A Linear / Embedding subclass whose own forward prepares its input and hands it to the base forward
    (``super().forward(...)``): transformers' OPT / BART position tables (positions + an offset), BART's scaled word
    embedding (``super().forward(ids) * embed_scale``).  Its runtime layer keeps that forward (``_with_own_forward``),
    whose ``super().forward`` is then the runtime lookup / product; anything else it reads of ``self.weight`` is the
    runtime layer's decoded weight, the same values."""
    code = getattr(type(like).forward, "__code__", None)
    return isinstance(like, (nn.Linear, nn.Embedding)) and code is not None and \
        {"super", "forward"} <= set(code.co_names)


def _with_own_forward(new: nn.Module, like: nn.Module) -> nn.Module:
    """``new`` (a runtime layer) as the runtime subclass of ``like``'s class: ``Codes<Kind>(Kind, CodesEmbedding)``
    (MRO: Kind's forward, then the runtime layer's), ``like``'s own plain attributes (offset, embed_scale) and its
    own parameters / buffers / submodules beyond the weight (filled from the file like any other tensor) kept."""
    kind = type(like)
    base = type(new)
    prefix = base.__name__[: -len("Embedding")] if base.__name__.endswith("Embedding") else base.__name__[: -len("Linear")]
    new.__class__ = mixed_class(kind, base, f"{prefix}{kind.__name__}", vars(runtime_layers))
    for key, value in vars(like).items():
        if not key.startswith("_") and key not in new.__dict__ and not isinstance(value, (Tensor, nn.Module)):
            new.__dict__[key] = value
    for store in ("_parameters", "_buffers", "_modules"):
        own, mine = getattr(like, store), getattr(new, store)
        for key, value in own.items():
            if key not in mine and key != "weight":
                mine[key] = value
    return new


def _keeps_base_forward(like: nn.Module) -> bool:
    """A runtime layer computes what nn.Linear / nn.Embedding's own forward computes: only a layer whose
    forward is that one (or a quant-noise wrapper of such a layer, the same thing in eval) may be replaced."""
    if isinstance(like, QuantNoiseMixin) or extensions.runtime_classes(like) is not None:
        return True
    return any(isinstance(like, base) and type(like).forward is base.forward for base in (nn.Linear, nn.Embedding))


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    """Replace the existing parameter or buffer ``key`` (checked by ``check_keys``; never a new attribute)."""
    owner, _, attr = key.rpartition(".")
    mod = model.get_submodule(owner)
    if attr in mod._buffers:
        mod._buffers[attr] = value
    elif attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        raise ValueError(f"the .qnz sets {key!r}, which is no parameter or buffer of the model")


def check_keys(model: nn.Module, tensors: Dict[str, Tensor], meta: dict) -> None:
    """ValueError (one line) unless every key of a checked map (``quantnoise.export.check_map``) names a tensor of
    ``model`` as built (on ``meta``) by the model's own code, with the shape the file gives it: a compressed layer
    is a module with that ``weight``; a dense tensor or an alias is a parameter or buffer of ``model.state_dict()``
    that no compressed layer owns (its bias aside), of the same shape (and, dense, of the same kind: floating or
    not).  So a file can only fill the model, never add attributes to it or replace a runtime layer's buffers."""
    state = model.state_dict(keep_vars=True)

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise ValueError(f"{why}; the file does not belong to this architecture")

    shapes = {}  # compressed layer -> the shape of its weight in the model ((in, out) for a transposed one)
    for name, e in meta["layers"].items():
        need(f"{name}.weight" in state, f"the .qnz compresses layer {name!r}, which is no layer with a weight in the model")
        have, shapes[name] = list(state[f"{name}.weight"].shape), list(e["shape"])[::-1 if e.get("transposed") else 1]
        need(have == shapes[name], f"layer {name}: the .qnz stores shape {shapes[name]} but the model has {have}")
    for key, e in meta["dense"].items():
        need(key in state, f"the .qnz stores tensor {key!r}, which is no parameter or buffer of the model")
        t, have = tensors[key], state[key]
        need(list(t.shape) == list(have.shape),
             f"tensor {key}: the .qnz stores shape {list(t.shape)} but the model has {list(have.shape)}")
        need(DTYPES[e["dtype"]].is_floating_point == have.dtype.is_floating_point,
             f"tensor {key}: the .qnz stores a {e['dtype']} tensor but the model's is {str(have.dtype)[6:]}")
    for key, target in meta["aliases"].items():
        need(key in state, f"the .qnz ties {key!r}, which is no parameter or buffer of the model, to {target!r}")
        shape = shapes[target] if target in shapes else list(tensors[target].shape)
        need(list(state[key].shape) == shape,
             f"{key} is tied to {target} in the .qnz, of shape {shape}, but the model's has {list(state[key].shape)}")
        kind = DTYPES[meta["dense"][target]["dtype"]] if target in meta["dense"] else DTYPES[meta["layers"][target]["dtype"]]
        need(kind.is_floating_point == state[key].dtype.is_floating_point,
             f"{key} is tied to {target}, a {str(kind)[6:]} tensor, but the model's is {str(state[key].dtype)[6:]}")


def fill_model_(model: nn.Module, tensors: Dict[str, Tensor], meta: dict, pack: bool = True) -> nn.Module:
    """Put the .qnz's contents into ``model`` (built on the ``meta`` device, or anywhere): runtime layers for
    its compressed Linear / Embedding layers, its other tensors as they are (in their original dtype), and
    a tied copy of a compressed weight (``aliases``) as a runtime Linear sharing the same codes.  Layers of
    other kinds (Conv) are decoded, alone.  Raises ValueError naming any parameter or buffer left unfilled.
    The tensors it takes are removed from ``tensors`` as it goes (peak memory: pass a copy to keep them).
    ``pack``: pack int8 weights for fbgemm now (else at the first CPU forward).  ``meta`` must be a checked map
    (``quantnoise.export.read_qnz``); its keys are checked against the model first (``check_keys``)."""
    extensions.ensure_for(model)
    check_keys(model, tensors, meta)
    built, freed = {}, 0
    names: Dict[int, List[str]] = {}  # a module under several names (fairseq's shared embed_tokens): one runtime layer
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for name, e in meta["layers"].items():
        like = model.get_submodule(name)
        new = runtime_layer(like, name, e, tensors)
        if new is None:
            logger.warning("runtime: layer %s (%s) has no compressed kernel; decoding it", name, type(like).__name__)
            part = decode({k: v for k, v in tensors.items() if k.startswith(name + ".")},
                          {"layers": {name: e}, "dense": {}, "aliases": {}})
            _set_tensor(model, f"{name}.weight", part[f"{name}.weight"])
            continue
        for n in names.get(id(like), [name]):
            built[n] = new
            set_submodule(model, n, new)
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
        if attr == "weight" and src is not None and built.get(owner) is src:  # the same module: filled already
            continue
        new = _alias_layer(like, src) if attr == "weight" and src is not None and owner not in built else None
        if new is not None:
            for n in names.get(id(like), [owner]):
                built[n] = new
                set_submodule(model, n, new)
            if pack and isinstance(new, IntLinear):
                new.pack_()  # src packed: shares its copy already; src unpacked (pack=False): packs its own
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
# 16x1024 int8 LM's load peak was 1.16x its file, 4 MiB: 1.09x, benchmarks/load_rss.py; a trim takes < 1 ms)


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


def _alias_layer(like: nn.Module, src: nn.Module) -> Optional[nn.Module]:
    """The runtime layer replacing ``like``, a Linear / Embedding whose weight is a tied copy of the runtime layer
    ``src``'s: computing with ``src``'s stored weight (the same buffers, no copy), ``like``'s own forward kept where
    it hands its input to the base forward (BART's encoder / decoder ``embed_tokens``, scaled word embeddings tied to
    ``shared``); None for any other layer (decoded)."""
    own = not _keeps_base_forward(like)
    if own and not _delegates_to_base(like):
        return None
    if isinstance(like, nn.Linear):
        new = _alias_linear(like, src)
    elif isinstance(like, nn.Embedding) and like.max_norm is None:
        if isinstance(src, _PQ):
            new = CodesEmbedding(like.num_embeddings, like.embedding_dim, src.codes, src.centroids, like.padding_idx)
        else:
            q = src.int8_weight() if src.width == 8 else src.qweight
            new = IntEmbedding(like.num_embeddings, like.embedding_dim, q, src.qscale, src.bits, src.width,
                               like.padding_idx)
    else:
        return None
    return _with_own_forward(new, like) if own else new


def _alias_linear(like: nn.Linear, src: nn.Module) -> nn.Module:
    """A runtime Linear computing with ``src``'s stored weight (same buffers, no copy)."""
    if isinstance(src, _PQ):
        return CodesLinear(like.in_features, like.out_features, src.codes, src.centroids, like.bias)
    q = src.int8_weight() if src.width == 8 else src.qweight  # src packed: its qweight is gone (a transient copy)
    new = IntLinear(like.in_features, like.out_features, q, src.qscale, src.bits, src.width, like.bias)
    if src._packed is not None:  # fbgemm's packed weight holds no bias: both layers compute with the one copy
        new._share_packed(src._packed)
    return new


def runtime_summary(model: nn.Module) -> Dict[str, int]:
    """{"CodesLinear kernel=auto": count, ...}: which runtime layers a model holds."""
    out: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, RuntimeMixin):
            key = f"{type(m).__name__}[{m.kind}]"
            out[key] = out.get(key, 0) + 1
    return out


def load_fairseq(path, data: Optional[str] = None, decoded: bool = False):
    """The fairseq model of a ``.qnz``, running compressed: built on the ``meta`` device and filled with
    runtime layers, so no fp32 copy of a compressed weight is made (``decoded=True``: the plain fp32
    model instead, as ``quantnoise decompress`` + fairseq would load it).  ``data``: the folder holding
    the model's dictionary (default: the training data path stored in the file).  Returns (model, cfg, task)."""
    return fairseq_plugin().load_model(path, data=data, decoded=decoded)


def fairseq_plugin():
    """quantnoise/qn_fairseq/runtime.py, imported as fairseq's ``--user-dir`` imports the plugin (top-level
    ``qn_fairseq``), so its models are registered once whichever way a process imports it first."""
    from ..commands.user_dir import import_plugin

    return import_plugin().runtime
