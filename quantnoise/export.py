"""The ``.qnz`` container: a compressed model in one safetensors file, described by a JSON map.

Layout (format version 2; version 1 files, which stored int3 in 4 bits and int5-7 in 8, still load:
``pack_width`` in each layer's entry says how its values are stored).  A safetensors file whose ``__metadata__`` holds
  - ``qnz``: the JSON map  {"format": "quantnoise.qnz", "format_version": 2, "fairseq": {"cfg": ...,
    "num_updates": N}, "layers": {name: {"scheme": "pq"|"scalar", "shape": [...], ...}},
    "dense": {key: {"dtype": original dtype}}, "aliases": {key: target layer or dense key}, "crc32": {tensor: crc}};
  - ``qnz_crc32``: the CRC-32 of that JSON text (a damaged map is caught before it is trusted).
and the tensors
  - pq layer L:      ``L.codes`` uint8 (k <= 256) | int16, ``L.centroids`` fp16 | fp32 (exact) | int8
                     (+ ``L.centroids_scale`` fp32 (1,), symmetric per-layer scale, for int8);
  - scalar layer L:  ``L.qweight`` uint8, the values q + qmax of the flat weight as one bit stream of
                     ``pack_width`` = bits bits each (int3: 3 bits; see ``pack``), ``L.qscale`` fp32 (out / rows_per_scale, 1): one
                     scale per group of ``rows_per_scale`` consecutive rows (map key, default 1);
  - everything else: fp16 or fp32 (floats; other dtypes as they are).
A layer entry with ``"transposed": true`` (Hugging Face's GPT-2 ``Conv1D``, whose weight is (in, out)) stores
the (out, in) matrix ``weight.T`` like a Linear's: its ``shape`` is that matrix's, blocks run along input features.
Loading reads safetensors and JSON only (never unpickles) and checks format, version and the
CRC-32 of every tensor, then the map against the tensors (``check_map``: shapes, dtypes, sizes,
code range, pack widths, positive finite scales) before anything uses it: a truncated, damaged,
forged or foreign file is one ValueError line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import atomic_write
from .config import MAX_BLOCK_SIZE, is_int
from .nn import ACT_RANGES

FORMAT, VERSION = "quantnoise.qnz", 2
CENTROID_DTYPES = ("float16", "float32", "int8")  # how a pq codebook may be stored (ExportOptions.centroids_dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "bool": torch.bool}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class ExportOptions:
    rest_dtype: str = field(default="float16", metadata={"help": "dtype of the tensors that are not compressed: float16 | float32"})
    centroids_dtype: str = field(default="float16", metadata={"help": "pq codebooks: float16 | float32 (exactly the "
                                                                      "model's) | int8 (iPQ + int8 centroids)"})

    def __post_init__(self) -> None:
        if self.rest_dtype not in ("float16", "float32"):
            raise ValueError(f"export rest dtype {self.rest_dtype!r} is invalid: choose float16 or float32")
        if self.centroids_dtype not in CENTROID_DTYPES:
            raise ValueError(f"export centroids dtype {self.centroids_dtype!r} is invalid: choose float16, float32 or int8")


# ------------------------------------------------------------------------------ bit packing
# Format version 2 stores int-N values N bits wide (``pack_width(bits) == bits``); version 1 stored int3 in
# 4 bits and int5-7 in 8 (``legacy_pack_width``).  Both are the same layout, a bit stream: value i of the
# flat tensor (row-major, so rows need not start on a byte) occupies bits [i*w, (i+1)*w) of the stream,
# bit j of the stream being bit j % 8 of byte j // 8 (little end first); the last byte is zero-padded.
# For w = 2, 4, 8 that is exactly version 1's "8 / w values per byte, the earliest in the low bits".
READS = (1, 2)  # format versions this quantnoise reads
PACK_CHUNK = 1 << 20  # values packed / unpacked per step (int64 temporaries of 8 bytes per value)


def pack_width(bits: int) -> int:
    """Stored bits per int-N value in a .qnz of the current format version: N."""
    return int(bits)


def legacy_pack_width(bits: int) -> int:
    """Stored bits per int-N value in a version 1 .qnz: 2, 4 or 8 (int3 in 4 bits, int5-7 in 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def file_pack_width(bits: int, version: int) -> int:
    """The pack width a .qnz of format ``version`` must record for int``bits`` layers."""
    return legacy_pack_width(bits) if version == 1 else pack_width(bits)


def pack(u: Tensor, width: int) -> Tensor:
    """uint8 values < 2**width (any shape, read flat) -> ceil(n * width / 8) bytes, one bit stream (see above).
    Each group of 8 values is ``width`` bytes: summed into one int64 (8 * width <= 56 bits for width < 8), then
    cut into bytes."""
    u = u.reshape(-1).to(torch.uint8)
    n = u.numel()
    if width == 8:
        return u.clone()
    out = [_pack_chunk(u[s:s + PACK_CHUNK], width) for s in range(0, n, PACK_CHUNK)]  # PACK_CHUNK % 8 == 0
    return torch.cat(out)[: math.ceil(n * width / 8)] if out else u.new_zeros(0)


def _pack_chunk(u: Tensor, width: int) -> Tensor:
    if 8 % width == 0:  # 2, 4: 8 / width whole values per byte, shifted in uint8
        per = 8 // width
        g = torch.cat([u, u.new_zeros((-u.numel()) % per)]).reshape(-1, per)  # (bytes, per)
        return (g << torch.arange(0, 8, width, dtype=torch.uint8, device=u.device)).sum(1, dtype=torch.int32).to(torch.uint8)
    g = torch.cat([u, u.new_zeros((-u.numel()) % 8)]).reshape(-1, 8).long()  # (groups, 8)
    word = (g << torch.arange(0, 8 * width, width, device=u.device)).sum(1, keepdim=True)  # (groups, 1): 8*width bits
    return ((word >> torch.arange(0, 8 * width, 8, device=u.device)) & 255).to(torch.uint8).reshape(-1)  # (groups * width,)


def unpack(b: Tensor, width: int, n: int) -> Tensor:
    """The first ``n`` values (uint8) of the bit stream ``b`` of ``width``-bit values (the inverse of ``pack``)."""
    b = b.reshape(-1)
    if width == 8:
        return b[:n]
    step = PACK_CHUNK * width // 8  # bytes of PACK_CHUNK values (a multiple of 8 values: whole groups)
    out = [_unpack_chunk(b[s:s + step], width) for s in range(0, b.numel(), step)]
    return torch.cat(out)[:n] if out else b.new_zeros(0)


def _unpack_chunk(b: Tensor, width: int) -> Tensor:
    if 8 % width == 0:  # 2, 4
        return ((b.reshape(-1, 1) >> torch.arange(0, 8, width, dtype=torch.uint8, device=b.device)) & (2**width - 1)).reshape(-1)
    g = torch.cat([b, b.new_zeros((-b.numel()) % width)]).reshape(-1, width).long()  # (groups, width bytes)
    word = (g << torch.arange(0, 8 * width, 8, device=b.device)).sum(1, keepdim=True)  # (groups, 1)
    return ((word >> torch.arange(0, 8 * width, width, device=b.device)) & (2**width - 1)).to(torch.uint8).reshape(-1)


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


def _to_fp16(t: Tensor, key: str, fix: str) -> Tensor:
    """``t`` in fp16; ValueError naming ``key`` when a finite value is beyond fp16's range (it would
    be stored as inf) or ``t`` holds NaN/inf."""
    big = torch.finfo(torch.float16).max
    amax = t.detach().float().abs().max() if t.numel() else torch.tensor(0.0)
    if not torch.isfinite(amax) or amax > big:
        raise ValueError(f"{key}: {'values up to %g exceed' % float(amax) if torch.isfinite(amax) else 'NaN/inf in'} "
                         f"fp16's range (|x| <= {big:g}); {fix}")
    return t.to(torch.float16)


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
    ``L.qbits``/``L.weight_size`` (scalar), the state dicts of quantnoise.compress.layers's layers."""
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
            elif opts.centroids_dtype == "float32":  # the model's codebook exactly (fp32, or bf16 / fp16 widened)
                tensors[f"{name}.centroids"] = cents.float().contiguous()
            else:
                tensors[f"{name}.centroids"] = _to_fp16(cents, f"{name}.centroids",
                                                        "export with --centroids float32 or int8").contiguous()
            meta["layers"][name] = {"scheme": "pq", "shape": shape, "block_size": int(cents.shape[1]),
                                    "n_centroids": int(cents.shape[0]), "codes": dtype_name(codes.dtype),
                                    "centroids": opts.centroids_dtype, "dtype": dtype_name(cents.dtype)}
            weight = _decode_pq(codes, cents, shape)
        else:
            q, scale, bits = state[f"{name}.qweight"], state[f"{name}.qscale"], int(state[f"{name}.qbits"])
            if scale.numel() > shape[0] or bool((scale <= 0).any()):
                # LayerRule(grid=...): one signed scale per 32 weights: llama.cpp's layout (its codes down to
                # -2**(bits-1) are _check_int_range's to refuse, naming this fix too)
                raise ValueError(f"layer '{name}' is on a llama.cpp grid (one scale per 32 weights), which a .qnz does "
                                 f"not store; write it with quantnoise.hf.save_gguf, or compress it with grid=None")
            owned.update(f"{name}.{s}" for s in ("qweight", "qscale", "qbits", "weight_size"))
            qmax, width = 2 ** (bits - 1) - 1, pack_width(bits)
            _check_int_range(name, q, bits, qmax)  # q + qmax past width bits spills into the next value
            tensors[f"{name}.qweight"] = pack((q.to(torch.int16) + qmax).to(torch.uint8), width)
            tensors[f"{name}.qscale"] = scale.float().reshape(-1, 1).contiguous()  # (groups, 1)
            meta["layers"][name] = {"scheme": "scalar", "shape": shape, "bits": bits, "pack_width": width,
                                    "dtype": "float32"}
            if scale.shape[0] != shape[0]:  # group-wise scales; absent = one per row (files before it)
                meta["layers"][name]["rows_per_scale"] = shape[0] // scale.shape[0]
            weight = (q.float().reshape(scale.shape[0], -1) * scale.float().reshape(-1, 1)).reshape(shape)
        decoded.setdefault(tuple(shape), []).append((name, weight))
    rest, stored = DTYPES[opts.rest_dtype], {}  # stored: (storage, offset, shape, stride, dtype) -> dense key
    for key, t in state.items():
        if key in owned or key.rpartition(".")[2] in ACT_RANGES:  # act_bits' training ranges: no runtime uses them
            continue
        t = t.detach()
        tied = next((n for n, w in decoded.get(tuple(t.shape), []) if t.dtype.is_floating_point
                     and torch.equal(t.float(), w.float())), None)
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        tied = tied or (stored.get(view) if t.numel() else None)  # or the same memory as a dense tensor (tied, fp32)
        if tied is not None and key.endswith(".weight"):  # only a weight is read back as an alias (check_map)  # e.g. an output projection tied to a (quantized) embedding
            meta["aliases"][key] = tied
            continue
        stored[view] = key
        meta["dense"][key] = {"dtype": dtype_name(t.dtype)}
        if rest == torch.float16 and t.dtype.is_floating_point:
            t = _to_fp16(t, key, "export with --rest float32")
        tensors[key] = t.contiguous()
    meta["crc32"] = {k: _crc(t) for k, t in tensors.items()}
    return tensors, meta


def _crc(t: Tensor) -> int:
    """CRC-32 of a tensor's bytes (read in place, no copy for a contiguous tensor)."""
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _check_int_range(name: str, q: Tensor, bits: int, qmax: int) -> None:
    """ValueError (one line) unless every int value of layer ``name`` is in [-qmax, qmax], the range
    ``compress_`` rounds to and the packed form (``q + qmax`` < 2**bits - 1) holds."""
    lo, hi = (int(v) for v in q.aminmax()) if q.numel() else (0, 0)
    if lo < -qmax or hi > qmax:
        bad = lo if lo < -qmax else hi
        grid = (" or, for a layer on a llama.cpp grid (codes down to -2**(bits-1)), write it with "
                "quantnoise.hf.save_gguf" if bad == -qmax - 1 else "")
        raise ValueError(f"layer '{name}': int{bits} value {bad} is outside [-{qmax}, {qmax}] (its qweight was changed "
                         f"after compress_); compress it again, or load a state dict that compress_ wrote{grid}")


def save_qnz(path, state: Dict[str, Tensor], fairseq: dict, opts: ExportOptions = ExportOptions()) -> dict:
    """Write the .qnz atomically (temp file + rename); return its JSON map."""
    tensors, meta = encode(state, fairseq, opts)
    write_qnz(path, tensors, meta)
    return meta


def write_qnz(path, tensors: Dict[str, Tensor], meta: dict) -> None:
    """Write ``encode``'s (tensors, map) as a .qnz, atomically (temp file + rename)."""
    from safetensors.torch import save

    text = json.dumps(meta, sort_keys=True, default=_json_default)
    blob = save(tensors, metadata={"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode()))})
    atomic_write(path, lambda tmp: _write_bytes(tmp, blob))


def _write_bytes(path: str, blob: bytes, chunk: int = 1 << 24) -> None:
    with open(path, "wb") as f:
        for i in range(0, len(blob), chunk):
            f.write(blob[i : i + chunk])


# -------------------------------------------------------------------------------- decoding
# safetensors' dtype names -> torch (what safetensors.torch writes)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


MAX_DIMS = 16  # a stored tensor has at most 4 (a conv's weight); bounds the work of checking a shape


def _numel(shape) -> Optional[int]:
    """The element count of ``shape`` (at most MAX_DIMS ints in [0, 2**62)), or None where a prefix product passes
    2**62 (torch's numel overflows there even when a later dim is 0)."""
    n = 1
    for d in shape:
        n *= d
        if n >= 2**62:
            return None
    return n


def read_safetensors(path: str, check_meta: Optional[Callable[[dict], None]] = None) -> Tuple[dict, Dict[str, Tensor]]:
    """(``__metadata__``, tensors) of a safetensors file, each tensor's bytes read once, straight into its
    own buffer (no mmap kept, no second copy: what a runtime layer holds is that buffer or a view of it).
    The header is checked as safetensors checks it (size, JSON, dtypes, shapes, offsets that tile the
    data exactly) before any tensor is allocated; ValueError (why) otherwise.  ``check_meta(meta)`` runs before any
    entry is checked, so a file without the caller's metadata is refused before the work its entries cost."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        _need(len(head) == 8, f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        _need(n <= min(MAX_HEADER, size - 8), f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSONDecodeError / UnicodeDecodeError
            raise ValueError(f"its header does not parse ({str(e).splitlines()[0]})") from None
        _need(isinstance(header, dict), f"its header is a {type(header).__name__}, not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        _need(isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()),
              "its header's __metadata__ is not an object of strings")
        if check_meta is not None:
            check_meta(meta)
        spans = []
        for key, e in header.items():
            ok = isinstance(e, dict) and e.get("dtype") in ST_DTYPES and isinstance(e.get("shape"), list) \
                and len(e["shape"]) <= MAX_DIMS and all(is_int(v) and 0 <= v < 2**62 for v in e["shape"]) and isinstance(e.get("data_offsets"), list) \
                and len(e["data_offsets"]) == 2 and all(is_int(v) for v in e["data_offsets"])
            _need(ok, f"tensor {key!r} has a malformed header entry")
            (start, end), dtype = e["data_offsets"], ST_DTYPES[e["dtype"]]
            numel = _numel(e["shape"])
            _need(numel is not None, f"tensor {key!r} has shape {e['shape']}, whose element count overflows")
            nbytes = numel * dtype.itemsize
            _need(0 <= start <= end and end - start == nbytes,
                  f"tensor {key!r} spans bytes {start}..{end}, but {e['dtype']} {e['shape']} takes {nbytes}")
            spans.append((start, end, key, dtype, e["shape"]))
        spans.sort(key=lambda s: (s[0], s[1]))
        at = 0
        for start, end, key, _, _ in spans:
            _need(start == at, f"tensor {key!r} starts at byte {start} of the data, expected {at} (overlap or gap)")
            at = end
        _need(at == size - 8 - n, f"the tensors take {at} bytes but the file holds {size - 8 - n} "
                                  f"(truncated or corrupt)")
        tensors = {}
        for start, end, key, dtype, shape in spans:
            buf = torch.empty(end - start, dtype=torch.uint8)
            _need(f.readinto(buf.numpy()) == end - start, f"tensor {key!r} is cut short (truncated file)")
            tensors[key] = buf.view(dtype).reshape(shape)
    return meta, tensors


WRITERS = {"fairseq": "re-export it with `quantnoise export`",
           "hf": "re-save it with `quantnoise.hf.save_pretrained` (or the model's own save_pretrained)",
           "module": "re-save it with `quantnoise.save_qnz` (or quantnoise.export.save_state_dict)"}


def rewrite_fix(header: Optional[dict]) -> str:
    """The fix of a bad .qnz: write it again with what wrote it, read from its safetensors ``__metadata__``
    (transformers' ``format: pt`` = a Hugging Face folder; a map with a fairseq cfg = ``quantnoise export``;
    otherwise ``save_qnz``); every writer where that is unreadable."""
    try:
        if header.get("format") == "pt":
            return WRITERS["hf"]
        return WRITERS["fairseq" if "cfg" in json.loads(header["qnz"])["fairseq"] else "module"]
    except Exception:  # no header, no map, or a map that does not parse: a guess would mislead
        return "write it again with whichever wrote it: " + "; or ".join(WRITERS.values())


def read_qnz(path) -> Tuple[Dict[str, Tensor], dict]:
    """(stored tensors, JSON map) of a .qnz, checked; ValueError (one line) for anything else.  Each
    tensor is read once into its own buffer (``read_safetensors``): loading holds the file's size in
    memory, once."""
    path = str(path)
    if not os.path.isfile(path):
        raise OSError(f"{path} does not exist")

    seen = {}  # the header's __metadata__, once read: it says which writer the fix should name

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid .qnz file: {why}; {rewrite_fix(seen.get('meta'))}")

    def has_map(header: dict) -> None:
        seen["meta"] = header
        if "qnz" not in header:
            raise LookupError

    try:
        header, tensors = read_safetensors(path, has_map)
    except LookupError:  # checked before the entries: a large foreign file is refused at once
        raise bad("no quantnoise map in its header (a safetensors file from elsewhere?)") from None
    except ValueError as e:
        raise bad(f"unreadable safetensors data, truncated or corrupt ({e})") from None
    text = header.get("qnz")
    if str(zlib.crc32(text.encode())) != header.get("qnz_crc32"):
        raise bad("its JSON map fails its CRC-32 check (corrupt header)")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise bad(f"its JSON map does not parse ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise bad(f"its map is a {type(meta).__name__}, not a JSON object")
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    if not is_int(meta.get("format_version")) or meta["format_version"] not in READS:
        raise ValueError(f"{path} has .qnz format version {meta.get('format_version')!r}; this quantnoise reads "
                         f"version {' and '.join(map(str, READS))}: use the quantnoise release that wrote it, or re-export")
    crc = meta.get("crc32")
    if not isinstance(crc, dict) or not all(is_int(v) for v in crc.values()):
        raise bad(f"its map's 'crc32' is a {type(crc).__name__}, not an object of integers")
    if set(crc) != set(tensors):
        missing, extra = sorted(set(crc) - set(tensors)), sorted(set(tensors) - set(crc))
        raise bad(f"tensors missing {missing[:3]} / unexpected {extra[:3]}")
    for k, t in tensors.items():
        if _crc(t) != crc[k]:
            raise bad(f"tensor {k!r} fails its CRC-32 check (corrupt data)")
    try:
        check_map(tensors, meta)
    except ValueError as e:
        raise bad(str(e)) from None
    return tensors, meta


# ----------------------------------------------------------------------------- validation
FLOATS = ("float32", "float16", "bfloat16", "float64")


def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise ValueError(why)


def _object(value, what: str) -> dict:
    _need(isinstance(value, dict), f"its map's {what} is a {type(value).__name__}, not a JSON object")
    return value


def _tensor(tensors: Dict[str, Tensor], key: str, dtype: str, shape: List[int], because: str = "") -> Tensor:
    t = tensors.get(key)
    _need(t is not None, f"tensor {key!r}, which the map names, is missing")
    _need(dtype_name(t.dtype) == dtype, f"tensor {key!r} is {dtype_name(t.dtype)}, the map says {dtype}")
    _need(_shape(t) == shape, f"tensor {key!r} has shape {_shape(t)}, the map implies {shape}{because}")
    return t


def _positive_finite(t: Tensor, key: str) -> None:
    _need(bool(torch.isfinite(t).all()) and bool((t > 0).all()),
          f"tensor {key!r} holds zero, negative or non-finite scales")


def _check_layer(name: str, e, tensors: Dict[str, Tensor], version: int = VERSION) -> List[str]:
    """Check one compressed layer's map entry against its tensors (a file of format ``version``); return the
    tensor keys it owns."""
    where = f"layer {name!r}"
    _need(isinstance(e, dict), f"{where} is described by a {type(e).__name__}, not an object")
    scheme = e.get("scheme")
    _need(scheme in ("pq", "scalar"), f"{where} has scheme {scheme!r}; expected pq or scalar")
    keys = ("shape", "block_size", "n_centroids", "codes", "centroids", "dtype") if scheme == "pq" else \
        ("shape", "bits", "pack_width", "dtype")
    for key in keys:
        _need(key in e, f"{where} lacks key {key!r}")
    shape = e["shape"]
    _need(isinstance(shape, list) and len(shape) >= 2 and all(is_int(v) and v >= 1 for v in shape),
          f"{where} has shape {shape!r}; expected a list of 2 or more positive integers")
    _need(e["dtype"] in FLOATS, f"{where} has dtype {e['dtype']!r}; expected one of {', '.join(FLOATS)}")
    _need(isinstance(e.get("transposed", False), bool) and (not e.get("transposed") or len(shape) == 2),
          f"{where} has transposed {e.get('transposed')!r}; expected true or false (2-d weights only)")
    n, row = math.prod(shape), math.prod(shape[1:])
    if scheme == "pq":
        bs, k = e["block_size"], e["n_centroids"]
        _need(is_int(bs) and bs >= 1 and row % bs == 0,
              f"{where} has block_size {bs!r}, which does not divide the row length {row} of its shape {shape}")
        _need(bs <= MAX_BLOCK_SIZE, f"{where} has block_size {bs}, beyond the largest quantnoise writes ({MAX_BLOCK_SIZE}): "
                                    f"each stored code would decode to {bs} weights")
        _need(is_int(k) and 1 <= k <= 2**15, f"{where} has n_centroids {k!r}; expected an integer in [1, 32768]")
        _need(e["codes"] in ("uint8", "int16", "int32"), f"{where} has codes {e['codes']!r}; expected uint8 or int16")
        _need(e["centroids"] in CENTROID_DTYPES,
              f"{where} has centroids {e['centroids']!r}; expected {', '.join(CENTROID_DTYPES)}")
        codes = _tensor(tensors, f"{name}.codes", e["codes"], [n // bs], f" ({where}'s shape {shape} in blocks of "
                                                                       f"block_size {bs})")
        cents = _tensor(tensors, f"{name}.centroids", e["centroids"], [k, bs], f" (n_centroids {k}, block_size {bs})")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            _need(lo >= 0, f"{where} has a negative code ({lo})")
            _need(hi < k, f"{where} has codes up to {hi}, but the codebook has {k} centroids")
        owned = [f"{name}.codes", f"{name}.centroids"]
        if e["centroids"] == "int8":
            _positive_finite(_tensor(tensors, f"{name}.centroids_scale", "float32", [1]), f"{name}.centroids_scale")
            owned.append(f"{name}.centroids_scale")
        else:
            _need(bool(torch.isfinite(cents).all()), f"tensor '{name}.centroids' holds non-finite values")
        return owned
    bits, width = e["bits"], e["pack_width"]
    _need(is_int(bits) and 2 <= bits <= 8, f"{where} has bits {bits!r}; expected an integer from 2 to 8")
    want = file_pack_width(bits, version)
    _need(is_int(width) and width == want,
          f"{where} has pack_width {width!r}; int{bits} values are packed {want} bits wide (format version {version})")
    q = _tensor(tensors, f"{name}.qweight", "uint8", [math.ceil(n * width / 8)])
    rps = e.get("rows_per_scale", 1)
    _need(is_int(rps) and rps >= 1 and shape[0] % rps == 0,
          f"{where} has rows_per_scale {rps!r}, which does not divide the {shape[0]} rows of its shape {shape}")
    _positive_finite(_tensor(tensors, f"{name}.qscale", "float32", [shape[0] // rps, 1],
                             f" ({shape[0]} rows, rows_per_scale {rps})"), f"{name}.qscale")
    top = _packed_max(q, width, n)
    _need(top <= 2 * (2 ** (bits - 1) - 1), f"{where} has packed int{bits} values up to {top}, but int{bits} "
                                            f"stores q + {2 ** (bits - 1) - 1} in [0, {2 * (2 ** (bits - 1) - 1)}]")
    return [f"{name}.qweight", f"{name}.qscale"]


def _packed_max(q: Tensor, width: int, n: int, chunk: int = 1 << 15) -> int:
    """The largest of the first ``n`` values packed in ``q``, unpacking ``8 * chunk`` values (``width * chunk``
    bytes: whole groups of 8 values) at a time (temporaries of a few MB: a loaded model's peak memory; 8-bit
    values are the bytes themselves, no temporary)."""
    if width == 8:
        return int(q[:n].max()) if n else 0
    top, step = 0, 8 * chunk
    for v in range(0, n, step):
        top = max(top, int(unpack(q[v * width // 8:(v + step) * width // 8], width, min(step, n - v)).max()))
    return top


def check_map(tensors: Dict[str, Tensor], meta: dict) -> None:
    """ValueError (why, one line) unless the JSON map describes exactly the stored tensors: every layer's
    shape, block size, codebook size, bits and pack width agree with its tensors' shapes and dtypes;
    codes lie in [0, k) and packed int values in the int-N range; scales are positive and finite; every
    tensor belongs to exactly one layer or dense entry; aliases are ``*.weight`` keys pointing at a compressed
    layer or a dense tensor; no dense or alias key lies inside a compressed layer but its ``bias``.  (Whether the
    keys are those of a given model: ``quantnoise.runtime.load.check_keys``.)"""
    layers, dense, aliases = (_object(meta.get(k), repr(k)) for k in ("layers", "dense", "aliases"))
    fs = meta.get("fairseq")
    if fs is not None:
        _object(fs, "'fairseq'")
        cfg = fs.get("cfg")
        if cfg is not None:
            _object(cfg, "fairseq 'cfg'")
            if cfg.get("model") is not None:
                _object(cfg["model"], "fairseq cfg 'model'")
        _need(is_int(fs.get("num_updates", 0)), f"its map's fairseq num_updates is {fs.get('num_updates')!r}, "
                                                f"not an integer")
    owned: Dict[str, str] = {}
    version = meta.get("format_version", VERSION)
    for name, e in layers.items():
        for key in _check_layer(name, e, tensors, version):
            owned[key] = name
    weights = {f"{name}.weight" for name in layers}
    for key, e in dense.items():
        _need(key not in owned and key not in weights, f"dense tensor {key!r} is also part of a compressed layer")
        _need(key.rpartition(".")[0] not in layers or key.endswith(".bias"),
              f"dense tensor {key!r} lies inside compressed layer {key.rpartition('.')[0]!r}, which holds only a bias")
        _need(isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES,
              f"dense tensor {key!r} has dtype {e.get('dtype') if isinstance(e, dict) else e!r}; expected one of "
              f"{', '.join(DTYPES)}")
        t = tensors.get(key)
        _need(t is not None, f"tensor {key!r}, which the map names, is missing")
        stored_ok = t.dtype in (torch.float16, torch.float32) if DTYPES[e["dtype"]].is_floating_point \
            else dtype_name(t.dtype) == e["dtype"]
        _need(stored_ok, f"tensor {key!r} is {dtype_name(t.dtype)} but the map says it is a {e['dtype']} tensor")
        owned[key] = key
    for key, target in aliases.items():
        _need(isinstance(target, str) and (target in layers or target in dense),
              f"alias {key!r} points to {target!r}, which is no compressed layer or dense tensor of the file")
        _need(key not in dense and key not in weights, f"alias {key!r} would overwrite a stored weight")
        _need(isinstance(key, str) and key.endswith(".weight") and key.rpartition(".")[0] not in layers,
              f"alias {key!r} is not the weight of another layer (a tied copy is a '*.weight')")
    extra = sorted(set(tensors) - set(owned))
    _need(not extra, f"tensors {extra[:3]} belong to no layer of its map")


def decode(tensors: Dict[str, Tensor], meta: dict) -> Dict[str, Tensor]:
    """The ordinary model state dict: compressed layers as ``L.weight`` = codebook[codes] (or q * scale),
    other tensors in their original dtype, aliases as the same tensor as their target.  A checked map decodes
    to at most ~4 * MAX_BLOCK_SIZE times the file's size in fp32 (one code byte -> block_size weights); when
    that does not fit in memory: MemoryError saying how much it needs."""
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
                scale = tensors[f"{name}.qscale"]  # (groups, 1)
                w = (q.float().reshape(scale.shape[0], -1) * scale).reshape(e["shape"])
            if e.get("transposed"):  # stored as the (out, in) matrix of a layer holding its weight as (in, out)
                w = w.t().contiguous()
            state[f"{name}.weight"] = w.to(DTYPES[e["dtype"]])
        for key, e in meta["dense"].items():
            state[key] = tensors[key].to(DTYPES[e["dtype"]])
        for key, target in meta["aliases"].items():
            state[key] = state[target] if target in meta["dense"] else state[f"{target}.weight"]
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError) or "alloc" in str(err).lower():  # "can't allocate memory"
            raise MemoryError(f"decoding the .qnz needs {decoded_nbytes(tensors, meta) / 2**30:.2f} GiB, more than "
                              f"this machine can allocate; load it compressed (quantnoise.runtime) or on a larger "
                              f"machine") from None
        raise ValueError(f"the .qnz map does not match its tensors (RuntimeError: {str(err).splitlines()[0]}); the "
                         f"file is corrupt: re-export it") from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"the .qnz map does not match its tensors ({type(err).__name__}: {err}); the file is "
                         f"corrupt: re-export it") from None
    return state


def decoded_nbytes(tensors: Dict[str, Tensor], meta: dict) -> int:
    """Bytes of the decoded state dict of a checked map: compressed layers and dense tensors in their dtypes."""
    layers = sum(math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize for e in meta["layers"].values())
    return layers + sum(tensors[k].numel() * DTYPES[e["dtype"]].itemsize for k, e in meta["dense"].items())


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
            cbits = {"int8": 8, "float16": 16, "float32": 32}[e["centroids"]]
            bound = (n // bs) * math.ceil(math.log2(k)) + k * bs * cbits + (32 if cbits == 8 else 0)
            scheme = f"pq k={k} b={bs} {e['centroids']}"
        else:
            rps = e.get("rows_per_scale", 1)
            bound = n * e["bits"] + e["shape"][0] // rps * 32
            scheme = f"int{e['bits']}" + (f" in {e['pack_width']} bits" if e["pack_width"] != e["bits"] else "") + \
                (f" rows/scale={rps}" if rps != 1 else "")
        rows.append({"name": name, "scheme": scheme, "shape": e["shape"], "numel": n, "bytes": nbytes,
                     "bound_bits": bound, "fp32_bytes": 4 * n})
    for key, e in meta["dense"].items():
        t = tensors[key]
        n = t.numel()
        rows.append({"name": key, "scheme": dtype_name(t.dtype), "shape": list(t.shape), "numel": n,
                     "bytes": n * t.element_size(), "bound_bits": n * t.element_size() * 8,
                     "fp32_bytes": 4 * n if DTYPES[e["dtype"]].is_floating_point else n * t.element_size()})
    for key, target in meta["aliases"].items():
        shape = meta["layers"][target]["shape"] if target in meta["layers"] else list(tensors[target].shape)
        rows.append({"name": key, "scheme": f"alias of {target}", "shape": shape, "numel": math.prod(shape),
                     "bytes": 0, "bound_bits": 0, "fp32_bytes": 0})  # a tied tensor is stored once in fp32 too
    return rows


# ------------------------------------------------------------------- any PyTorch state dict
def save_state_dict(path, state: Dict[str, Tensor], opts: ExportOptions = ExportOptions()) -> dict:
    """Any model's state dict (a Hugging Face model's included) as a .qnz: layers compressed by
    quantnoise.compress.layers (``codes``/``qweight`` entries) stored compactly, every other tensor dense."""
    return save_qnz(path, state, {}, opts)


def load_state_dict(path) -> Dict[str, Tensor]:
    """The ordinary state dict of a .qnz written by ``save_state_dict`` (or ``save_qnz``), for
    ``model.load_state_dict``; compressed layers come back decoded."""
    return load_qnz(path)[0]
