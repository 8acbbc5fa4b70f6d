"""quantnoise.hf.save_pretrained(model, dir, format="aqlm") (quantnoise/hf/aqlm.py): iPQ Llama / BERT models from
small configs written as transformers AQLM folders, loaded by transformers' own from_pretrained with the real aqlm
package (its numba CPU kernel), logits equal to quantnoise's runtime on the same codes; the dense fallback and the
refusals."""
import json
import logging

import pytest
import torch
from torch import nn

tf = pytest.importorskip("transformers")
aqlm = pytest.importorskip("aqlm")
numba = pytest.importorskip("numba")
from safetensors.torch import load_file  # noqa: E402

from quantnoise import IPQPlan, LayerRule, QuantNoiseConfig, compress_, quantize_  # noqa: E402
from quantnoise import hf  # noqa: E402
from quantnoise.export import ExportOptions  # noqa: E402
from quantnoise.hf.aqlm import aqlm_layer, aqlm_weight  # noqa: E402

VOCAB = 96
# fp32 rounding: AQLM's kernel sums a table of (input group . centroid) products, quantnoise's its own way; measured
# max |difference| / max |output| 0 .. 2.6e-7 on these models and layers (1 numba thread)
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_numba_thread():
    """aqlm 1.1.7's numba kernel adds into one shared output vector from every prange thread: at 2 threads its
    outputs can be wrong (docs/hf.md, "AQLM export"); these tests run it as users must, on one thread."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=32)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, **kw})).eval()


def bert(cls=tf.BertModel, seed=0):
    torch.manual_seed(seed)
    return cls(tf.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)).eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def qconfig(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def ids(n=8, seed=1):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def test_aqlm_layer_is_the_ipq_layer_in_aqlm_quantized_linear():
    g = torch.Generator().manual_seed(0)
    for k, b in ((256, 8), (100, 4)):  # k < 256: the codebook padded with rows no code selects
        codes = torch.randint(0, k, (24, 64 // b), generator=g).to(torch.uint8)
        cents = torch.randn(k, b, generator=g)
        t = aqlm_layer(codes, cents)
        assert t["codes"].dtype == torch.int8 and t["codes"].shape == (24, 64 // b, 1)
        assert t["codebooks"].shape == (1, 256, 1, b) and torch.equal(t["scales"], torch.ones(24, 1, 1, 1))
        w = cents[codes.long()].reshape(24, 64)
        assert torch.equal(aqlm_weight(t["codes"], t["codebooks"], t["scales"]), w)
        layer = aqlm.QuantizedLinear(64, 24, in_group_size=b, out_group_size=1, num_codebooks=1, nbits_per_codebook=8)
        layer.load_state_dict({**t, "bias": torch.randn(24, generator=g)})
        x = torch.randn(3, 5, 64, generator=g)
        with torch.no_grad():
            assert rel_err(layer(x), nn.functional.linear(x, w, layer.bias)) < TOL


def test_llama_aqlm_folder_loads_in_transformers_with_quantnoise_logits(tmp_path, caplog):
    model = llama()
    compress_(model, LayerRule(block_size=8, n_centroids=256))  # k_proj / v_proj (16, 32): 64 blocks, k = 64
    with caplog.at_level(logging.INFO, logger="quantnoise.hf.aqlm"):
        folder = hf.save_pretrained(model, tmp_path / "aqlm", format="aqlm")
    assert [r.levelname for r in caplog.records] == ["INFO"] and "model.embed_tokens: an embedding" in caplog.text
    hf.save_pretrained(model, tmp_path / "qnz")
    qc = qconfig(folder)
    assert qc == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 1,
                  "nbits_per_codebook": 8, "linear_weights_not_to_quantize": ["model.embed_tokens.weight"]}
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["model.layers.0.self_attn.k_proj.codebooks"][0, 64:].abs().sum() == 0  # padded past k = 64
    assert stored["lm_head.codes"].dtype == torch.int8 and stored["lm_head.codebooks"].dtype == torch.float16

    theirs = tf.AutoModelForCausalLM.from_pretrained(str(folder))  # transformers + aqlm: fp32 on CPU
    ours = hf.from_pretrained(tmp_path / "qnz")  # quantnoise's runtime, the same fp16 codebooks
    assert theirs.dtype == torch.float32 and type(theirs.model.embed_tokens) is nn.Embedding
    assert sum(isinstance(m, aqlm.QuantizedLinear) for m in theirs.modules()) == 15  # 7 per layer + lm_head
    x = ids()
    with torch.no_grad():
        assert rel_err(theirs(x).logits, ours(x).logits) < TOL
        assert rel_err(theirs(x[:1, :1]).logits, ours(x[:1, :1]).logits) < TOL  # batch-1 decoding's shape
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(theirs.generate(x[:1, :4], **gen), ours.generate(x[:1, :4], **gen))

    again = hf.save_pretrained(ours, tmp_path / "from-loaded", format="aqlm")  # a model loaded compressed: same codes
    assert {k: v.tolist() for k, v in load_file(str(again / "model.safetensors")).items()} == \
        {k: v.tolist() for k, v in stored.items()}


def test_float32_folder_equals_the_in_memory_compressed_model(tmp_path):
    model = llama(seed=3)
    compress_(model, LayerRule(block_size=4, n_centroids=256))
    folder = hf.save_pretrained(model, tmp_path / "aqlm32", format="aqlm", opts=ExportOptions(rest_dtype="float32"))
    assert qconfig(folder)["in_group_size"] == 4
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(folder))
    x = ids()
    with torch.no_grad():
        assert rel_err(theirs(x).logits, model(x).logits) < TOL


def test_bert_base_and_classifier_heads(tmp_path):
    base = bert()
    compress_(base, LayerRule(block_size=4, n_centroids=256))
    folder = hf.save_pretrained(base, tmp_path / "bert", format="aqlm")
    hf.save_pretrained(base, tmp_path / "bert-qnz")
    assert qconfig(folder)["linear_weights_not_to_quantize"] == [
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight"]
    theirs, ours = tf.AutoModel.from_pretrained(str(folder)), hf.from_pretrained(tmp_path / "bert-qnz")
    x = ids()
    with torch.no_grad():
        assert rel_err(theirs(x).last_hidden_state, ours(x).last_hidden_state) < TOL
        assert rel_err(theirs(x).pooler_output, ours(x).pooler_output) < TOL

    head = bert(tf.BertForSequenceClassification, seed=1)
    compress_(head, LayerRule(pattern=r"^bert\.encoder", block_size=4, n_centroids=256))  # pooler, classifier plain
    folder = hf.save_pretrained(head, tmp_path / "cls", format="aqlm")
    listed = qconfig(folder)["linear_weights_not_to_quantize"]
    assert "bert.pooler.dense.weight" in listed and "classifier.weight" in listed
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert type(theirs.classifier) is nn.Linear and isinstance(theirs.bert.encoder.layer[0].output.dense,
                                                               aqlm.QuantizedLinear)
    with torch.no_grad():
        assert rel_err(theirs(x).logits, head(x).logits) < 2e-3  # the fp16 rest of the folder against fp32


def test_layers_aqlm_cannot_hold_are_stored_dense_and_listed(tmp_path, caplog):
    model = llama(seed=2, tie_word_embeddings=True)
    plan = IPQPlan(stages=[LayerRule(pattern=r"mlp\.(gate|up)_proj", scheme="scalar", bits=4),  # int-N
                           LayerRule(pattern=r"o_proj", block_size=4, n_centroids=256),  # another block size
                           LayerRule(pattern=r"down_proj", block_size=2, n_centroids=512),  # k > 256 (int16 codes)
                           LayerRule(pattern=r".", block_size=8, n_centroids=256)])  # q/k/v, embed + tied lm_head
    compress_(model, plan)
    assert model.lm_head.centroids is model.model.embed_tokens.centroids
    with caplog.at_level(logging.WARNING, logger="quantnoise.hf.aqlm"):
        folder = hf.save_pretrained(model, tmp_path / "mixed", format="aqlm", opts=ExportOptions(rest_dtype="float32"))
    for why in ("mlp.up_proj: int-N", "o_proj: pq block size 4, not 8", "down_proj: pq with 512 centroids",
                "lm_head: tied to another weight", "model.embed_tokens: an embedding"):
        assert why in caplog.text
    listed = set(qconfig(folder)["linear_weights_not_to_quantize"])
    dense = {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj",
                                                                    "mlp.down_proj")}
    assert listed == dense
    stored = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied: transformers ties it to the embedding, as for its own folders
    assert torch.equal(stored["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(folder))
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert sum(isinstance(m, aqlm.QuantizedLinear) for m in theirs.modules()) == 6  # q, k, v of 2 layers
    x = ids()
    with torch.no_grad():
        assert rel_err(theirs(x).logits, model(x).logits) < TOL


def _gpt2():
    torch.manual_seed(0)
    m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32))
    compress_(m, LayerRule(block_size=8, n_centroids=256))
    return m


def _noised():
    m = llama()
    quantize_(m, QuantNoiseConfig(scheme="pq", p=0.1, block_size=8, n_centroids=256))
    return m


def _int4():
    m = llama()
    compress_(m, LayerRule(scheme="scalar", bits=4))
    return m


def _pq():
    m = llama()
    compress_(m, LayerRule(block_size=8, n_centroids=256))
    return m


@pytest.mark.parametrize("make, kw, says", [
    (lambda: nn.Sequential(nn.Linear(8, 8)), {}, "takes a transformers PreTrainedModel, not a Sequential"),
    (_noised, {}, "layer 'model.embed_tokens' is a Quant-Noise wrapper (QNEmbedding)"),
    (_int4, {}, "no nn.Linear of LlamaForCausalLM is iPQ with at most 256 centroids"),
    (_gpt2, {}, "no nn.Linear of GPT2LMHeadModel is iPQ"),  # Conv1D projections, lm_head tied to wte
    (_pq, {"opts": ExportOptions(centroids_dtype="int8")}, "centroids_dtype='int8'"),
    (_pq, {"format": "gguf"}, "format='gguf' is unknown"),
])
def test_refused_with_one_line(tmp_path, make, kw, says):
    with pytest.raises(ValueError) as err:
        hf.save_pretrained(make(), tmp_path / "out", **{"format": "aqlm", **kw})
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
