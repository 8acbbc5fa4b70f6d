import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from quantnoise import export, ipq
from quantnoise.checkpoint import save_checkpoint, stock_cfg


def compressed_state(scalar_bits=4):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(300, 16), nn.Linear(16, 24), nn.Linear(24, 300), nn.Conv2d(4, 8, 3))
    rules = {"0": ipq.LayerRule(block_size=8, n_centroids=256), "1": ipq.LayerRule(scheme="scalar", bits=scalar_bits),
             "3": ipq.LayerRule(block_size=9, n_centroids=16)}
    for name, rule in rules.items():
        ipq.set_submodule(m, name, ipq.compress_module(m.get_submodule(name), rule, name))
    return m, m.state_dict()


@pytest.mark.parametrize("centroids", ["float16", "int8"])
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
    assert torch.equal(out["1.weight"], m[1].weight)  # int4 packing is lossless
    assert torch.equal(out["2.weight"], m[2].weight.detach().half().float()) and out["2.weight"].dtype == torch.float32


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_int_packing_is_lossless_and_dense(tmp_path, bits):
    m, state = compressed_state(scalar_bits=bits)
    export.save_qnz(tmp_path / "m.qnz", state, {}, export.ExportOptions(rest_dtype="float32"))
    tensors, meta = export.read_qnz(tmp_path / "m.qnz")
    assert tensors["1.qweight"].numel() == 24 * 16 * export.pack_width(bits) // 8
    assert torch.equal(export.decode(tensors, meta)["1.weight"], m[1].weight)


def test_tied_copy_is_stored_once_as_an_alias(tmp_path):
    m, state = compressed_state()
    state["head.weight"] = m[0].weight.detach().clone()  # e.g. an output projection tied to the embedding
    meta = export.save_qnz(tmp_path / "m.qnz", state, {})
    assert meta["aliases"] == {"head.weight": "0"}
    out, _ = export.load_qnz(tmp_path / "m.qnz")
    assert torch.equal(out["head.weight"], out["0.weight"])


def test_sizes_and_bound():
    _, state = compressed_state()
    tensors, meta = export.encode(state, {}, export.ExportOptions())
    rows = {r["name"]: r for r in export.layer_sizes(tensors, meta)}
    emb = rows["0"]  # 600 one-byte codes + 256x8 fp16 centroids
    assert emb["bytes"] == 600 + 256 * 8 * 2 and emb["bound_bits"] == 600 * 8 + 256 * 8 * 16
    assert rows["1"]["bytes"] == 24 * 16 // 2 + 24 * 4  # int4 two per byte + fp32 scales


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
    monkeypatch.setattr(export, "VERSION", 2)
    path = write_good(tmp_path)
    monkeypatch.setattr(export, "VERSION", 1)
    with pytest.raises(ValueError, match="has .qnz format version 2; this quantnoise reads version 1"):
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
