"""Architectures that wrap fairseq's own, with the noise applied by our wrappers after building."""

from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from .args import QuantNoiseArgs, apply_quant_noise, noise_config
from .ipq import attach_ipq


@dataclass
class QNTransformerLMConfig(TransformerLanguageModelConfig, QuantNoiseArgs):
    pass


@register_model("qn_transformer_lm", dataclass=QNTransformerLMConfig)
class QNTransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        cfg = noise_config(args)
        model = super().build_model(args, task)
        apply_quant_noise(model, cfg)
        attach_ipq(model, args)
        return model


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm_tiny")
def qn_transformer_lm_tiny(args):
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    base_lm_architecture(args)
