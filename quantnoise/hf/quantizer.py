"""The ``quantnoise`` quantization method of ``transformers`` (its extension point for packages: a
``QuantizationConfigMixin`` and an ``HfQuantizer`` registered under a name).  A folder whose config.json holds
``quantization_config: {quant_method: quantnoise, weights: model.qnz}`` (written by
``quantnoise.hf.save_pretrained``) then loads compressed through ``AutoModel*.from_pretrained(dir)`` itself.

How: transformers builds the model on ``meta`` (``init_empty_weights``, as for every quantized checkpoint), finds
the folder's index of no shard (so it loads no tensor), is told that no key is missing (``update_missing_keys``:
nothing is randomly initialized), ties the embeddings on meta, and then ``_process_model_after_weight_loading``
fills the model from ``model.qnz`` with runtime layers (quantnoise/hf/pretrained.py ``fill_from_folder``).
Quantizing on load (``from_pretrained(..., quantization_config=QuantNoiseHfConfig())`` of an fp32 checkpoint) is
not offered: compress with ``quantnoise.compress_`` (k-means, optionally centroid fine-tuning), then save.
"""
from __future__ import annotations

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .pretrained import WEIGHTS, fill_from_folder, folder_of

METHOD = "quantnoise"


class QuantNoiseHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a quantnoise folder: where the .qnz is (the rest is in the .qnz's own map)."""

    def __init__(self, weights: str = WEIGHTS, **kwargs):
        self.quant_method = METHOD
        self.weights = weights
        for key, value in kwargs.items():  # format_version, compressed_layers: informative
            if key != "quant_method":
                setattr(self, key, value)


class QuantNoiseHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized folders only (see the module docstring)
    required_packages = None

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError(f"a quantnoise model loads on one device, not a device_map over {set(device_map.values())}; "
                             f"load it without device_map, then .to(device)")

    def update_missing_keys(self, model, missing_keys, prefix):
        return []  # every tensor comes from model.qnz, after the (empty) shard loading

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return fill_from_folder(model, folder_of(model))

    def is_serializable(self, safe_serialization=None) -> bool:
        return False  # the runtime layers are written by quantnoise.hf.save_pretrained, not by transformers'

    @property
    def is_trainable(self) -> bool:
        return False  # run layers; fine-tune centroids on the compress_ model (quantnoise.compress's layers)


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # a reload of this module registers nothing twice
    register_quantization_config(METHOD)(QuantNoiseHfConfig)
    register_quantizer(METHOD)(QuantNoiseHfQuantizer)
