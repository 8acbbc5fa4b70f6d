"""quantnoise.hf.save_pretrained / from_pretrained and transformers' own from_pretrained (the registered
``quantnoise`` quantizer) on BERT, GPT-2 and Llama built from small configs: every dense layer noised and
compressed, loaded compressed with no layer decoded, outputs equal to the compressed model's."""
import json

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from quantnoise import LayerRule, QuantNoiseConfig, compress_, quantize_, unquantize_  # noqa: E402
from quantnoise import hf  # noqa: E402
from quantnoise.runtime import RuntimeMixin, runtime_summary  # noqa: E402

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32),
    "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, max_position_embeddings=32),
    "bert": lambda: tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  vocab_size=96, max_position_embeddings=32),
}
AUTO = {"gpt2": tf.AutoModelForCausalLM, "llama": tf.AutoModelForCausalLM, "bert": tf.AutoModel}


def build(arch, seed=0):
    torch.manual_seed(seed)
    return AUTO[arch].from_config(CONFIGS[arch]())


def dense_layers(model):
    """Every Linear / Conv1D / Embedding, once (tied ones under one name)."""
    return {id(m) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_every_dense_layer_noised_compressed_and_loaded_compressed(tmp_path, arch, caplog):
    model = build(arch)
    n_dense = len(dense_layers(model))
    names = quantize_(model, QuantNoiseConfig(scheme="pq", p=0.2, block_size=4, n_centroids=16))
    assert len({id(model.get_submodule(n)) for n in names}) == n_dense  # GPT-2: the 8 Conv1D included
    model.train()
    ids = torch.randint(0, 96, (2, 8))
    out = model(ids)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    unquantize_(model)
    compressed = compress_(model, LayerRule(block_size=4, n_centroids=16))
    assert len({id(model.get_submodule(n)) for n in compressed}) == n_dense
    model.eval()
    folder = hf.save_pretrained(model, tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quantnoise" and (folder / "model.qnz").is_file()
    with torch.no_grad():
        want = model(ids)[0]
    with caplog.at_level("WARNING"):
        ours = hf.from_pretrained(folder)
        theirs = AUTO[arch].from_pretrained(str(folder))  # transformers' own loader, through the quantizer
    assert "decoding" not in caplog.text and "newly initialized" not in caplog.text
    for loaded in (ours, theirs):
        assert type(loaded) is type(model) and not loaded.training
        assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        summary = runtime_summary(loaded)
        assert sum(summary.values()) == len([m for m in loaded.modules() if isinstance(m, RuntimeMixin)])
        assert not any(isinstance(m, (nn.Linear, Conv1D, nn.Embedding)) and not isinstance(m, RuntimeMixin)
                       for m in loaded.modules())  # no layer left plain (decoded)
        with torch.no_grad():
            assert rel_err(loaded(ids)[0], want) < 1e-3
    if arch != "bert":
        with torch.no_grad():
            gen = ours.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen.shape == (1, 12) and torch.equal(gen[:, :8], ids[:1])


def test_tokenizer_saved_with_the_model_and_bad_folders_are_one_line(tmp_path):
    model = build("bert")
    compress_(model, LayerRule(pattern="encoder", block_size=4, n_centroids=16))
    tok = hf.load_tokenizer()
    folder = hf.save_pretrained(model, tmp_path / "b", tokenizer=tok)
    assert tf.AutoTokenizer.from_pretrained(str(folder))("a test")["input_ids"] == tok("a test")["input_ids"]
    with pytest.raises(ValueError, match="is not a quantnoise model folder"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="takes a transformers PreTrainedModel"):
        hf.save_pretrained(nn.Linear(2, 2), tmp_path / "x")
    config = json.loads((folder / "config.json").read_text())  # model.qnz now belongs to another architecture
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the model"):
        hf.from_pretrained(folder)
    for bad in ("../model.qnz", "/etc/passwd", "sub/model.qnz", "..", 3):  # the weights' name stays inside the folder
        config["num_hidden_layers"] = 2
        config["quantization_config"]["weights"] = bad
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="must name a file in that folder"):
            hf.from_pretrained(folder)
