"""Architectures that wrap fairseq's own, with the noise applied by our wrappers after building.

=====================  ==============================  =========================================
model (``--arch``)     wraps                            tasks
=====================  ==============================  =========================================
``qn_transformer_lm``  ``transformer_lm``               language_modeling
``qn_transformer``     ``transformer``                  translation
``qn_roberta``         ``roberta``                      masked_lm, sentence_prediction
=====================  ==============================  =========================================

Every stock size variant ``X`` of those models is registered as ``qn_X`` with fairseq's own
architecture function (``qn_transformer_lm_gpt``, ``qn_transformer_wmt_en_de_big``,
``qn_roberta_base``, ``qn_roberta_large``, ...), plus ``qn_transformer_lm_tiny`` and ``qn_roberta_tiny`` for tests and demos
(``qn_transformer_tiny`` mirrors fairseq's ``transformer_tiny``).
The parameters keep their names and shapes, so checkpoints load into the plain architecture too.
"""

from dataclasses import dataclass

from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY, register_model, register_model_architecture
from fairseq.models.roberta import RobertaModel
from fairseq.models.roberta.model import base_architecture as roberta_base_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from quantnoise import MixedPrecisionConfig, quantize_
from quantnoise.api import selects

from .args import QuantNoiseArgs, add_quant_noise_args, apply_quant_noise, noise_config
from .ipq import attach_ipq


def build_noised(build, args, task, later: tuple = ()):
    """fairseq's own ``build(args, task)`` with its quant-noise fields zeroed, then our wrappers
    (``model.qn_cfg`` keeps the config for layers added later, under the name prefixes ``later``) and the
    iPQ stage hook."""
    cfg = noise_config(args)
    model = build(args, task)
    apply_quant_noise(model, cfg, later)
    attach_ipq(model, args)
    model.qn_cfg = cfg
    return model


@dataclass
class QNTransformerLMConfig(TransformerLanguageModelConfig, QuantNoiseArgs):
    pass


@register_model("qn_transformer_lm", dataclass=QNTransformerLMConfig)
class QNTransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        return build_noised(super().build_model, args, task)


@register_model("qn_transformer")
class QNTransformerModel(TransformerModel):
    """fairseq's ``transformer`` is an argparse model (no dataclass), so is this one."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_quant_noise_args(parser)

    @classmethod
    def build_model(cls, args, task):
        return build_noised(super().build_model, args, task)


@register_model("qn_roberta")
class QNRobertaModel(RobertaModel):
    """RoBERTa; classification heads registered later (sentence_prediction, or a checkpoint's heads
    on load) get the same noise as the encoder when the layer patterns select them."""

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_quant_noise_args(parser)

    @classmethod
    def build_model(cls, args, task):
        return build_noised(super().build_model, args, task, later=("classification_heads.",))

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        cfg = getattr(self, "qn_cfg", None)
        prefix = f"classification_heads.{name}."
        if cfg is None:
            return
        if isinstance(cfg, MixedPrecisionConfig):  # the head's layers the plan names, at their widths
            head = cfg.subset(lambda n: n.startswith(prefix))
            if head is not None:
                quantize_(self, head)
            return

        def in_head(module, n):  # quantize_ also applies cfg.include / cfg.exclude
            return n.startswith(prefix)

        if any(in_head(m, n) and selects(cfg, n) for n, m in self.named_modules()):
            quantize_(self, cfg, filter_fn=in_head)


# ------------------------------------------------------------------------------- size variants
def _mirror(stock_model: str, our_model: str) -> None:
    """Register ``qn_X`` for every architecture ``X`` of ``stock_model`` (its own arch function)."""
    for arch in list(ARCH_MODEL_INV_REGISTRY.get(stock_model, [])):
        name = our_model if arch == stock_model else f"qn_{arch}"
        if name not in ARCH_CONFIG_REGISTRY:
            register_model_architecture(our_model, name)(ARCH_CONFIG_REGISTRY[arch])


@register_model_architecture("qn_transformer_lm", "qn_transformer_lm_tiny")
def qn_transformer_lm_tiny(args):
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    base_lm_architecture(args)


@register_model_architecture("qn_roberta", "qn_roberta_tiny")
def qn_roberta_tiny(args):
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 256)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    roberta_base_architecture(args)


_mirror("transformer_lm", "qn_transformer_lm")
_mirror("transformer", "qn_transformer")
_mirror("roberta", "qn_roberta")
