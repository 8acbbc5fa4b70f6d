import json
import math
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from quantnoise import export
from quantnoise.compress import layers as ipq
from quantnoise.checkpoint import save_checkpoint, stock_cfg


def compressed_state(scalar_bits=4):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(300, 16), nn.Linear(16, 24), nn.Linear(24, 300), nn.Conv2d(4, 8, 3))
    rules = {"0": ipq.LayerRule(block_size=8, n_centroids=256), "1": ipq.LayerRule(scheme="scalar", bits=scalar_bits),
             "3": ipq.LayerRule(block_size=9, n_centroids=16)}
    for name, rule in rules.items():
        ipq.set_submodule(m, name, ipq.compress_module(m.get_submodule(name), rule, name))
    return m, m.state_dict()


@pytest.mark.parametrize("centroids", ["float16", "float32", "int8"])
def test_round_trip_is_bit_exact(tmp_path, centroids):
    m, state = compressed_state()
    path = tmp_path / "m.qnz"
    meta = export.save_qnz(path, state, {"cfg": None}, export.ExportOptions(centroids_dtype=centroids))
    tensors, read_meta = export.read_qnz(path)
    assert read_meta == meta and tensors["0.codes"].dtype == torch.uint8 and tensors["3.codes"].dtype == torch.uint8
    out = export.decode(tensors, read_meta)
    for name in ("0", "3"):  # decompressed weight == stored codebook[stored codes], exactly
        cb = tensors[f"{name}.centroids"].float()
        if centroids == "int8":
            assert tensors[f"{name}.centroids"].dtype == torch.int8
            cb = cb * tensors[f"{name}.centroids_scale"]
        assert torch.equal(out[f"{name}.weight"], cb[tensors[f"{name}.codes"].long()].reshape(m[int(name)].weight_shape))
    if centroids == "float16":  # fp16 codebook: the decoded model is the fp16-rounded PQ model
        assert torch.equal(out["0.weight"], m[0].centroids.detach().half().float()[m[0].codes.long()].reshape(300, 16))
    if centroids == "float32":  # fp32 codebook: the model's own, bit for bit, and so its decoded weight
        for name in ("0", "3"):
            assert tensors[f"{name}.centroids"].dtype == torch.float32 and read_meta["layers"][name]["centroids"] == "float32"
            assert torch.equal(tensors[f"{name}.centroids"], m[int(name)].centroids.detach())
        assert torch.equal(out["0.weight"], m[0].weight) and torch.equal(out["3.weight"], m[3].weight)
    rows = {r["name"]: r for r in export.layer_sizes(tensors, read_meta)}
    bits = {"float16": 16, "float32": 32, "int8": 8}[centroids]  # the bound counts the codebook as stored
    assert rows["3"]["bound_bits"] == (8 * 36 // 9) * 4 + 16 * 9 * bits + (32 if bits == 8 else 0)
    assert torch.equal(out["1.weight"], m[1].weight)  # int4 packing is lossless
    assert torch.equal(out["2.weight"], m[2].weight.detach().half().float()) and out["2.weight"].dtype == torch.float32


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_packing_is_lossless_and_dense(tmp_path, bits):
    m, state = compressed_state(scalar_bits=bits)
    odd = ipq.compress_module(nn.Linear(13, 7), ipq.LayerRule(scheme="scalar", bits=bits), "odd")  # 13 * bits: rows
    state.update({f"odd.{k}": v for k, v in odd.state_dict().items()})  # start mid-byte for every odd width
    export.save_qnz(tmp_path / "m.qnz", state, {}, export.ExportOptions(rest_dtype="float32"))
    tensors, meta = export.read_qnz(tmp_path / "m.qnz")
    assert meta["format_version"] == 2 and meta["layers"]["1"]["pack_width"] == bits == export.pack_width(bits)
    assert tensors["1.qweight"].numel() == 24 * 16 * bits // 8  # int3: 3 bits a weight, no padding per row
    assert tensors["odd.qweight"].numel() == -(-7 * 13 * bits // 8)  # one stream: only the last byte is padded
    out = export.decode(tensors, meta)
    assert torch.equal(out["1.weight"], m[1].weight) and torch.equal(out["odd.weight"], odd.weight)
    rows = {r["name"]: r for r in export.layer_sizes(tensors, meta)}
    assert rows["1"]["bytes"] == 24 * 16 * bits // 8 + 24 * 4 and rows["1"]["scheme"] == f"int{bits}"


def reference_pack(values, width):
    """The bit stream, bit by bit: bit j of value i is bit i * width + j, bit k of the stream is bit k % 8 of byte k // 8."""
    bits = [(v >> j) & 1 for v in values for j in range(width)]
    bits += [0] * (-len(bits) % 8)
    return [sum(bits[8 * i + k] << k for k in range(8)) for i in range(len(bits) // 8)]


@pytest.mark.parametrize("width", range(2, 9))
def test_pack_is_the_reference_bit_stream_and_unpack_inverts_it(width, monkeypatch):
    g = torch.Generator().manual_seed(width)
    for chunk in (export.PACK_CHUNK, 16):  # 16: many chunks, each a whole number of 8-value groups
        monkeypatch.setattr(export, "PACK_CHUNK", chunk)
        for n in (0, 1, 3, 8, 13, 100, 1001):
            u = torch.randint(0, 2**width, (n,), generator=g).to(torch.uint8)
            b = export.pack(u, width)
            assert b.dtype == torch.uint8 and b.tolist() == reference_pack(u.tolist(), width)
            assert torch.equal(export.unpack(b, width, n), u)


def as_version_1(tensors, meta):
    """The same model as a format version 1 file: int3 repacked 4 bits wide, int5-7 8 bits wide (what the
    previous quantnoise wrote)."""
    tensors, meta = dict(tensors), json.loads(json.dumps(meta))
    meta["format_version"] = 1
    for name, e in meta["layers"].items():
        if e["scheme"] == "scalar":
            old = export.legacy_pack_width(e["bits"])
            n = math.prod(e["shape"])
            tensors[f"{name}.qweight"] = export.pack(export.unpack(tensors[f"{name}.qweight"], e["pack_width"], n), old)
            e["pack_width"] = old
    return tensors, meta


@pytest.mark.parametrize("bits", [3, 4, 5, 7])
def test_version_1_file_still_loads_and_widths_are_checked_per_version(tmp_path, bits):
    m, state = compressed_state(scalar_bits=bits)
    v1 = write_signed(tmp_path / "v1.qnz", *as_version_1(*export.encode(state, {}, export.ExportOptions())))
    tensors, meta = export.read_qnz(v1)
    assert meta["format_version"] == 1 and meta["layers"]["1"]["pack_width"] == export.legacy_pack_width(bits)
    assert tensors["1.qweight"].numel() == 24 * 16 * export.legacy_pack_width(bits) // 8
    assert torch.equal(export.decode(tensors, meta)["1.weight"], m[1].weight)
    row = next(r for r in export.layer_sizes(tensors, meta) if r["name"] == "1")  # what `quantnoise inspect` prints
    old = export.legacy_pack_width(bits)
    assert row["scheme"] == (f"int{bits}" if old == bits else f"int{bits} in {old} bits")
    assert row["bytes"] == 24 * 16 * old // 8 + 24 * 4 and row["bound_bits"] == 24 * 16 * bits + 24 * 32
    if export.legacy_pack_width(bits) != bits:  # each version accepts its own width only
        t, e = export.encode(state, {}, export.ExportOptions())
        e["format_version"] = 1
        with pytest.raises(ValueError, match=f"pack_width {bits}; int{bits} values are packed "
                                             f"{export.legacy_pack_width(bits)} bits wide \\(format version 1\\)"):
            export.read_qnz(write_signed(tmp_path / "mixed.qnz", t, e))
        t, e = as_version_1(*export.encode(state, {}, export.ExportOptions()))
        e["format_version"] = 2
        with pytest.raises(ValueError, match=f"int{bits} values are packed {bits} bits wide \\(format version 2\\)"):
            export.read_qnz(write_signed(tmp_path / "mixed.qnz", t, e))


def test_tied_copy_is_stored_once_as_an_alias(tmp_path):
    m, state = compressed_state()
    state["head.weight"] = m[0].weight.detach().clone()  # e.g. an output projection tied to the embedding
    meta = export.save_qnz(tmp_path / "m.qnz", state, {})
    assert meta["aliases"] == {"head.weight": "0"}
    out, _ = export.load_qnz(tmp_path / "m.qnz")
    assert torch.equal(out["head.weight"], out["0.weight"])


def test_tied_uncompressed_tensor_is_stored_once(tmp_path):
    emb = nn.Embedding(300, 16)
    state = {"emb.weight": emb.weight.detach(), "head.weight": emb.weight.detach(), "head.bias": torch.zeros(300)}
    opts = export.ExportOptions(rest_dtype="float32")
    meta = export.save_qnz(tmp_path / "tied.qnz", state, {}, opts)
    assert meta["aliases"] == {"head.weight": "emb.weight"} and set(meta["dense"]) == {"emb.weight", "head.bias"}
    export.save_qnz(tmp_path / "copy.qnz", {**state, "head.weight": emb.weight.detach().clone()}, {}, opts)  # 2 copies
    assert (tmp_path / "copy.qnz").stat().st_size - (tmp_path / "tied.qnz").stat().st_size >= 300 * 16 * 4 - 64
    out, _ = export.load_qnz(tmp_path / "tied.qnz")
    assert torch.equal(out["head.weight"], emb.weight) and out["head.weight"] is out["emb.weight"]
    assert [r["bytes"] for r in export.layer_sizes(*export.read_qnz(tmp_path / "tied.qnz")) if r["name"] == "head.weight"] == [0]


def test_sizes_and_bound():
    _, state = compressed_state()
    tensors, meta = export.encode(state, {}, export.ExportOptions())
    rows = {r["name"]: r for r in export.layer_sizes(tensors, meta)}
    emb = rows["0"]  # 600 one-byte codes + 256x8 fp16 centroids
    assert emb["bytes"] == 600 + 256 * 8 * 2 and emb["bound_bits"] == 600 * 8 + 256 * 8 * 16
    assert rows["1"]["bytes"] == 24 * 16 // 2 + 24 * 4  # int4 two per byte + fp32 scales


@pytest.mark.parametrize("bits, value", [(4, 8), (4, 20), (4, -8), (3, 4), (8, -128)])
def test_encode_refuses_int_values_outside_the_bits_range_in_one_line(tmp_path, bits, value):
    """Issue 33 item 17: ``q + qmax`` was packed unchecked, so a value past the range spilled into the next
    value's bits (or wrapped in uint8) and only the loader, if anything, refused the file."""
    _, state = compressed_state(scalar_bits=bits)
    q = state["1.qweight"].clone()
    q.view(-1)[3] = value
    state["1.qweight"] = q
    with pytest.raises(ValueError) as e:
        export.save_qnz(tmp_path / "m.qnz", state, {"cfg": None})
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "'1'" in msg and str(value) in msg and f"{bits}" in msg, msg
    assert not (tmp_path / "m.qnz").exists()


# ------------------------------------------------------------------------------- bad files
def write_good(tmp_path):
    _, state = compressed_state()
    path = tmp_path / "m.qnz"
    export.save_qnz(path, state, {"cfg": None})
    return path


def test_truncated_file_is_rejected(tmp_path):
    path = write_good(tmp_path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is not a valid .qnz file"):
            export.read_qnz(path)


def _written_by(tmp_path, writer: str):
    """A small compressed .qnz as each writer writes it: fairseq's ``quantnoise export`` (a map with its cfg),
    ``quantnoise.save_qnz`` of a module, ``quantnoise.hf.save_pretrained`` of a transformers model."""
    from quantnoise import LayerRule, compress_, save_qnz
    if writer == "export":
        return write_good(tmp_path)
    if writer == "save_qnz":
        model = nn.Sequential(nn.Linear(16, 16))
        compress_(model, LayerRule(scheme="scalar", bits=4))
        save_qnz(model, tmp_path / "m.qnz")
        return tmp_path / "m.qnz"
    tf = pytest.importorskip("transformers")
    from quantnoise import hf
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16))
    compress_(model, LayerRule(pattern=r"\.h\.", scheme="scalar", bits=4))
    hf.save_pretrained(model, tmp_path / "gpt2")
    return tmp_path / "gpt2" / "model.safetensors"


@pytest.mark.parametrize("writer, fix", [("export", "`quantnoise export`"), ("save_qnz", "quantnoise.save_qnz"),
                                         ("hf", "quantnoise.hf.save_pretrained")])
def test_a_truncated_or_corrupt_files_fix_names_the_writer_of_that_kind_of_file(tmp_path, writer, fix):
    """Issue 33 item 13: the fix named `quantnoise export` (the fairseq command) for every file."""
    path = _written_by(tmp_path, writer)
    data = path.read_bytes()
    others = {"`quantnoise export`", "quantnoise.save_qnz", "quantnoise.hf.save_pretrained"} - {fix}
    data_start = 8 + struct.unpack("<Q", data[:8])[0]
    for cut in ((data_start + len(data)) // 2, len(data) - 1):  # the header is whole: it says what wrote the file
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is not a valid .qnz file") as e:
            export.read_qnz(path)
        assert fix in str(e.value) and not any(o in str(e.value) for o in others), str(e.value)
    path.write_bytes(data[:100])  # the header is cut: unknown writer, every one is named
    with pytest.raises(ValueError) as e:
        export.read_qnz(path)
    assert all(o in str(e.value) for o in others | {fix}), str(e.value)


def test_corrupted_tensor_bytes_and_header_are_rejected(tmp_path):
    path = write_good(tmp_path)
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    bad = bytearray(data)
    bad[-10] ^= 0xFF  # a byte of the last tensor
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="fails its CRC-32 check \\(corrupt data\\)"):
        export.read_qnz(path)
    bad = bytearray(data)
    i = bytes(data[: 8 + n]).index(b'\\"scheme\\": \\"pq')  # inside the JSON map (escaped in the header)
    bad[i + 14] = ord("x")
    path.write_bytes(bad)
    with pytest.raises(ValueError, match="JSON map fails its CRC-32 check"):
        export.read_qnz(path)


def test_wrong_version_and_foreign_files_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "VERSION", 3)
    path = write_good(tmp_path)
    monkeypatch.setattr(export, "VERSION", 2)
    with pytest.raises(ValueError, match="has .qnz format version 3; this quantnoise reads version 1 and 2"):
        export.read_qnz(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.qnz"))
    with pytest.raises(ValueError, match="no quantnoise map in its header"):
        export.read_qnz(tmp_path / "plain.qnz")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {SENTINEL}",))


SENTINEL = ""


def test_a_pickle_crafted_to_run_code_is_rejected_without_running_it(tmp_path):
    global SENTINEL
    SENTINEL = str(tmp_path / "pwned")
    evil = tmp_path / "evil.qnz"
    evil.write_bytes(pickle.dumps({"model": RunsCode()}))
    with pytest.raises(ValueError, match="is not a valid .qnz file"):
        export.load_qnz(evil)
    torch.save({"model": RunsCode()}, evil)  # a torch zip pickle under the .qnz name
    with pytest.raises(ValueError, match="is not a valid .qnz file"):
        export.load_qnz(evil)
    assert not os.path.exists(SENTINEL)


def test_a_crash_mid_export_leaves_no_half_file(tmp_path, monkeypatch):
    path = write_good(tmp_path)
    before = path.read_bytes()

    def crash(p, blob, chunk=1 << 24):
        with open(p, "wb") as f:
            f.write(blob[: len(blob) // 2])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(export, "_write_bytes", crash)
    _, state = compressed_state()
    with pytest.raises(KeyboardInterrupt):
        export.save_qnz(path, state, {"cfg": None})
    with pytest.raises(KeyboardInterrupt):
        export.save_qnz(tmp_path / "new.qnz", state, {"cfg": None})
    assert path.read_bytes() == before and not (tmp_path / "new.qnz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qnz"]  # no temp file left behind


# ------------------------------------------------------------------------------- commands
def cli(*args):
    return subprocess.run([sys.executable, "-m", "quantnoise.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_quantize_export_inspect_decompress(tmp_path):
    torch.manual_seed(0)
    model = {"decoder.embed_tokens.weight": torch.randn(300, 16), "decoder.layers.0.fc1.weight": torch.randn(32, 16),
             "decoder.layers.0.fc1.bias": torch.randn(32), "decoder.version": torch.tensor([3.0])}
    cfg = {"model": {"_name": "qn_transformer_lm_tiny", "quant_noise_p": 0.1, "quant_noise_pq": 0.0, "ipq_plan": None},
           "common": {"user_dir": "x"}}
    save_checkpoint({"cfg": cfg, "model": model, "optimizer_history": [{"num_updates": 7}],
                     "last_optimizer_state": {"state": {}}}, tmp_path / "c.pt")
    r = cli("quantize", tmp_path / "c.pt", "-o", tmp_path / "q.pt", "--centroids", "16", "--exclude", "fc1")
    assert r.returncode == 0, r.stderr
    q = torch.load(tmp_path / "q.pt", weights_only=True)
    assert "decoder.embed_tokens.codes" in q["model"] and "decoder.layers.0.fc1.weight" in q["model"]
    assert "last_optimizer_state" not in q
    assert cli("export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz").returncode == 0
    r = cli("export", tmp_path / "q.pt", "-o", tmp_path / "m32.qnz", "--centroids", "float32")
    assert r.returncode == 0, r.stderr
    t32, m32 = export.read_qnz(tmp_path / "m32.qnz")  # fp32 codebooks: the checkpoint's, exactly
    assert m32["layers"]["decoder.embed_tokens"]["centroids"] == "float32"
    assert torch.equal(t32["decoder.embed_tokens.centroids"], q["model"]["decoder.embed_tokens.centroids"])
    assert "pq k=16 b=8 float32" in cli("inspect", tmp_path / "m32.qnz").stdout
    out = cli("inspect", tmp_path / "m.qnz").stdout
    assert "decoder.embed_tokens" in out and "pq k=16 b=8 float16" in out and "compression x" in out and "bound" in out
    assert cli("decompress", tmp_path / "m.qnz", "-o", tmp_path / "d.pt").returncode == 0
    d = torch.load(tmp_path / "d.pt", weights_only=True)
    assert d["cfg"]["model"]["_name"] == "transformer_lm" and "quant_noise_p" not in d["cfg"]["model"]
    assert d["cfg"]["common"]["user_dir"] is None and d["optimizer_history"][-1]["num_updates"] == 7
    emb = q["model"]["decoder.embed_tokens.centroids"].half().float()[q["model"]["decoder.embed_tokens.codes"].long()]
    assert torch.equal(d["model"]["decoder.embed_tokens.weight"], emb.reshape(300, 16))
    # bad input: one line on stderr, exit 2
    (tmp_path / "bad.qnz").write_bytes(b"not a model")
    for args in (("inspect", tmp_path / "bad.qnz"), ("decompress", tmp_path / "bad.qnz", "-o", tmp_path / "x.pt"),
                 ("export", tmp_path / "bad.qnz", "-o", tmp_path / "y.qnz"),
                 ("quantize", tmp_path / "c.pt", "-o", tmp_path / "z.pt", "--include", "nothing")):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "z.pt").exists()


def test_stock_cfg_drops_the_plugin():
    cfg = {"model": {"_name": "qn_transformer_lm", "quant_noise_scheme": "pq", "quant_noise_pq": 0.1, "ipq_plan": "p.yaml",
                     "decoder_layers": 2}, "common": {"user_dir": "/plugin"}}
    s = stock_cfg(cfg)
    assert s["model"] == {"_name": "transformer_lm", "quant_noise_pq": 0.0, "decoder_layers": 2}
    assert s["common"]["user_dir"] is None and cfg["model"]["_name"] == "qn_transformer_lm"


# ------------------------------------------------- hand-made files whose checksums are valid
def write_signed(path, tensors, meta):
    """A .qnz of these tensors and this map, with every CRC recomputed (as a forger would)."""
    import json
    import zlib

    from safetensors.torch import save

    if isinstance(meta, dict) and isinstance(meta.get("crc32"), dict):
        meta["crc32"] = {k: export._crc(t) for k, t in tensors.items()}
    text = json.dumps(meta)
    path.write_bytes(save(tensors, metadata={"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode()))}))
    return path


def good_parts(centroids="float16"):
    _, state = compressed_state()  # "0": pq k=256 b=8 (300x16), "1": int4 (24x16), "3": pq k=16 b=9 (8x4x3x3)
    return export.encode(state, {"cfg": {"model": {"_name": "qn_transformer_lm"}}, "num_updates": 3},
                         export.ExportOptions(centroids_dtype=centroids))


def set_in(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    if value is DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


DELETE = object()
BAD_MAPS = {  # name: (path in the map, new value, words the one-line error must contain)
    "map is a list": ((), ["layers"], "map is a list, not a JSON object"),
    "layers is a list": (("layers",), [], "'layers' is a list"),
    "crc32 is a list": (("crc32",), [], "'crc32' is a list"),
    "format_version true": (("format_version",), True, "format version True"),
    "pack_width 3": (("layers", "1", "pack_width"), 3, "pack_width 3"),
    "pack_width 2 for int4": (("layers", "1", "pack_width"), 2, "pack_width 2"),
    "pack_width 8 for int4": (("layers", "1", "pack_width"), 8, "pack_width 8"),
    "bits 9": (("layers", "1", "bits"), 9, "bits 9"),
    "bits true": (("layers", "1", "bits"), True, "bits True"),
    "shape 1e12 weights": (("layers", "0", "shape"), [10**6, 10**6], "shape [1000000, 1000000]"),
    "shape numel mismatch": (("layers", "3", "shape"), [8, 4, 3, 6], "shape [8, 4, 3, 6]"),
    "shape row not divisible": (("layers", "0", "shape"), [960, 5], "block_size 8"),
    "shape negative": (("layers", "1", "shape"), [-24, -16], "shape [-24, -16]"),
    "shape floats": (("layers", "1", "shape"), [24.0, 16], "shape [24.0, 16]"),
    "shape 1-d": (("layers", "1", "shape"), [384], "shape [384]"),
    "scalar rows mismatch": (("layers", "1", "shape"), [16, 24], "qscale"),
    "no shape": (("layers", "0", "shape"), DELETE, "'shape'"),
    "scheme unknown": (("layers", "0", "scheme"), "vq", "scheme 'vq'"),
    "layer entry a string": (("layers", "0"), "pq", "layer '0'"),
    "n_centroids too small": (("layers", "3", "n_centroids"), 8, "n_centroids 8"),
    "n_centroids string": (("layers", "3", "n_centroids"), "16", "n_centroids '16'"),
    "block_size mismatch": (("layers", "3", "block_size"), 3, "block_size 3"),
    "codes dtype": (("layers", "0", "codes"), "int16", "codes"),
    "centroids dtype": (("layers", "0", "centroids"), "int8", "centroids"),
    "layer dtype": (("layers", "0", "dtype"), "complex64", "dtype 'complex64'"),
    "dense dtype": (("dense", "2.bias"), {"dtype": "complex64"}, "dtype 'complex64'"),
    "dense entry not a dict": (("dense", "2.bias"), "float32", "'2.bias'"),
    "alias to nothing": (("aliases", "head.weight"), "nope", "alias 'head.weight'"),
    "alias onto a layer weight": (("aliases", "1.weight"), "0", "alias '1.weight'"),
    "fairseq a string": (("fairseq",), "cfg", "'fairseq'"),
    "cfg model a list": (("fairseq", "cfg", "model"), [], "'model'"),
    "num_updates string": (("fairseq", "num_updates"), "x", "num_updates"),
}


@pytest.mark.parametrize("case", BAD_MAPS)
def test_signed_file_whose_map_does_not_match_its_tensors_is_one_line(tmp_path, case):
    where, value, words = BAD_MAPS[case]
    tensors, meta = good_parts()
    if where == ():
        meta = value
    else:
        set_in(meta, where, value)
    path = write_signed(tmp_path / "m.qnz", tensors, meta)
    with pytest.raises(ValueError) as e:
        export.load_qnz(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "is not a valid .qnz file" in msg or "format version" in msg, msg
    assert words in msg, msg


def pq_codes_255(tensors, meta):  # codes of 255 in the 16-centroid layer
    tensors["3.codes"] = tensors["3.codes"].clone()
    tensors["3.codes"][5] = 255


def int4_nibble_15(tensors, meta):  # int4 values are q + 7 in [0, 14]: 15 is no int4 weight
    tensors["1.qweight"] = tensors["1.qweight"].clone()
    tensors["1.qweight"][0] = 0xF0 | (tensors["1.qweight"][0] & 0x0F)


def set_tensor(key, value):
    def f(tensors, meta):
        tensors[key] = value(tensors[key].clone())
    return f


def drop_tensor(key):
    def f(tensors, meta):
        del tensors[key]
    return f


def extra_tensor(tensors, meta):
    tensors["stowaway"] = torch.zeros(3)


BAD_TENSORS = {  # name: (change to the tensors, words of the error, centroids option)
    "codes out of range": (pq_codes_255, "codes up to 255, but the codebook has 16 centroids", "float16"),
    "int4 value out of range": (int4_nibble_15, "15", "float16"),
    "qscale zero": (set_tensor("1.qscale", lambda t: t.index_fill_(0, torch.tensor([3]), 0.0)), "qscale", "float16"),
    "qscale nan": (set_tensor("1.qscale", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan"))), "qscale",
                   "float16"),
    "qscale negative": (set_tensor("1.qscale", lambda t: -t), "qscale", "float16"),
    "centroid scale zero": (set_tensor("0.centroids_scale", lambda t: t * 0), "centroids_scale", "int8"),
    "centroid scale inf": (set_tensor("0.centroids_scale", lambda t: t / 0), "centroids_scale", "int8"),
    "centroid nan": (set_tensor("3.centroids", lambda t: t.index_fill_(0, torch.tensor([2]), float("nan"))),
                     "centroids", "float16"),
    "codes short": (set_tensor("0.codes", lambda t: t[:-1]), "'0.codes'", "float16"),
    "codes 2-d": (set_tensor("0.codes", lambda t: t.reshape(300, 2)), "'0.codes'", "float16"),
    "codes int16": (set_tensor("0.codes", lambda t: t.to(torch.int16)), "'0.codes'", "float16"),
    "centroids fp32": (set_tensor("0.centroids", lambda t: t.float()), "'0.centroids'", "float16"),
    "centroids rows": (set_tensor("3.centroids", lambda t: t[:8]), "'3.centroids'", "float16"),
    "qweight short": (set_tensor("1.qweight", lambda t: t[:10]), "'1.qweight'", "float16"),
    "qscale shape": (set_tensor("1.qscale", lambda t: t.reshape(-1)), "'1.qscale'", "float16"),
    "dense int retyped": (set_tensor("2.bias", lambda t: t.to(torch.int32)), "'2.bias'", "float16"),
    "missing tensor": (drop_tensor("3.centroids"), "3.centroids", "float16"),
    "unexpected tensor": (extra_tensor, "stowaway", "float16"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_signed_file_with_bad_tensors_is_one_line(tmp_path, case):
    change, words, centroids = BAD_TENSORS[case]
    tensors, meta = good_parts(centroids)
    change(tensors, meta)
    path = write_signed(tmp_path / "m.qnz", tensors, meta)
    with pytest.raises(ValueError) as e:
        export.load_qnz(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "is not a valid .qnz file" in msg and words in msg, msg


def test_signed_good_file_still_loads(tmp_path):
    tensors, meta = good_parts("int8")
    expected = export.decode(tensors, meta)
    state, _ = export.load_qnz(write_signed(tmp_path / "m.qnz", tensors, meta))
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_cli_refuses_out_of_range_codes_and_a_map_that_lies_about_sizes(tmp_path):
    """The two files of issue 10: decompress died with IndexError, inspect reported 10^12 weights."""
    tensors, meta = good_parts()
    pq_codes_255(tensors, meta)
    write_signed(tmp_path / "codes.qnz", tensors, meta)
    tensors, meta = good_parts()
    meta["layers"]["0"]["shape"] = [10**6, 10**6]
    write_signed(tmp_path / "huge.qnz", tensors, meta)
    for args in (("decompress", tmp_path / "codes.qnz", "-o", tmp_path / "d.pt"), ("inspect", tmp_path / "huge.qnz")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "is not a valid .qnz file" in r.stderr, r.stderr
    assert not (tmp_path / "d.pt").exists()


def test_int16_codes_for_more_than_256_centroids_round_trip(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(300, 16))
    ipq.set_submodule(m, "0", ipq.compress_module(m[0], ipq.LayerRule(block_size=8, n_centroids=300), "0"))
    assert m[0].codes.dtype == torch.int16 and int(m[0].codes.max()) > 255  # 600 blocks, 300 centroids
    meta = export.save_qnz(tmp_path / "m.qnz", m.state_dict(), {})
    tensors, _ = export.read_qnz(tmp_path / "m.qnz")
    assert meta["layers"]["0"]["codes"] == "int16" and tensors["0.codes"].dtype == torch.int16
    state, _ = export.load_qnz(tmp_path / "m.qnz")
    want = m[0].centroids.detach().half().float()[m[0].codes.long()].reshape(300, 16)
    assert torch.equal(state["0.weight"], want)
    row = export.layer_sizes(tensors, meta)[0]
    assert row["bytes"] == 600 * 2 + 300 * 8 * 2 and row["bound_bits"] == 600 * 9 + 300 * 8 * 16  # 9-bit codes


def test_read_safetensors_equals_safetensors_and_checks_the_layout(tmp_path):
    """The reader that reads each tensor once: same tensors as safetensors' own loader, every dtype it writes
    (0-dim and empty included); a header whose offsets overlap, leave a gap or overrun is refused."""
    import json as _json

    from safetensors.torch import load_file, save

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
               "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32), "i16": torch.arange(4, dtype=torch.int16),
               "i8": torch.arange(-3, 3, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
               "b": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    blob = save(tensors, metadata={"k": "v"})
    (tmp_path / "a.st").write_bytes(blob)
    meta, got = export.read_safetensors(str(tmp_path / "a.st"))
    want = load_file(str(tmp_path / "a.st"))
    assert meta == {"k": "v"} and got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    n = struct.unpack("<Q", blob[:8])[0]
    header = _json.loads(blob[8:8 + n])
    for change, why in ((lambda h: h["u8"]["data_offsets"].__setitem__(0, h["u8"]["data_offsets"][0] - 1), "takes"),
                        (lambda h: h.__setitem__("i8", {**h["i8"], "dtype": "U32"}), "malformed"),
                        (lambda h: h.__setitem__("x", {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}), "overlap")):
        h = _json.loads(_json.dumps(header))
        change(h)
        text = _json.dumps(h).encode()
        (tmp_path / "b.st").write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])
        with pytest.raises(ValueError, match=why):
            export.read_safetensors(str(tmp_path / "b.st"))


@pytest.mark.parametrize("width", range(2, 9))
def test_packed_max_reads_only_the_first_n_values_in_chunks(width):
    """The int range check (``_packed_max``) equals the max of the unpacked values, chunked or not, and ignores
    the padding bits of the last byte."""
    g = torch.Generator().manual_seed(width)
    n = 1001
    u = torch.randint(0, 2**width - 1, (n,), generator=g).to(torch.uint8)  # never the top value...
    q = export.pack(u, width)
    if n * width % 8:
        q[-1] |= (0xFF << (n * width % 8)) & 0xFF  # ...except in the padding bits of the last byte
    for chunk in (7, 1 << 18):
        assert export._packed_max(q, width, n, chunk=chunk) == int(u.max()) < 2**width - 1
    u[n // 2] = 2**width - 1  # the top value inside: found
    assert export._packed_max(export.pack(u, width), width, n, chunk=7) == 2**width - 1


def test_a_zero_size_tensor_with_a_huge_dimension_is_refused(tmp_path):
    """Found in issue 22's second read: shape [0, 2**70] takes 0 bytes, passed the header checks and made torch's
    reshape raise a RuntimeError traceback."""
    import struct

    head = json.dumps({"__metadata__": {"qnz": "{}"},  # a map: a file without one is refused before its entries
                       "a": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "m.qnz"
    path.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(ValueError, match="tensor 'a' has a malformed header entry"):
        export.read_qnz(path)
