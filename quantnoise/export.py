"""The ``.qnz`` container: a compressed model in one safetensors file, described by a JSON map.

Layout (format version 1).  A safetensors file whose ``__metadata__`` holds
  - ``qnz``: the JSON map  {"format": "quantnoise.qnz", "format_version": 1, "fairseq": {"cfg": ...,
    "num_updates": N}, "layers": {name: {"scheme": "pq"|"scalar", "shape": [...], ...}},
    "dense": {key: {"dtype": original dtype}}, "aliases": {key: target key}, "crc32": {tensor: crc}};
  - ``qnz_crc32``: the CRC-32 of that JSON text (a damaged map is caught before it is trusted).
and the tensors
  - pq layer L:      ``L.codes`` uint8 (k <= 256) | int16, ``L.centroids`` fp16 | int8
                     (+ ``L.centroids_scale`` fp32 (1,), symmetric per-layer scale, for int8);
  - scalar layer L:  ``L.qweight`` uint8, the values q + qmax packed 8 / width per byte (width 2, 4
                     or 8 bits, little end first), ``L.qscale`` fp32 (out, 1);
  - everything else: fp16 or fp32 (floats; other dtypes as they are).
Loading reads safetensors and JSON only (never unpickles) and checks format, version and the
CRC-32 of every tensor: a truncated, damaged or foreign file is one ValueError line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .checkpoint import atomic_write

FORMAT, VERSION = "quantnoise.qnz", 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "bool": torch.bool}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class ExportOptions:
    rest_dtype: str = field(default="float16", metadata={"help": "dtype of the tensors that are not compressed: float16 | float32"})
    centroids_dtype: str = field(default="float16", metadata={"help": "pq codebooks: float16 | int8 (iPQ + int8 centroids)"})

    def __post_init__(self) -> None:
        if self.rest_dtype not in ("float16", "float32"):
            raise ValueError(f"export rest dtype {self.rest_dtype!r} is invalid: choose float16 or float32")
        if self.centroids_dtype not in ("float16", "int8"):
            raise ValueError(f"export centroids dtype {self.centroids_dtype!r} is invalid: choose float16 or int8")


# ------------------------------------------------------------------------------ bit packing
def pack_width(bits: int) -> int:
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack(u: Tensor, width: int) -> Tensor:
    """uint8 values < 2**width, flat, -> ceil(n * width / 8) bytes, earliest value in the low bits."""
    per = 8 // width
    u = u.reshape(-1).to(torch.uint8)
    u = torch.cat([u, u.new_zeros((-u.numel()) % per)]).reshape(-1, per)  # (bytes, per)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return (u << shifts).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack(b: Tensor, width: int, n: int) -> Tensor:
    shifts = torch.arange(0, 8, width, dtype=torch.uint8)
    return ((b.reshape(-1, 1) >> shifts) & (2**width - 1)).reshape(-1)[:n]


# ------------------------------------------------------------------------------- encoding
def compressed_layers(state: Dict[str, Tensor]) -> Dict[str, str]:
    """{layer name: "pq" | "scalar"} of a state dict holding iPQ / scalar layers."""
    out = {}
    for key in state:
        if key.endswith(".codes") and key[:-5] + "centroids" in state:
            out[key[: -len(".codes")]] = "pq"
        elif key.endswith(".qweight") and key[:-7] + "qscale" in state:
            out[key[: -len(".qweight")]] = "scalar"
    return out


def _decode_pq(codes: Tensor, centroids: Tensor, shape) -> Tensor:
    return centroids[codes.long()].reshape(shape)  # (out, ...) = codebook[codes], exactly


def _json_default(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, argparse.Namespace):  # cfg.model of fairseq's argparse models (transformer, roberta)
        return vars(obj)
    raise ValueError(f"fairseq config value {obj!r} ({type(obj).__name__}) cannot be stored as JSON")


def encode(state: Dict[str, Tensor], fairseq: dict, opts: ExportOptions) -> Tuple[Dict[str, Tensor], dict]:
    """(tensors, JSON map) of the .qnz holding ``state``: a model state dict whose compressed layers
    are stored as ``L.codes``/``L.centroids``/``L.weight_size`` (pq) or ``L.qweight``/``L.qscale``/
    ``L.qbits``/``L.weight_size`` (scalar), the state dicts of quantnoise.ipq's layers."""
    layers = compressed_layers(state)
    tensors: Dict[str, Tensor] = {}
    meta = {"format": FORMAT, "format_version": VERSION, "fairseq": fairseq, "layers": {}, "dense": {}, "aliases": {}}
    owned, decoded = set(), {}  # decoded: shape -> [(layer, weight)], to store tied copies as aliases
    for name, kind in layers.items():
        shape = [int(v) for v in state[f"{name}.weight_size"].tolist()]
        if kind == "pq":
            codes, cents = state[f"{name}.codes"], state[f"{name}.centroids"].detach()
            owned.update(f"{name}.{s}" for s in ("codes", "centroids", "weight_size"))
            tensors[f"{name}.codes"] = codes.reshape(-1).contiguous()
            if opts.centroids_dtype == "int8":
                c = cents.float()
                scale = c.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / 127
                tensors[f"{name}.centroids"] = torch.round(c / scale).clamp_(-127, 127).to(torch.int8)
                tensors[f"{name}.centroids_scale"] = scale.reshape(1)
            else:
                tensors[f"{name}.centroids"] = cents.to(torch.float16).contiguous()
            meta["layers"][name] = {"scheme": "pq", "shape": shape, "block_size": int(cents.shape[1]),
                                    "n_centroids": int(cents.shape[0]), "codes": dtype_name(codes.dtype),
                                    "centroids": opts.centroids_dtype, "dtype": dtype_name(cents.dtype)}
            weight = _decode_pq(codes, cents, shape)
        else:
            q, scale, bits = state[f"{name}.qweight"], state[f"{name}.qscale"], int(state[f"{name}.qbits"])
            owned.update(f"{name}.{s}" for s in ("qweight", "qscale", "qbits", "weight_size"))
            qmax, width = 2 ** (bits - 1) - 1, pack_width(bits)
            tensors[f"{name}.qweight"] = pack((q.to(torch.int16) + qmax).to(torch.uint8), width)
            tensors[f"{name}.qscale"] = scale.float().contiguous()
            meta["layers"][name] = {"scheme": "scalar", "shape": shape, "bits": bits, "pack_width": width,
                                    "dtype": "float32"}
            weight = (q.float() * scale.float()).reshape(shape)
        decoded.setdefault(tuple(shape), []).append((name, weight))
    rest = DTYPES[opts.rest_dtype]
    for key, t in state.items():
        if key in owned:
            continue
        t = t.detach()
        tied = next((n for n, w in decoded.get(tuple(t.shape), []) if t.dtype.is_floating_point
                     and torch.equal(t.float(), w.float())), None)
        if tied is not None:  # e.g. an output projection tied to a quantized embedding
            meta["aliases"][key] = tied
            continue
        meta["dense"][key] = {"dtype": dtype_name(t.dtype)}
        tensors[key] = (t.to(rest) if t.dtype.is_floating_point else t).contiguous()
    meta["crc32"] = {k: _crc(t) for k, t in tensors.items()}
    return tensors, meta


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def save_qnz(path, state: Dict[str, Tensor], fairseq: dict, opts: ExportOptions = ExportOptions()) -> dict:
    """Write the .qnz atomically (temp file + rename); return its JSON map."""
    from safetensors.torch import save

    tensors, meta = encode(state, fairseq, opts)
    text = json.dumps(meta, sort_keys=True, default=_json_default)
    blob = save(tensors, metadata={"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode()))})
    atomic_write(path, lambda tmp: _write_bytes(tmp, blob))
    return meta


def _write_bytes(path: str, blob: bytes, chunk: int = 1 << 24) -> None:
    with open(path, "wb") as f:
        for i in range(0, len(blob), chunk):
            f.write(blob[i : i + chunk])


# -------------------------------------------------------------------------------- decoding
def read_qnz(path) -> Tuple[Dict[str, Tensor], dict]:
    """(stored tensors, JSON map) of a .qnz, checked; ValueError (one line) for anything else."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise OSError(f"{path} does not exist")

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid .qnz file: {why}; re-export it with `quantnoise export`")

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise bad(f"unreadable safetensors data, truncated or corrupt ({str(e).splitlines()[0]})") from None
    text = header.get("qnz")
    if text is None:
        raise bad("no quantnoise map in its header (a safetensors file from elsewhere?)")
    if str(zlib.crc32(text.encode())) != header.get("qnz_crc32"):
        raise bad("its JSON map fails its CRC-32 check (corrupt header)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"its JSON map does not parse ({e})") from None
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != VERSION:
        raise ValueError(f"{path} has .qnz format version {meta.get('format_version')!r}; this quantnoise reads "
                         f"version {VERSION}: use the quantnoise release that wrote it, or re-export")
    crc = meta.get("crc32", {})
    if set(crc) != set(tensors):
        missing, extra = sorted(set(crc) - set(tensors)), sorted(set(tensors) - set(crc))
        raise bad(f"tensors missing {missing[:3]} / unexpected {extra[:3]}")
    for k, t in tensors.items():
        if _crc(t) != crc[k]:
            raise bad(f"tensor {k!r} fails its CRC-32 check (corrupt data)")
    return tensors, meta


def decode(tensors: Dict[str, Tensor], meta: dict) -> Dict[str, Tensor]:
    """The ordinary model state dict: compressed layers as ``L.weight`` = codebook[codes] (or q * scale),
    other tensors in their original dtype, aliases as the same tensor as their target."""
    state: Dict[str, Tensor] = {}
    try:
        for name, e in meta["layers"].items():
            if e["scheme"] == "pq":
                cents = tensors[f"{name}.centroids"].float()
                if e["centroids"] == "int8":
                    cents = cents * tensors[f"{name}.centroids_scale"]
                w = _decode_pq(tensors[f"{name}.codes"], cents, e["shape"])
            else:
                n = math.prod(e["shape"])
                q = unpack(tensors[f"{name}.qweight"], e["pack_width"], n).to(torch.int16) - (2 ** (e["bits"] - 1) - 1)
                w = (q.float().reshape(e["shape"][0], -1) * tensors[f"{name}.qscale"]).reshape(e["shape"])
            state[f"{name}.weight"] = w.to(DTYPES[e["dtype"]])
        for key, e in meta["dense"].items():
            state[key] = tensors[key].to(DTYPES[e["dtype"]])
        for key, target in meta["aliases"].items():
            state[key] = state[f"{target}.weight"]
    except (KeyError, RuntimeError, TypeError) as err:
        raise ValueError(f"the .qnz map does not match its tensors ({type(err).__name__}: {err}); the file is "
                         f"corrupt: re-export it") from None
    return state


def load_qnz(path) -> Tuple[Dict[str, Tensor], dict]:
    """(ordinary fp32 state dict, JSON map) of a .qnz."""
    tensors, meta = read_qnz(path)
    return decode(tensors, meta), meta


# ---------------------------------------------------------------------------------- sizes
def layer_sizes(tensors: Dict[str, Tensor], meta: dict) -> List[dict]:
    """Per compressed layer / dense tensor: scheme, shape, bytes, bits per weight, bound bits."""
    rows = []
    for name, e in meta["layers"].items():
        keys = [k for k in tensors if k.startswith(name + ".") and k[len(name) + 1:] in
                ("codes", "centroids", "centroids_scale", "qweight", "qscale")]
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        n = math.prod(e["shape"])
        if e["scheme"] == "pq":
            k, bs = e["n_centroids"], e["block_size"]
            cbits = 8 if e["centroids"] == "int8" else 16
            bound = (n // bs) * math.ceil(math.log2(k)) + k * bs * cbits + (32 if cbits == 8 else 0)
            scheme = f"pq k={k} b={bs} {e['centroids']}"
        else:
            bound = n * e["bits"] + e["shape"][0] * 32
            scheme = f"int{e['bits']}"
        rows.append({"name": name, "scheme": scheme, "shape": e["shape"], "numel": n, "bytes": nbytes,
                     "bound_bits": bound, "fp32_bytes": 4 * n})
    for key, e in meta["dense"].items():
        t = tensors[key]
        n = t.numel()
        rows.append({"name": key, "scheme": dtype_name(t.dtype), "shape": list(t.shape), "numel": n,
                     "bytes": n * t.element_size(), "bound_bits": n * t.element_size() * 8,
                     "fp32_bytes": 4 * n if DTYPES[e["dtype"]].is_floating_point else n * t.element_size()})
    for key, target in meta["aliases"].items():
        shape = meta["layers"][target]["shape"]
        rows.append({"name": key, "scheme": f"alias of {target}", "shape": shape, "numel": math.prod(shape),
                     "bytes": 0, "bound_bits": 0, "fp32_bytes": 0})  # a tied tensor is stored once in fp32 too
    return rows


# ------------------------------------------------------------------- any PyTorch state dict
def save_state_dict(path, state: Dict[str, Tensor], opts: ExportOptions = ExportOptions()) -> dict:
    """Any model's state dict (a Hugging Face model's included) as a .qnz: layers compressed by
    quantnoise.ipq (``codes``/``qweight`` entries) stored compactly, every other tensor dense."""
    return save_qnz(path, state, {}, opts)


def load_state_dict(path) -> Dict[str, Tensor]:
    """The ordinary state dict of a .qnz written by ``save_state_dict`` (or ``save_qnz``), for
    ``model.load_state_dict``; compressed layers come back decoded."""
    return load_qnz(path)[0]
