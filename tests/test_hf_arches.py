"""transformers' whole convention path on architectures the other HF tests do not build (small configs, seeded):
``compress_`` (iPQ or int4) -> ``model.save_pretrained`` -> ``AutoModelFor*.from_pretrained`` running compressed
(no layer decoded) with the compressed model's logits -> re-saved to the same file; ``AutoModel`` gets the base.
Found by it and fixed: OPT / BART position tables and BART's scaled word embedding (subclasses with their own
forward, handing ids to the base forward) were decoded at load, BART's tied ``embed_tokens`` too, and Falcon's
``FalconLinear`` (its own forward, nn.Linear's product): a loaded model re-saved to a larger, dense file."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F

tf = pytest.importorskip("transformers")

from quantnoise import LayerRule, compress_  # noqa: E402
from quantnoise import hf  # noqa: E402
from quantnoise.export import read_qnz  # noqa: E402
from quantnoise.runtime import RuntimeMixin, runtime_summary  # noqa: E402

V = 96
SMALL = dict(vocab_size=V, max_position_embeddings=64)
DECODER = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
ENCODER = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
ARCHS = {  # name: (config, the head class's Auto class)
    "qwen2": (lambda: tf.Qwen2Config(**DECODER, **SMALL), tf.AutoModelForCausalLM),
    "mistral": (lambda: tf.MistralConfig(**DECODER, **SMALL), tf.AutoModelForCausalLM),
    "gemma": (lambda: tf.GemmaConfig(**DECODER, head_dim=8, **SMALL), tf.AutoModelForCausalLM),
    "phi3": (lambda: tf.Phi3Config(**DECODER, pad_token_id=0, **SMALL), tf.AutoModelForCausalLM),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(**ENCODER, **SMALL), tf.AutoModelForCausalLM),
    "gpt_neo": (lambda: tf.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, attention_types=[[["global", "local"], 1]],
                                        **SMALL), tf.AutoModelForCausalLM),
    "falcon": (lambda: tf.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=V),
               tf.AutoModelForCausalLM),
    "opt": (lambda: tf.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                 word_embed_proj_dim=32, **SMALL), tf.AutoModelForCausalLM),
    "distilbert": (lambda: tf.DistilBertConfig(n_layers=2, dim=32, hidden_dim=64, n_heads=4, num_labels=3, **SMALL),
                   tf.AutoModelForSequenceClassification),
    "roberta": (lambda: tf.RobertaConfig(**ENCODER, pad_token_id=1, **SMALL), tf.AutoModelForMaskedLM),
    "albert": (lambda: tf.AlbertConfig(**ENCODER, embedding_size=16, **SMALL), tf.AutoModelForMaskedLM),
    "electra": (lambda: tf.ElectraConfig(**ENCODER, embedding_size=16, **SMALL), tf.AutoModelForSequenceClassification),
    "bart": (lambda: tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **SMALL),
             tf.AutoModelForSeq2SeqLM),
    "t5": (lambda: tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               decoder_start_token_id=0), tf.AutoModelForSeq2SeqLM),
}
RULES = {"pq": LayerRule(block_size=4, n_centroids=16), "int4": LayerRule(scheme="scalar", bits=4)}
IDS = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))


def inputs(arch):
    return dict(input_ids=IDS, decoder_input_ids=IDS) if arch in ("bart", "t5") else dict(input_ids=IDS)


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def same_qnz(a, b):
    (ta, ma), (tb, mb) = read_qnz(a), read_qnz(b)
    return ma == mb and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("scheme", sorted(RULES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compress_save_load_and_resave_the_transformers_way(arch, scheme, tmp_path, caplog):
    config, auto = ARCHS[arch]
    torch.manual_seed(0)
    model = auto.from_config(config()).eval()
    compress_(model, RULES[scheme])
    model.save_pretrained(tmp_path / "a")  # transformers' own verb
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantnoise" and qc["compressed_layers"] > 0 and (tmp_path / "a" / "README.md").is_file()
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        want = model(**inputs(arch)).logits
        loaded = auto.from_pretrained(str(tmp_path / "a"))
        got = loaded(**inputs(arch)).logits
        ours = hf.from_pretrained(tmp_path / "a")(**inputs(arch)).logits  # quantnoise's loader: the same runtime
    assert "decoding" not in caplog.text, caplog.text  # every compressed layer runs from its codes / int weights
    assert type(loaded).__name__ == type(model).__name__ and runtime_summary(loaded)
    stored = set(read_qnz(tmp_path / "a" / "model.safetensors")[1]["layers"])
    assert all(isinstance(loaded.get_submodule(n), RuntimeMixin) for n in stored)
    assert rel_err(got, want) < (2e-3 if scheme == "pq" else 1e-4)  # fp16 codebooks and fp16 rest (pq); int4: exact values
    torch.testing.assert_close(got, ours, rtol=1e-6, atol=1e-6)
    loaded.save_pretrained(tmp_path / "b")  # a loaded model re-saves to the file it came from
    assert same_qnz(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    base = tf.AutoModel.from_pretrained(str(tmp_path / "a"))  # the base model of the head folder
    with torch.no_grad():
        hidden = base(**inputs(arch)).last_hidden_state
        prefix = getattr(model, model.base_model_prefix, None)
        if prefix is not None:
            assert rel_err(hidden, prefix(**inputs(arch)).last_hidden_state) < (2e-3 if scheme == "pq" else 1e-4)
    assert hidden.shape[:2] == IDS.shape and runtime_summary(base)


def test_falcons_linear_computes_nn_linears_product_and_runs_as_a_runtime_linear():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from quantnoise import extensions
    from quantnoise.runtime import CodesLinear, IntLinear

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    for bias in (True, False):
        layer = FalconLinear(16, 8, bias=bias)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert extensions.runtime_classes(layer) == (CodesLinear, IntLinear)
