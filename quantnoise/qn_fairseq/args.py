"""The ``--quant-noise-*`` flags as a dataclass mixin, and their translation to the core config.

fairseq's own ``--quant-noise-pq P --quant-noise-pq-block-size B`` means scheme drop, p=P, block B;
``--quant-noise-scalar P`` means scheme scalar, 8 bits, p=P.  Both are served by our wrappers: the
fairseq fields are zeroed before the model is built, so fairseq adds neither its hooks nor the extra
random ``Linear`` it puts after the embeddings.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import List, Optional, Union

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.modules import MultiheadAttention
import torch
import torch.nn.functional as F
from torch import nn

from quantnoise import MixedPrecisionConfig, QuantNoiseConfig, quantize_
from quantnoise.checkpoint import FAIRSEQ_QN_FIELDS  # fairseq's own fields, reinterpreted by our archs
from quantnoise.config import ACT_GRANULARITIES, SCHEMES

logger = logging.getLogger(__name__)

# core field -> command-line flag, for error messages that name what the user typed
FLAGS = {
    "scheme": "--quant-noise-scheme", "p": "--quant-noise-p", "block_size": "--quant-noise-block-size",
    "bits": "--quant-noise-bits", "n_centroids": "--quant-noise-centroids", "include": "--quant-noise-layers",
    "exclude": "--quant-noise-exclude", "eval_quantized": "--quant-noise-eval-quantized",
    "seed": "--quant-noise-seed", "granularity": "--quant-noise-granularity",
    "refresh_every": "--quant-noise-refresh-every",
    "act_bits": "--quant-noise-act-bits", "act_ema_momentum": "--quant-noise-act-ema-momentum",
    "act_symmetric": "--quant-noise-act-symmetric", "act_granularity": "--quant-noise-act-granularity",
    "plan": "--quant-noise-plan",
}


@dataclass
class QuantNoiseArgs:
    quant_noise_scheme: ChoiceEnum(SCHEMES) = field(default="drop", metadata={"help": "noise scheme: drop | scalar | pq"})
    quant_noise_p: float = field(default=0.0, metadata={"help": "probability a weight block is noised per training forward (0 = plain model)"})
    quant_noise_block_size: int = field(default=8, metadata={"help": "weights per block (must divide each noised layer's row length)"})
    quant_noise_bits: int = field(default=8, metadata={"help": "scalar scheme: bits, 2..8"})
    quant_noise_granularity: ChoiceEnum(["tensor", "channel", "group"]) = field(default="channel", metadata={"help": "scalar scheme: one scale per tensor | output channel | group"})
    quant_noise_centroids: int = field(default=256, metadata={"help": "pq scheme: centroids per layer codebook"})
    quant_noise_refresh_every: int = field(default=1000, metadata={"help": "pq scheme: rebuild codebooks every N training forwards"})
    quant_noise_layers: Optional[str] = field(default=None, metadata={"help": "regex of module names to noise (default: every Linear/Embedding/Conv)"})
    quant_noise_exclude: Optional[str] = field(default=None, metadata={"help": "regex of module names to leave alone"})
    quant_noise_eval_quantized: bool = field(default=False, metadata={"help": "evaluate with every block quantized (scalar/pq)"})
    quant_noise_seed: int = field(default=1, metadata={"help": "seed of noise masks and k-means (same on every rank)"})
    quant_noise_act_bits: Optional[int] = field(default=None, metadata={"help": "fake-quantize the input activations of noised Linear layers to N bits (Q8BERT: 8), EMA range; default: float"})
    quant_noise_act_ema_momentum: float = field(default=0.01, metadata={"help": "activations: weight of the newest batch in the EMA of their range"})
    quant_noise_act_symmetric: bool = field(default=True, metadata={"help": "activations: symmetric grid on max|x| (Q8BERT) instead of affine min/max"})
    quant_noise_act_granularity: ChoiceEnum(ACT_GRANULARITIES) = field(default="tensor", metadata={"help": "activations: one scale per tensor (Q8BERT) | token (per row, dynamic) | channel (per input feature, EMA)"})
    quant_noise_plan: Optional[str] = field(default=None, metadata={"help": "bit plan YAML / JSON (quantnoise sensitivity -o plan.yaml): "
                                                                    "scalar fake quantization of each layer it names at its own width and scale groups; "
                                                                    "--quant-noise-p 0 (default) means full QAT (p=1), else Quant-Noise at that p; "
                                                                    "evaluation quantized (docs/sensitivity.md)"})
    ipq_plan: Optional[str] = field(default=None, metadata={"help": "iPQ stage plan YAML: quantize layers stage by stage and fine-tune their centroids (docs/ipq_export.md)"})


@dataclass
class QuantNoiseFlags(FairseqDataclass, QuantNoiseArgs):
    """The same fields as a FairseqDataclass, for the argparse models (translation, RoBERTa)."""


def add_quant_noise_args(parser) -> None:
    """Add the ``--quant-noise-*`` flags to an argparse model's parser (``add_args``)."""
    gen_parser_from_dataclass(parser, QuantNoiseFlags())


