"""Ready-made configs for the BERT family.

``q8bert()`` is Q8BERT (Zafrir et al. 2019, "Q8BERT: Quantized 8Bit BERT"; Intel NLP Architect's
QuantizedBertModel): 8-bit symmetric linear quantization of the weights of every GEMM (all Linear
layers) and of the word and position embeddings, trained with fake quantization and the
straight-through estimator (p = 1: every block quantized on every forward, i.e. quantization-aware
training), and the *inputs* of every quantized Linear fake-quantized to 8 bits with an EMA of their
range.  Softmax, LayerNorm, GELU and the token-type (segment) embeddings stay fp32.  Weights get one
scale per output row (Q8BERT uses one per tensor; per-row is what a .qnz stores, so the exported
model is exactly the evaluated one).

``Q8BERT_LAYERS`` names those layers in both families:
  - Hugging Face BERT / RoBERTa: ``*.embeddings.word_embeddings``, ``*.embeddings.position_embeddings``,
    ``*.attention.self.{query,key,value}``, ``*.dense`` (attention output, intermediate, output,
    pooler, RoBERTa head), ``classifier`` / ``classifier.out_proj``;
  - fairseq RoBERTa: ``*.embed_tokens``, ``*.embed_positions``, ``*.self_attn.{q,k,v,out}_proj``,
    ``*.fc1``, ``*.fc2``, ``*.lm_head.dense``, ``classification_heads.*.{dense,out_proj}``.

    from quantnoise import quantize_
    from quantnoise.presets import q8bert
    quantize_(model, q8bert())
"""
from __future__ import annotations

from .config import QuantNoiseConfig

Q8BERT_LAYERS = (r"(^|\.)(word_embeddings|position_embeddings|embed_tokens|embed_positions"
                 r"|query|key|value|q_proj|k_proj|v_proj|out_proj|dense|fc1|fc2|classifier)$")


def q8bert(act_ema_momentum: float = 0.01, seed: int = 0, include: str = Q8BERT_LAYERS,
           act_granularity: str = "tensor") -> QuantNoiseConfig:
    """Q8BERT: int8 symmetric weights (Linear + word/position embeddings) and int8 Linear inputs, QAT.
    ``act_granularity``: "tensor" is the paper's one scale per Linear input; "token" / "channel" are finer."""
    return QuantNoiseConfig(scheme="scalar", p=1.0, bits=8, symmetric=True, granularity="channel", block_size=8,
                            eval_quantized=True, act_bits=8, act_symmetric=True, act_ema_momentum=act_ema_momentum,
                            act_granularity=act_granularity, include=include, seed=seed)


def qn_int4(p: float = 0.5, seed: int = 0, include: str = Q8BERT_LAYERS) -> QuantNoiseConfig:
    """Quant-Noise with int4 symmetric per-row weights on the Q8BERT layers (a random ``p`` of the
    weight blocks of 8 quantized per training forward, all of them in eval); activations stay float."""
    return QuantNoiseConfig(scheme="scalar", p=p, bits=4, symmetric=True, granularity="channel", block_size=8,
                            eval_quantized=True, include=include, seed=seed)
