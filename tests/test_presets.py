"""presets.q8bert selects exactly the layers Q8BERT quantizes on a real Hugging Face BERT."""
import pytest
import torch
from torch import nn

from quantnoise import QNEmbedding, QNLinear, quantize_
from quantnoise.presets import Q8BERT_LAYERS, q8bert, qn_int4

hf = pytest.importorskip("quantnoise.hf")


@pytest.fixture(scope="module")
def bert_cls():
    pytest.importorskip("transformers")
    return hf.load_classifier(num_labels=3)


def test_q8bert_config_is_int8_qat_with_int8_activations():
    c = q8bert()
    assert (c.scheme, c.p, c.bits, c.symmetric, c.eval_quantized, c.act_bits, c.act_symmetric, c.act_granularity) == \
        ("scalar", 1.0, 8, True, True, 8, True, "tensor")  # one activation scale per tensor, as in the paper
    assert q8bert(act_granularity="channel").act_granularity == "channel"
    assert qn_int4(0.25).bits == 4 and qn_int4(0.25).p == 0.25 and qn_int4().act_bits is None


def test_q8bert_selects_every_linear_and_word_position_embeddings_of_hf_bert(bert_cls):
    linears = {n for n, m in bert_cls.named_modules() if isinstance(m, nn.Linear)}
    names = set(quantize_(bert_cls, q8bert()))
    expected = linears | {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"}
    assert names == expected
    assert len(linears) == 6 * 6 + 2  # q, k, v, attn out, intermediate, output per layer + pooler + classifier
    assert type(bert_cls.bert.embeddings.token_type_embeddings) is nn.Embedding  # segment table stays fp32
    assert all(type(m) in (nn.LayerNorm, nn.Dropout) or not list(m.parameters(recurse=False))
               or isinstance(m, (QNLinear, QNEmbedding)) or n.endswith("token_type_embeddings")
               for n, m in bert_cls.named_modules())
    ids = torch.tensor([[101, 7592, 2088, 102]])
    bert_cls.train()
    bert_cls(input_ids=ids)  # a training forward sets every Linear's input range
    assert all(m.qn_act_hi is not None for m in bert_cls.modules() if isinstance(m, QNLinear))


@pytest.mark.parametrize("name,selected", [
    ("encoder.sentence_encoder.embed_tokens", True), ("encoder.sentence_encoder.embed_positions", True),
    ("encoder.sentence_encoder.layers.0.self_attn.q_proj", True), ("encoder.sentence_encoder.layers.0.fc1", True),
    ("encoder.sentence_encoder.layers.0.self_attn.out_proj", True), ("encoder.lm_head.dense", True),
    ("classification_heads.sentence_classification_head.out_proj", True),
    ("encoder.sentence_encoder.segment_embeddings", False), ("bert.embeddings.token_type_embeddings", False),
    ("encoder.sentence_encoder.layers.0.self_attn_layer_norm", False)])
def test_q8bert_layer_names_of_fairseq_roberta(name, selected):
    import re

    assert (re.search(Q8BERT_LAYERS, name) is not None) == selected