def noise_config(args) -> Union[None, QuantNoiseConfig, MixedPrecisionConfig]:
    """The core config the flags ask for (None: no noise; a MixedPrecisionConfig with --quant-noise-plan).
    Zeroes fairseq's own quant-noise fields.  Exits with one line naming the flag, the value and what is
    allowed when a value is bad."""
    _check_keys(args)
    args = _Defaults(args)
    if args.quant_noise_plan:
        return plan_config(args)
    fs_pq, fs_scalar = float(getattr(args, "quant_noise_pq", 0) or 0), float(getattr(args, "quant_noise_scalar", 0) or 0)
    kw = dict(scheme=str(args.quant_noise_scheme), p=float(args.quant_noise_p), block_size=int(args.quant_noise_block_size),
              bits=int(args.quant_noise_bits), granularity=str(args.quant_noise_granularity),
              n_centroids=int(args.quant_noise_centroids), refresh_every=int(args.quant_noise_refresh_every),
              include=args.quant_noise_layers or None, exclude=args.quant_noise_exclude or None,
              eval_quantized=bool(args.quant_noise_eval_quantized), seed=int(args.quant_noise_seed),
              act_bits=None if args.quant_noise_act_bits is None else int(args.quant_noise_act_bits),
              act_ema_momentum=float(args.quant_noise_act_ema_momentum), act_symmetric=bool(args.quant_noise_act_symmetric),
              act_granularity=str(args.quant_noise_act_granularity))
    if fs_pq > 0:
        kw.update(scheme="drop", p=fs_pq, block_size=int(getattr(args, "quant_noise_pq_block_size", 8)))
    elif fs_scalar > 0:
        kw.update(scheme="scalar", p=fs_scalar, bits=8)
    args.quant_noise_pq, args.quant_noise_scalar = 0.0, 0.0
    try:
        cfg = QuantNoiseConfig(**kw)
    except ValueError as e:
        raise SystemExit(f"error: {flag_message(str(e))}") from None
    if cfg.p == 0.0 and not cfg.eval_quantized and cfg.act_bits is None:
        return None
    return cfg


def plan_config(args) -> MixedPrecisionConfig:
    """``--quant-noise-plan FILE``: the plan's widths, p = --quant-noise-p (0: full QAT, p=1), evaluation quantized."""
    if str(args.quant_noise_scheme) == "pq" or float(getattr(args, "quant_noise_pq", 0) or 0) > 0 \
            or float(getattr(args, "quant_noise_scalar", 0) or 0) > 0:
        raise SystemExit("error: --quant-noise-plan gives each layer a scalar width; drop --quant-noise-scheme pq / "
                         "--quant-noise-pq / --quant-noise-scalar")
    if args.quant_noise_layers or args.quant_noise_exclude:
        raise SystemExit("error: --quant-noise-plan names its layers itself; drop --quant-noise-layers / --quant-noise-exclude")
    args.quant_noise_pq, args.quant_noise_scalar = 0.0, 0.0
    p = float(args.quant_noise_p) or 1.0
    try:
        return MixedPrecisionConfig.from_plan(
            str(args.quant_noise_plan), p=p, block_size=int(args.quant_noise_block_size) if p < 1 else 1,
            seed=int(args.quant_noise_seed), act_bits=None if args.quant_noise_act_bits is None else int(args.quant_noise_act_bits))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --quant-noise-plan {args.quant_noise_plan}: {flag_message(str(e))}") from None


