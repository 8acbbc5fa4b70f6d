"""quantnoise/hf/quantizer.py: transformers' own verbs on quantnoise models (GPT-2 built from a small config):
the quantization_config (repr, what config.json records), compressing at load, torch_dtype, device_map, a repo id
from the local Hugging Face cache."""
import json

import pytest
import torch

tf = pytest.importorskip("transformers")

from quantnoise import LayerRule, compress_  # noqa: E402
from quantnoise import hf  # noqa: E402
from quantnoise.runtime import runtime_summary  # noqa: E402


def gpt2(seed=0):
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = gpt2()
    compress_(model, LayerRule(pattern=r"mlp|wte", block_size=8, n_centroids=16))
    compress_(model, LayerRule(pattern=r"attn", scheme="scalar", bits=4))
    return hf.save_pretrained(model, tmp_path_factory.mktemp("q") / "gpt2-mixed"), model


IDS = torch.tensor([[1, 5, 9, 2, 7]])


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_the_quantization_config_shows_and_records_what_is_stored(folder):
    path, model = folder
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantnoise" and qc["weights"] == "model.safetensors" and qc["format_version"] == 2
    assert not {"scheme", "bits", "block_size", "include", "plan"} & set(qc)  # compress-at-load fields: not a folder's
    assert qc["rest_dtype"] == "float16" and qc["compressed_layers"] == 9 and qc["aliases"] == {"lm_head.weight": "transformer.wte"}
    pq, = [r for r in qc["rules"] if r["scheme"] == "pq"]
    int4, = [r for r in qc["rules"] if r["scheme"] == "scalar"]
    assert (pq["block_size"], pq["n_centroids"], pq["codes_dtype"], pq["centroids_dtype"]) == (8, 16, "uint8", "float16")
    assert len(pq["layers"]) == 5 and "transformer.wte" in pq["layers"]
    assert (int4["bits"], int4["stored_bits"], int4["scales_dtype"], len(int4["layers"])) == (4, 4, "float32", 4)
    loaded = tf.AutoModelForCausalLM.from_pretrained(str(path))
    text = repr(loaded.config.quantization_config)  # a notebook cell showing the config
    assert text.startswith("QuantNoiseHfConfig {") and '"compressed_layers": 9' in text
    assert repr(hf.from_pretrained(path).config.quantization_config) == text
    card = (path / "README.md").read_text()
    assert "quantnoise inspect model.safetensors" in card and "compression x" in card and "transformer.h.0.attn.c_attn" in card


def test_a_quantization_config_compresses_an_fp32_folder_at_load_as_compress_does(tmp_path):
    gpt2().save_pretrained(tmp_path / "fp32")  # a plain transformers folder
    for config, rule in [(hf.QuantNoiseHfConfig(scheme="pq", block_size=8, n_centroids=16, include=r"mlp|wte"),
                          LayerRule(pattern=r"mlp|wte", block_size=8, n_centroids=16)),
                         (hf.QuantNoiseHfConfig(scheme="scalar", bits=4), LayerRule(scheme="scalar", bits=4))]:
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), quantization_config=config)
        want = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"))
        compress_(want, rule)
        a, b = loaded.state_dict(), want.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        loaded.save_pretrained(tmp_path / "saved")  # and it saves as a quantnoise folder
        again = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
        with torch.no_grad():
            assert runtime_summary(again) and rel_err(again(IDS).logits, want(IDS).logits) < 1e-3
    with pytest.raises(ValueError, match="scheme='int4'"):
        hf.QuantNoiseHfConfig(scheme="int4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_dtype_is_honoured_for_what_is_not_compressed_and_the_activations(folder, dtype):
    path, model = folder
    with torch.no_grad():
        want = hf.from_pretrained(path)(IDS).logits
        for loaded in (tf.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype),
                       hf.from_pretrained(path, dtype=dtype)):
            assert loaded.transformer.ln_f.weight.dtype == dtype and loaded.transformer.wte.centroids.dtype == dtype
            out = loaded(IDS).logits
            assert out.dtype == dtype and rel_err(out, want) < 3e-2


