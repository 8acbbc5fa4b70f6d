"""Layer types of other libraries, handled lazily: quantnoise's core never imports those libraries.

``LAZY`` names, by qualified class name, the quantnoise module whose import registers the handlers of a type
(its noise wrapper in ``quantnoise.nn.WRAPPERS``, its compressed layers in ``quantnoise.compress.layers.COMPRESSED``,
its runtime layers here in ``RUNTIME``).  ``ensure_for(model)`` imports those modules for the types a model holds;
``quantize_``, ``compress_`` and the loaders call it, so a GPT-2 needs no ``import quantnoise.hf`` first.  A model
of a registered type (``MODEL_HOOKS``: a transformers ``PreTrainedModel``) is also handed to its hook there
(quantnoise.hf attaches its quantizer, so that ``model.save_pretrained`` writes the compressed folder).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional, Tuple, Type

from torch import nn

LAZY: Dict[str, str] = {"transformers.pytorch_utils.Conv1D": "quantnoise.hf.conv1d",  # class -> registering module
                        "transformers.modeling_utils.PreTrainedModel": "quantnoise.hf.quantizer",
                        "transformers.models.falcon.modeling_falcon.FalconLinear": "quantnoise.hf.linears"}
RUNTIME: Dict[Type[nn.Module], Tuple[Type[nn.Module], Type[nn.Module]]] = {}  # layer type -> (pq class, int class)
_SEEN: Dict[type, None] = {}
MODEL_HOOKS: Dict[Type[nn.Module], Callable[[nn.Module], None]] = {}  # root model type -> hook(model)


def ensure_for(model: nn.Module) -> None:
    """Import the handlers of every lazily supported layer type in ``model`` (once per type)."""
    for m in model.modules():
        kind = type(m)
        if kind in _SEEN:
            continue
        _SEEN[kind] = None
        for base in kind.__mro__:
            module = LAZY.get(f"{base.__module__}.{base.__qualname__}")
            if module is not None:
                importlib.import_module(module)
    for base, hook in MODEL_HOOKS.items():
        if isinstance(model, base):
            hook(model)


def register_model_hook(base: Type[nn.Module], hook: Callable[[nn.Module], None]) -> None:
    """``hook(model)`` for every model of type ``base`` that ``ensure_for`` meets (``quantize_``, ``compress_``,
    the loaders)."""
    MODEL_HOOKS[base] = hook


def register_runtime(base: Type[nn.Module], pq_class: Type[nn.Module], int_class: Type[nn.Module]) -> None:
    """The runtime layers (quantnoise.runtime) replacing a compressed ``base`` when a .qnz is loaded."""
    RUNTIME[base] = (pq_class, int_class)


def runtime_classes(like: nn.Module) -> Optional[Tuple[Type[nn.Module], Type[nn.Module]]]:
    """(pq class, int class) for ``like``: a registered type, a subclass keeping its forward, or a quant-noise
    wrapper of one."""
    kind = getattr(like, "qn_orig_class", type(like))
    for base, classes in RUNTIME.items():
        if issubclass(kind, base) and kind.forward is base.forward:
            return classes
    return None
