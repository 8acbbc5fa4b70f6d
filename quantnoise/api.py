"""The verbs: ``quantize_`` wraps matching layers with noise in place, ``unquantize_`` undoes it, ``compress_``
replaces matching layers by compressed ones (iPQ codes + codebook, or int-N weights)."""
from __future__ import annotations

import logging
import re
from typing import Callable, List, Optional, Union

from torch import nn
from torch.nn.utils import parametrize

from . import extensions
from .compress.layers import CompressedMixin, LayerRule, compress_tied, compressed_class, tied_layers
from .compress.plan import IPQPlan
from .config import QuantNoiseConfig
from .mixed import MixedPrecisionConfig
from .nn import WRAPPERS, QuantNoiseMixin, set_submodule, weight_is_computed, wrapper_for

logger = logging.getLogger(__name__)


def selects(cfg: QuantNoiseConfig, name: str) -> bool:
    """Whether ``cfg.include``/``cfg.exclude`` (regexes, re.search) select the module ``name``."""
    if cfg.include is not None and not re.search(cfg.include, name):
        return False
    return not (cfg.exclude is not None and re.search(cfg.exclude, name))


def quantize_(model: nn.Module, cfg: Union[QuantNoiseConfig, MixedPrecisionConfig],
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Wrap, in place, every supported layer whose qualified name matches ``cfg.include`` (regex,
    ``re.search``) and not ``cfg.exclude``; return the wrapped names.  With a ``MixedPrecisionConfig``
    (a bit plan, quantnoise.mixed): every layer the plan names, each with its own width, scale groups and p.

    Supported: the types in ``quantnoise.nn.WRAPPERS`` (Linear, Embedding, Conv1d, Conv2d) and
    subclasses that keep their forward.  Raises ValueError when nothing matches, naming the
    patterns, or when a block size does not divide a layer (nothing is wrapped then); for a plan, when it
    names a layer the model lacks or one no wrapper supports.
    """
    handler = QUANTIZERS.get(type(cfg))
    if handler is None:
        raise ValueError(f"quantize_ takes a QuantNoiseConfig or a MixedPrecisionConfig, not a {type(cfg).__name__}")
    return handler(model, cfg, filter_fn)


def _quantize_uniform(model: nn.Module, cfg: QuantNoiseConfig,
                      filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    extensions.ensure_for(model)  # e.g. GPT-2's Conv1D: its wrapper registers when transformers' type is met
    candidates = [(n, m) for n, m in model.named_modules() if n and wrapper_for(m) is not None]
    unsupported = [f"layer {n} ({type(m).__name__}{', weight norm' if weight_is_computed(m) else ''})"
                   for n, m in model.named_modules()
                   if n and _weighted_layer(m) and wrapper_for(m) is None and not isinstance(m, QuantNoiseMixin)
                   and selects(cfg, n) and (filter_fn is None or filter_fn(m, n))]
    if unsupported:
        logger.warning("quantize_: %d layer(s) match include=%r but no quant-noise wrapper supports them, left without "
                       "noise: %s (a weight-normed layer: its weight is computed by weight norm or another "
                       "parametrization; remove it first, e.g. parametrize.remove_parametrizations, to give it noise)",
                       len(unsupported), cfg.include, "; ".join(unsupported))
    chosen = [(n, m) for n, m in candidates if selects(cfg, n) and (filter_fn is None or filter_fn(m, n))]
    if not chosen:
        kinds = ", ".join(sorted(b.__name__ for b in WRAPPERS))
        sample = ", ".join(n for n, _ in candidates[:6]) or "none"
        raise ValueError(
            f"quant-noise include={cfg.include!r} exclude={cfg.exclude!r} matches no layer of "
            f"{type(model).__name__} (supported: {kinds}; first candidate names: {sample}); "
            f"fix the pattern (a regex searched in model.named_modules() names)"
        )
    if cfg.act_bits is not None and not any(hasattr(wrapper_for(m), "quantize_input") for _, m in chosen):
        raise ValueError(f"quant-noise act_bits={cfg.act_bits} quantizes the inputs of Linear (and GPT-2 Conv1D) layers, "
                         f"but the layers selected in {type(model).__name__} include none; set act_bits=None or select "
                         f"Linears")
    _swap(model, [(n, m, cfg) for n, m in chosen])
    return [n for n, _ in chosen]


def _swap(model: nn.Module, chosen) -> None:
    """Wrap each (name, module, config); a module registered under several names (tied embeddings) gets one
    shared wrapper.  Every wrapper is built before the first swap (a bad layer leaves the model as it was)."""
    wrapped = [(m, wrapper_for(m).from_float(m, cfg, n)) for n, m, cfg in chosen]  # may raise: nothing swapped yet
    names = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for old, new in wrapped:
        for name in names[id(old)]:
            set_submodule(model, name, new)


def _quantize_planned(model: nn.Module, cfg: MixedPrecisionConfig,
                      filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Each layer of the plan wrapped at its own width (``cfg.layer_config(name)``)."""
    extensions.ensure_for(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    missing = [n for n in cfg.layers if n not in modules]
    if missing:
        layers = [n for n, m in modules.items() if n and _matrix_layer(m)]
        sample = ", ".join(layers[:6]) + (f", ... ({len(layers)} in all)" if len(layers) > 6 else "") if layers else "none"
        raise ValueError(f"bit plan names {len(missing)} layer(s) that {type(model).__name__} lacks ({', '.join(missing[:3])}; "
                         f"its layers: {sample}); the plan was made for another model: recompute it or fix the names")
    chosen, seen = [], {}
    for name in cfg.layers:
        m = modules[name]
        if filter_fn is not None and not filter_fn(m, name):
            continue
        if isinstance(m, QuantNoiseMixin):
            raise ValueError(f"bit plan layer {name!r} is already wrapped ({type(m).__name__}); unquantize_(model) first")
        if wrapper_for(m) is None:
            raise ValueError(f"bit plan layer {name!r} is a {type(m).__name__}, which no quant-noise wrapper supports; "
                             f"remove it from the plan")
        layer_cfg = cfg.layer_config(name)
        if id(m) in seen:  # one module under two names (tied): one width
            other, other_cfg = seen[id(m)]
            if (other_cfg.bits, other_cfg.rows_per_scale) != (layer_cfg.bits, layer_cfg.rows_per_scale):
                raise ValueError(f"bit plan gives the tied layers {other!r} and {name!r} (one module) different widths "
                                 f"({other_cfg.bits} and {layer_cfg.bits} bits); give them the same")
            continue
        seen[id(m)] = (name, layer_cfg)
        chosen.append((name, m, layer_cfg))
    if not chosen:
        raise ValueError(f"bit plan: filter_fn leaves none of its {len(cfg.layers)} layers to wrap")
    _swap(model, chosen)
    return [n for n, _, _ in chosen]


QUANTIZERS = {QuantNoiseConfig: _quantize_uniform, MixedPrecisionConfig: _quantize_planned}  # config type -> verb


def unquantize_(model: nn.Module) -> List[str]:
    """Replace every quant-noise wrapper by its plain layer (same Parameter objects); return names.
    A wrapper shared under several names becomes one plain layer shared under the same names."""
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, QuantNoiseMixin)]
    plain, names = {}, []
    for name, m in found:
        if id(m) not in plain:
            plain[id(m)] = m.to_float()
            names.append(name)
        set_submodule(model, name, plain[id(m)])
    return names