def test_device_map_on_one_device_loads(folder):
    path, _ = folder
    with torch.no_grad():
        want = hf.from_pretrained(path)(IDS).logits
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
        assert torch.equal(loaded(IDS).logits, want)
    with pytest.raises(ValueError, match="loads on one device"):
        tf.AutoModelForCausalLM.from_pretrained(str(path), device_map={"transformer": "cpu", "lm_head": "disk"})


def test_a_repo_id_from_the_local_cache_loads_and_a_typo_is_named(folder, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    path, _ = folder
    repo = tmp_path / "hub" / "models--me--gpt2-pq"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in path.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(hub, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with torch.no_grad():
        loaded = tf.AutoModelForCausalLM.from_pretrained("me/gpt2-pq", local_files_only=True)
        assert torch.equal(loaded(IDS).logits, hf.from_pretrained(path)(IDS).logits)
    with pytest.raises(ValueError, match="does not exist"):
        hf.from_pretrained(tmp_path / "gpt2-qp")


def test_fp32_centroids_are_stored_exactly_both_ways_and_re_save_so(tmp_path):
    from quantnoise.export import ExportOptions, read_qnz

    gpt2().save_pretrained(tmp_path / "fp32")
    config = hf.QuantNoiseHfConfig(scheme="pq", block_size=8, n_centroids=16, include=r"mlp|wte",
                                   centroids_dtype="float32", rest_dtype="float32")
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), quantization_config=config)
    model.save_pretrained(tmp_path / "theirs")  # the request's dtypes
    hf.save_pretrained(model, tmp_path / "ours", opts=ExportOptions(rest_dtype="float32", centroids_dtype="float32"))
    books = {n: m.centroids.detach() for n, m in model.named_modules() if hasattr(m, "centroids")}
    assert books.pop("lm_head") is not None  # a tied copy of transformer.wte: an alias in the file
    for folder in ("theirs", "ours"):
        qc = json.loads((tmp_path / folder / "config.json").read_text())["quantization_config"]
        assert qc["centroids_dtype"] == "float32" and {r["centroids_dtype"] for r in qc["rules"]} == {"float32"}
        tensors, _ = read_qnz(tmp_path / folder / "model.safetensors")
        assert all(torch.equal(tensors[f"{n}.centroids"], c) for n, c in books.items())  # bit for bit
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / folder))
        assert all(torch.equal(loaded.get_submodule(n).centroids, c) for n, c in books.items())
        with torch.no_grad():
            assert rel_err(loaded(IDS).logits, model(IDS).logits) < 1e-5
        loaded.save_pretrained(tmp_path / f"{folder}-again")  # re-saved with the dtypes it was stored in
        again, _ = read_qnz(tmp_path / f"{folder}-again" / "model.safetensors")
        assert all(torch.equal(again[f"{n}.centroids"], c) for n, c in books.items())


def test_a_layer_rule_or_an_ipq_plan_as_the_quantization_config_compresses_at_load_as_compress_does(tmp_path, capsys):
    from quantnoise import IPQPlan

    gpt2().save_pretrained(tmp_path / "fp32")
    plan = IPQPlan(stages=[LayerRule(pattern=r"mlp", block_size=8, n_centroids=16),
                           LayerRule(pattern=r"attn", scheme="scalar", bits=4)])
    for request in (plan, LayerRule(pattern=r"wte", block_size=4, n_centroids=16)):
        config = hf.QuantNoiseHfConfig(plan=request)
        assert hf.QuantNoiseHfConfig.from_dict(config.to_dict()).compression_plan() == config.compression_plan()
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), quantization_config=config)
        want = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"))
        compress_(want, request)
        a, b = loaded.state_dict(), want.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "quantnoise compress" in capsys.readouterr().err  # the plan's layers one group at a time, under a bar