def _check_keys(args) -> None:
    """A Hydra model node of an argparse model is untyped: catch misspelt ``quant_noise_*`` keys."""
    known = set(QuantNoiseArgs.__dataclass_fields__) | FAIRSEQ_QN_FIELDS
    keys = args.keys() if hasattr(args, "keys") else vars(args)
    unknown = sorted(k for k in keys if str(k).startswith("quant_noise") and k not in known)
    if unknown:
        raise SystemExit(f"error: unknown model option(s) {', '.join(unknown)}; "
                         f"the quant-noise options are: {', '.join(sorted(known))}")


class _Defaults:
    """Read ``args`` (Namespace or DictConfig) falling back to QuantNoiseArgs' defaults (fairseq's
    argparse path deletes dataclass defaults so that architecture functions can fill them)."""

    def __init__(self, args):
        self.__dict__["_args"], self.__dict__["_dflt"] = args, QuantNoiseArgs()

    def __getattr__(self, name):
        value = getattr(self._args, name, None)
        return getattr(self._dflt, name, None) if value is None and hasattr(self._dflt, name) else value

    def __setattr__(self, name, value):
        setattr(self._args, name, value)


def flag_message(msg: str) -> str:
    """Rewrite core messages ('quant-noise p=1.5 ...', 'block_size=7 ...') with the flag names
    ('--quant-noise-p=1.5 ...', '--quant-noise-block-size=7 ...')."""
    msg = re.sub(r"quant-noise (\w+)=", lambda m: f"{FLAGS.get(m.group(1), m.group(1))}=", msg)
    return re.sub(r"\bblock_size=", f"{FLAGS['block_size']}=", msg)


def apply_quant_noise(model: nn.Module, cfg: Union[None, QuantNoiseConfig, MixedPrecisionConfig],
                      later: tuple = ()) -> List[str]:
    """Wrap the model's layers and route fairseq attention through its projection modules.  ``later``: name
    prefixes of layers built after the model (RoBERTa's classification heads), wrapped when they are added."""
    if cfg is None:
        return []
    if isinstance(cfg, MixedPrecisionConfig):
        cfg = cfg.subset(lambda n: not n.startswith(later))
        if cfg is None:
            return []
    try:
        names = quantize_(model, cfg)
    except ValueError as e:
        flag = "--quant-noise-plan: " if isinstance(cfg, MixedPrecisionConfig) else ""
        raise SystemExit(f"error: {flag}{flag_message(str(e))}") from None
    from quantnoise.nn import QuantNoiseMixin

    route_attention(model, (QuantNoiseMixin,))  # where a projection is wrapped
    if isinstance(cfg, MixedPrecisionConfig):
        widths = sorted({s.bits for s in cfg.layers.values()})
        logger.info("quant-noise bit plan (p=%s, widths %s) on %d layers: %s", cfg.p, widths, len(names), ", ".join(names))
    else:
        logger.info("quant-noise %s p=%s on %d layers: %s", cfg.scheme, cfg.p, len(names), ", ".join(names))
    return names


def route_attention(model: nn.Module, wrapped_by: Optional[tuple] = None) -> None:
    """fairseq's MultiheadAttention fast path reads ``q/k/v/out_proj.weight`` directly, so module
    forwards (ours, or fairseq's hooks) never run there.  Its ``skip_embed_dim_check`` switch makes
    it call ``self.q_proj(query)`` etc. instead; it is set on every attention module, or (``wrapped_by``:
    layer classes) on those with a projection of one of these classes.  A plain ``MultiheadAttention``
    also becomes a ``RoutedMultiheadAttention``, so that in eval it keeps the fast path's fused attention."""
    for m in model.modules():
        if isinstance(m, MultiheadAttention) and (wrapped_by is None or any(
            isinstance(getattr(m, p, None), wrapped_by) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))):
            m._set_skip_embed_dim_check()
            if type(m) is MultiheadAttention:
                m.__class__ = RoutedMultiheadAttention


