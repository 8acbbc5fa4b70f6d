"""The verbs: ``quantize_`` wraps matching layers in place, ``unquantize_`` undoes it."""
from __future__ import annotations

import re
from typing import Callable, List, Optional

from torch import nn

from .config import QuantNoiseConfig
from .nn import WRAPPERS, QuantNoiseMixin, wrapper_for


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def selects(cfg: QuantNoiseConfig, name: str) -> bool:
    """Whether ``cfg.include``/``cfg.exclude`` (regexes, re.search) select the module ``name``."""
    if cfg.include is not None and not re.search(cfg.include, name):
        return False
    return not (cfg.exclude is not None and re.search(cfg.exclude, name))


def quantize_(model: nn.Module, cfg: QuantNoiseConfig,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> List[str]:
    """Wrap, in place, every supported layer whose qualified name matches ``cfg.include`` (regex,
    ``re.search``) and not ``cfg.exclude``; return the wrapped names.

    Supported: the types in ``quantnoise.nn.WRAPPERS`` (Linear, Embedding, Conv1d, Conv2d) and
    subclasses that keep their forward.  Raises ValueError when nothing matches, naming the
    patterns, or when a block size does not divide a layer (nothing is wrapped then).
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and wrapper_for(m) is not None]
    chosen = [(n, m) for n, m in candidates if selects(cfg, n) and (filter_fn is None or filter_fn(m, n))]
    if not chosen:
        kinds = ", ".join(sorted(b.__name__ for b in WRAPPERS))
        sample = ", ".join(n for n, _ in candidates[:6]) or "none"
        raise ValueError(
            f"quant-noise include={cfg.include!r} exclude={cfg.exclude!r} matches no layer of "
            f"{type(model).__name__} (supported: {kinds}; first candidate names: {sample}); "
            f"fix the pattern (a regex searched in model.named_modules() names)"
        )
    if cfg.act_bits is not None and not any(isinstance(m, nn.Linear) for _, m in chosen):
        raise ValueError(f"quant-noise act_bits={cfg.act_bits} quantizes the inputs of Linear layers, but the layers "
                         f"selected in {type(model).__name__} include no Linear; set act_bits=None or select Linears")
    wrapped = [(m, wrapper_for(m).from_float(m, cfg, n)) for n, m in chosen]  # may raise: nothing swapped yet
    names = {}  # a module registered under several names (tied embeddings) gets one shared wrapper
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for old, new in wrapped:
        for name in names[id(old)]:
            _set_submodule(model, name, new)
    return [n for n, _ in chosen]


def unquantize_(model: nn.Module) -> List[str]:
    """Replace every quant-noise wrapper by its plain layer (same Parameter objects); return names.
    A wrapper shared under several names becomes one plain layer shared under the same names."""
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and isinstance(m, QuantNoiseMixin)]
    plain, names = {}, []
    for name, m in found:
        if id(m) not in plain:
            plain[id(m)] = m.to_float()
            names.append(name)
        _set_submodule(model, name, plain[id(m)])
    return names


def wrapped_layers(model: nn.Module) -> List[str]:
    """Names of the quant-noise wrappers in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantNoiseMixin)]
