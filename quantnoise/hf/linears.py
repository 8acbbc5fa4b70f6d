"""transformers' Linear subclasses whose own ``forward`` computes exactly nn.Linear's ``x @ W.T + b``, run
compressed by quantnoise.runtime's Linear kernels (``CodesLinear`` / ``IntLinear``) instead of being decoded at load:

  - Falcon's ``FalconLinear`` (``input @ self.weight.T`` then ``+ self.bias``: the same product, unfused).

A subclass with any other forward is never replaced by a plain runtime Linear (quantnoise/runtime/load.py
``_keeps_base_forward``).  Importing this module registers them (quantnoise.extensions imports it when a model
holds one); tests/test_hf_arches.py checks each forward against ``F.linear``.
"""
from __future__ import annotations

import importlib

from .. import extensions
from ..runtime.layers import CodesLinear, IntLinear

LINEAR_FORWARD = {"transformers.models.falcon.modeling_falcon": "FalconLinear"}  # module -> class

for _module, _name in LINEAR_FORWARD.items():
    try:
        _cls = getattr(importlib.import_module(_module), _name)
    except (ImportError, AttributeError):  # another transformers version: nothing to register
        continue
    extensions.register_runtime(_cls, CodesLinear, IntLinear)
