"""``save_qnz(model, path)`` / ``load_qnz(path, model)``: the ``.qnz`` of any module tree, and a model filled
from one with runtime layers that compute from the stored codes / int weights (no fp32 copy of a compressed
weight is made).  The file format is quantnoise/export.py's; the filling is quantnoise/runtime/load.py's
``fill_model_``, the code the fairseq loader (``runtime.load_fairseq``, ``fairseq-eval-lm --path m.qnz``) runs.

    compress_(model, LayerRule(block_size=8, n_centroids=256)); save_qnz(model, "m.qnz")
    with torch.device("meta"): fresh = build_model()      # no memory, no random init
    load_qnz("m.qnz", fresh)                              # runs compressed
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from torch import Tensor, nn

from .compress.layers import CompressedMixin
from .export import ExportOptions, encode, read_qnz, unpack, write_qnz
from .runtime.layers import RuntimeMixin

_STATE_KEYS = ("codes", "centroids", "weight_size", "qweight", "qscale", "qbits")


def save_qnz(model: nn.Module, path, opts: ExportOptions = ExportOptions()) -> dict:
    """Write ``model`` (compressed by ``compress_``, loaded compressed by ``load_qnz``, or neither) as a .qnz,
    atomically; return its JSON map.  Layers sharing one codebook (tied weights) are stored once, the others as
    aliases of the first.  ``opts``: everything not compressed is stored in ``opts.rest_dtype`` (float16 by default,
    float32 on request), pq codebooks in ``opts.centroids_dtype`` (float16; float32, exactly; or int8 + one scale)."""
    tensors, meta = encode_model(model, opts)
    write_qnz(path, tensors, meta)
    return meta


def encode_model(model: nn.Module, opts: ExportOptions = ExportOptions()) -> Tuple[Dict[str, Tensor], dict]:
    """(tensors, JSON map) of the .qnz of ``model``: what ``save_qnz`` writes.  A runtime layer (a model loaded
    compressed) is stored as the compressed layer it was loaded from: the same codes, codebook, int values and
    scales, so a loaded model re-saves to the file it came from."""
    state = model.state_dict()
    owner: Dict[tuple, str] = {}  # storage of a codebook's codes / int weights -> first layer holding it
    aliases: Dict[str, str] = {}
    transposed: List[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, (CompressedMixin, RuntimeMixin)):
            continue
        key = _storage_key(m)
        if key not in owner:
            owner[key] = name
            if m.weight_transposed:
                transposed.append(name)
            if isinstance(m, RuntimeMixin):
                for part in _RUNTIME_KEYS:
                    state.pop(f"{name}.{part}", None)
                state.update({f"{name}.{k}": v for k, v in _compressed_state(m).items()})
            continue
        for part in _STATE_KEYS:
            state.pop(f"{name}.{part}", None)
        aliases[f"{name}.weight"] = owner[key]
    tensors, meta = encode(state, {}, opts)
    for name in transposed:
        meta["layers"][name]["transposed"] = True
    meta["aliases"].update(aliases)
    return tensors, meta


_RUNTIME_KEYS = ("codes", "centroids", "qweight", "qscale")


def _storage_key(m: nn.Module) -> tuple:
    """Layers computing from one stored weight (tied) give the same key: the memory of their codes (pq) or scales
    (int-N: a runtime alias may hold its own fbgemm copy of the int weights, never its own scales)."""
    t = m.codes if _is_pq(m) else m.qscale
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def _is_pq(m: nn.Module) -> bool:
    return (m.kind if isinstance(m, RuntimeMixin) else m.scheme) == "pq"


def _compressed_state(m: nn.Module) -> Dict[str, Tensor]:
    """A runtime layer's weight as ``encode`` reads a compressed layer's: pq ``codes`` / ``centroids``, int
    ``qweight`` (the int values q, (out, in)) / ``qscale`` (one per group of rows sharing a scale) / ``qbits``;
    and ``weight_size``."""
    import torch

    out, inn = m.weight_shape
    state = {"weight_size": torch.tensor(m.weight_shape)}
    if m.kind == "pq":
        return {**state, "codes": m.codes, "centroids": m.centroids}
    qmax = 2 ** (m.bits - 1) - 1
    if m.width == 8:
        q = m.int8_weight()
    else:  # the packed values q + qmax (runtime_width bits each)
        q = (unpack(m.qweight, m.width, out * inn).to(torch.int16) - qmax).to(torch.int8).reshape(out, inn)
    scale = m.qscale.reshape(out)  # one per row as the runtime holds it; stored one per group of equal rows
    rows = next(d for d in range(out, 0, -1) if out % d == 0 and bool((scale.reshape(-1, d) == scale[::d, None]).all()))
    return {**state, "qweight": q, "qscale": scale[::rows].reshape(-1, 1).contiguous(), "qbits": torch.tensor(m.bits)}


def load_qnz(path, model: nn.Module, pack: bool = True) -> nn.Module:
    """Fill ``model`` (built on any device, ``meta`` included: no memory, no random init) from the .qnz at
    ``path``: runtime layers for its compressed Linear / Embedding / Conv1D (GPT-2) layers, every other tensor
    as stored.  ``model`` is the plain architecture the file was saved from.  ValueError (one line) when the file
    does not fit it (names missing or extra, shapes), before anything is changed.  Returns ``model`` in eval."""
    tensors, meta = read_qnz(path)
    check_fits(model, meta, tensors, os.fspath(path))
    from .runtime.load import fill_model_

    return fill_model_(model, tensors, meta, pack=pack)


def check_fits(model: nn.Module, meta: dict, tensors: Dict[str, Tensor], path: str = "the .qnz") -> None:
    """ValueError naming what differs unless the file's tensors are exactly ``model``'s state dict, shapes
    included, and every non-persistent buffer of the model (which no file holds) is already materialized."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {f"{n}.weight": tuple(e["shape"])[::-1 if e.get("transposed") else 1] for n, e in meta["layers"].items()}
    stored.update({k: tuple(tensors[k].shape) for k in meta["dense"]})
    stored.update({k: None for k in meta["aliases"]})
    fix = f"load it into the architecture it was saved from ({type(model).__name__} here)"
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(f"{path} does not fit the model: {len(missing)} of the model's tensors are not in the file "
                         f"({', '.join(missing[:3]) or '-'}), {len(extra)} of the file's are not in the model "
                         f"({', '.join(extra[:3]) or '-'}); {fix}")
    wrong = [f"{k} {list(s)} in the file, {list(expected[k])} in the model" for k, s in stored.items()
             if s is not None and s != expected[k]]
    if wrong:
        raise ValueError(f"{path} does not fit the model: {len(wrong)} shapes differ ({'; '.join(wrong[:2])}); {fix}")
    unset = [f"{n}.{b}".lstrip(".") for n, m in model.named_modules() for b, t in m._buffers.items()
             if t is not None and t.is_meta and b in m._non_persistent_buffers_set]
    if unset:
        raise ValueError(f"the model's non-persistent buffers {', '.join(unset[:3])} are on the meta device and no file "
                         f"holds them: build the model with only its parameters on meta (accelerate's "
                         f"init_empty_weights(), or quantnoise.hf.from_pretrained for a transformers folder)")