def wrapped_layers(model: nn.Module) -> List[str]:
    """Names of the quant-noise wrappers in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantNoiseMixin)]


def _matrix_layer(m: nn.Module) -> bool:
    """A leaf layer owning a weight matrix (2-d or more): what a pattern means to select."""
    w = m._parameters.get("weight")
    return isinstance(w, nn.Parameter) and not nn.parameter.is_lazy(w) and w.dim() >= 2


def _weighted_layer(m: nn.Module) -> bool:
    """A layer holding a weight matrix of its own under any name (an LSTM's ``weight_ih_l0``), or a computed one
    (weight norm); a parametrization's own store (``ParametrizationList``) is its layer's part, not a layer."""
    if isinstance(m, parametrize.ParametrizationList):
        return False
    own = any(isinstance(p, nn.Parameter) and not nn.parameter.is_lazy(p) and p.dim() >= 2
              for p in m._parameters.values())
    return own or weight_is_computed(m)


def compress_(model: nn.Module, rule_or_plan: Union[LayerRule, IPQPlan],
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Replace, in place, every layer whose qualified name a rule matches by its compressed version (iPQ:
    ``codes`` + a ``centroids`` Parameter that a plain PyTorch loop or ``Trainer`` fine-tunes, Stock et al.'s
    mean-gradient rule; int-N: frozen int weights); return the compressed names.  A quant-noise wrapper is
    compressed as the layer it wraps (noise fine-tune, then ``compress_``).

    ``rule_or_plan``: one ``LayerRule``, or an ``IPQPlan`` (a layer takes the first stage whose pattern matches;
    every stage is applied now: stage by stage with fine-tuning in between is the caller's loop, or
    ``hf.QuantNoiseCallback`` / ``fairseq-train --ipq-plan``).  k-means is seeded per layer by the plan's seed
    and the layer name.  Layers that share a weight (tied embeddings, an output projection) get one codebook,
    shared, as soon as one of them is selected.  A selected layer of a type that cannot be compressed is named in
    a warning; ValueError when nothing is compressed."""
    if not isinstance(rule_or_plan, (LayerRule, IPQPlan)):
        raise ValueError(f"compress_ takes a LayerRule or an IPQPlan, not a {type(rule_or_plan).__name__}; build one: "
                         f"LayerRule(pattern=..., scheme='pq', block_size=8, n_centroids=256)")
    plan = rule_or_plan if isinstance(rule_or_plan, IPQPlan) else IPQPlan(stages=[rule_or_plan])
    extensions.ensure_for(model)
    skipped = [f"layer {n} ({type(m).__name__}{', weight norm' if weight_is_computed(m) else ''})"
               for n, m in model.named_modules()
               if n and _weighted_layer(m) and not _matrix_layer(m) and not isinstance(m, CompressedMixin)
               and plan.rule_for(n)[1] is not None and (filter_fn is None or filter_fn(m, n))]
    if skipped:  # a weight under other names (LSTM) or a computed one (weight norm): no compressed layer takes it
        logger.warning("compress_: %d selected layer(s) hold weights no compressed layer supports, left as they are: "
                       "%s", len(skipped), "; ".join(skipped))
    done: List[str] = []
    for members in tied_layers(model):
        members = [(name, m) for name, m in members if _matrix_layer(m) and not isinstance(m, CompressedMixin)]
        chosen = [(name, m) for name, m in members
                  if plan.rule_for(name)[1] is not None and (filter_fn is None or filter_fn(m, name))]
        if not chosen:
            continue
        name, module = chosen[0]
        rule = plan.rule_for(name)[1]
        unsupported = [(n, m) for n, m in members if compressed_class(m, rule.scheme) is None]
        tied = len(unsupported) < len(members)  # then it reads the decoded weight of the layer it is tied to
        for n, m in unsupported:
            logger.warning("compress_: layer %s (%s) matches %r but no compressed layer supports its type; %s", n,
                           type(m).__name__, rule.pattern, "it reads the decoded weight it is tied to" if tied
                           else "left as it is")
        made = compress_tied(members, rule, seed=plan.layer_seed(name))
        for n, new in made:
            set_submodule(model, n, new)
            done.append(n)
        if len(made) > 1:
            logger.info("compress_: %s share one codebook (tied weight)", ", ".join(n for n, _ in made))
    if not done:
        sample = ", ".join(n for n, m in model.named_modules() if n and _matrix_layer(m))
        raise ValueError(f"compress_: the patterns {[r.pattern for r in plan.stages]} compress no layer of "
                         f"{type(model).__name__} (layers with a weight matrix: {sample[:300] or 'none'}); fix the "
                         f"patterns (regexes searched in model.named_modules() names)")
    return done