class RoutedMultiheadAttention(MultiheadAttention):
    """fairseq's MultiheadAttention whose projections are called as modules.  Where fairseq would take
    its fast path (``F.multi_head_attention_forward``: no incremental state, no static key/value, no
    xformers) and nothing else is asked (eval without attention dropout, no returned weights, no
    bias_k/v, no zero attention), it computes the same thing: projections through the modules, then
    ``F.scaled_dot_product_attention`` with fairseq's masks merged as torch's function merges them
    (the fused kernel, instead of fairseq's manual bmm / softmax / bmm path, 1.6x slower on CPU).
    Incremental decoding's self-attention with no masks (batch-1 generation: one token per step) likewise: the
    new key / value appended to the cache fairseq keeps in ``incremental_state`` (same entries, same layout, so
    beam reordering and fairseq's own forward on a later step read it), then the fused attention: ~15 tensor
    ops where fairseq's path has ~40.  Anything else: fairseq's own forward."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        fused = not (static_kv or need_weights or need_head_weights or before_softmax
                     or key is None or value is None or self.onnx_trace or self.use_xformers
                     or self.bias_k is not None or self.add_zero_attn or query.device.type == "xla"
                     or ((self.training or self.dropout_module.apply_during_inference) and self.dropout_module.p > 0)
                     or torch.jit.is_scripting())
        if fused and incremental_state is None:
            return self._sdpa(query, key, value, key_padding_mask, attn_mask), None
        if fused and self.self_attention and key_padding_mask is None and attn_mask is None:
            saved = self._get_input_buffer(incremental_state)
            if saved.get("prev_key_padding_mask") is None:  # no padding so far (else fairseq keeps extending it)
                return self._sdpa_step(query, saved, incremental_state), None
        return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                               static_kv, attn_mask, before_softmax, need_head_weights)

    def _sdpa_step(self, query, saved, incremental_state):
        """One incremental step: fairseq's ``prev_key`` / ``prev_value`` (B, H, S, hd), contiguous, grown by the new
        positions; the queries attend to every cached position (fairseq's incremental decoding has no mask)."""
        tgt, bsz, dim = query.shape
        heads = self.num_heads
        q = self.q_proj(query).view(tgt, bsz, heads, -1).permute(1, 2, 0, 3)  # (B, H, T, hd)
        k = self.k_proj(query).view(tgt, bsz, heads, -1).permute(1, 2, 0, 3)
        v = self.v_proj(query).view(tgt, bsz, heads, -1).permute(1, 2, 0, 3)
        if "prev_key" in saved:
            k, v = torch.cat([saved["prev_key"], k], 2), torch.cat([saved["prev_value"], v], 2)
        else:
            k, v = k.contiguous(), v.contiguous()
        saved["prev_key"], saved["prev_value"], saved["prev_key_padding_mask"] = k, v, None
        self._set_input_buffer(incremental_state, saved)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, dim))

    def _sdpa(self, query, key, value, key_padding_mask, attn_mask):
        tgt, bsz, dim = query.shape
        src, heads = key.shape[0], self.num_heads
        q = self.q_proj(query).view(tgt, bsz, heads, -1).permute(1, 2, 0, 3)  # (B, H, T, hd)
        k = self.k_proj(key).view(src, bsz, heads, -1).permute(1, 2, 0, 3)
        v = self.v_proj(value).view(src, bsz, heads, -1).permute(1, 2, 0, 3)
        mask = None
        if attn_mask is not None:  # (T, S): additive, or bool with True = not allowed (fairseq / torch MHA)
            mask = _additive(attn_mask, q.dtype).reshape(1, 1, tgt, src)
        if key_padding_mask is not None:  # (B, S), nonzero = padding
            pad = _additive(key_padding_mask.bool(), q.dtype).reshape(bsz, 1, 1, src)
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1 / sqrt(hd) = self.scaling
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, dim))


def _additive(mask, dtype):
    """An attention mask as additive floats: a bool mask's True -> -inf (torch MHA's ``_canonical_mask``)."""
    if not mask.is_floating_point():  # bool / byte: nonzero = not allowed
        mask = mask.bool()
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
