"""The ``quantnoise`` quantization method of ``transformers`` (its extension point for packages: a
``QuantizationConfigMixin`` and an ``HfQuantizer`` registered under a name), so that transformers' own verbs work on
quantnoise models:

  - ``AutoModel*.from_pretrained(dir)`` of a folder whose config.json holds ``quantization_config: {quant_method:
    quantnoise, ...}`` loads it compressed (runtime layers), also from the local Hugging Face cache, with
    ``device_map`` on one device and ``torch_dtype`` (what is not compressed, and the activations, in that dtype);
  - ``from_pretrained(fp32_dir, quantization_config=QuantNoiseHfConfig(scheme="pq", ...))`` compresses at load
    (``compress_``: post-training, as ``TorchAoConfig`` does), the result equal to ``compress_`` of the same model;
  - ``model.save_pretrained(dir)`` (and so ``push_to_hub``) of a compressed model, a loaded one included, writes
    the folder ``quantnoise.hf.save_pretrained`` writes: ``get_state_dict_and_metadata`` returns the .qnz's tensors
    and its JSON map as the safetensors metadata, so transformers' ``model.safetensors`` *is* the .qnz; and the
    model card (README.md, ``WithCard``), on push_to_hub in place of transformers' empty template.
A model ``quantize_`` / ``compress_`` / ``load_qnz`` meet gets this quantizer attached (``attach``, through
quantnoise.extensions), so ``save_pretrained`` finds it; with nothing compressed it saves as transformers does.

Loading a folder: transformers builds the model on ``meta`` and reads the keys of ``model.safetensors``; the
quantizer marks them all unexpected (``update_expected_keys``: no tensor is loaded by transformers, no key is
reported missing) and ``_process_model_after_weight_loading`` fills the model from the file with runtime layers
(quantnoise/hf/pretrained.py ``fill_from_folder``: the base model of a head folder too).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Optional, Union

import torch
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import extensions
from ..compress.layers import CompressedMixin, LayerRule
from ..compress.plan import IPQPlan
from ..export import ExportOptions
from ..runtime.layers import RuntimeMixin
from .pretrained import WEIGHTS, fill_from_folder, weights_file

logger = logging.getLogger(__name__)
METHOD = "quantnoise"
REQUEST = ("scheme", "block_size", "n_centroids", "bits", "include", "exclude", "kmeans_iters", "rows_per_scale", "plan")


class QuantNoiseHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of the quantnoise method, in two roles.

    As an argument of ``from_pretrained(fp32_dir, quantization_config=...)``: how to compress at load, one
    ``LayerRule`` from ``scheme`` ("pq" | "scalar"), ``block_size`` / ``n_centroids`` (pq), ``bits`` /
    ``rows_per_scale`` (scalar), ``kmeans_iters``, ``include`` / ``exclude`` (regexes searched in module names), or a
    whole ``plan`` (a ``LayerRule`` or ``IPQPlan``, which then replaces those fields).

    In config.json of a saved folder (written by ``save_pretrained``): what is stored where: ``weights`` (the
    .qnz, ``model.safetensors``), ``format_version``, ``compressed_layers``, ``rules`` (one entry per distinct
    setting: scheme, block size and centroids or bits, the stored dtypes, the layers), ``rest_dtype`` /
    ``centroids_dtype`` (ExportOptions: the dtype of what is not compressed, "float16" (default) | "float32", and of
    the pq codebooks, "float16" (default) | "float32" (exactly the model's) | "int8" (one scale per layer)) and
    ``aliases`` (tied copies).  As a compression request, ``rest_dtype`` / ``centroids_dtype`` are the dtypes its
    ``model.save_pretrained`` stores.  Loading a folder ignores the compression fields."""

    def __init__(self, scheme: str = "pq", block_size: int = 8, n_centroids: int = 256, bits: int = 8,
                 include: str = ".", exclude: Optional[str] = None, kmeans_iters: int = 20, rows_per_scale: int = 1,
                 plan: Union[LayerRule, IPQPlan, dict, None] = None, rest_dtype: str = "float16",
                 centroids_dtype: str = "float16", weights: str = WEIGHTS, **kwargs):
        self.quant_method = METHOD
        self.scheme, self.block_size, self.n_centroids, self.bits = scheme, block_size, n_centroids, bits
        self.include, self.exclude, self.kmeans_iters, self.rows_per_scale = include, exclude, kmeans_iters, rows_per_scale
        self.plan = _plan_from(plan)
        self.rest_dtype, self.centroids_dtype, self.weights = rest_dtype, centroids_dtype, weights
        for key, value in kwargs.items():  # format_version, compressed_layers, rules, aliases: what a folder holds
            if key != "quant_method":
                setattr(self, key, value)
        ExportOptions(self.rest_dtype, self.centroids_dtype)  # one-line ValueError for a bad dtype
        if "format_version" not in kwargs:  # a compression request: its rule now, so a bad field fails here
            self.compression_plan()

    def compression_plan(self) -> IPQPlan:
        """The plan ``from_pretrained(..., quantization_config=self)`` applies (``compress_``)."""
        if isinstance(self.plan, IPQPlan):
            return self.plan
        if isinstance(self.plan, LayerRule):
            return IPQPlan(stages=[self.plan])
        return IPQPlan(stages=[LayerRule(pattern=self.include, scheme=self.scheme, block_size=self.block_size,
                                         n_centroids=self.n_centroids, bits=self.bits, kmeans_iters=self.kmeans_iters,
                                         exclude=self.exclude, rows_per_scale=self.rows_per_scale)])

    def export_options(self) -> ExportOptions:
        return ExportOptions(rest_dtype=self.rest_dtype, centroids_dtype=self.centroids_dtype)

    def to_dict(self) -> dict:
        """The fields; a folder's config (one with a ``format_version``) without the compression request's fields,
        which loading it ignores (its ``rules`` say how it is compressed)."""
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if "format_version" in out:
            return {k: v for k, v in out.items() if k not in REQUEST}
        if self.plan is not None:
            out["plan"] = {"type": type(self.plan).__name__, **dataclasses.asdict(self.plan)}
        return out

    def to_diff_dict(self) -> dict:
        """``to_dict`` without the values equal to the defaults (what ``repr`` and config.json show)."""
        default = QuantNoiseHfConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k, object()) != v}


def _plan_from(plan) -> Union[LayerRule, IPQPlan, None]:
    if plan is None or isinstance(plan, (LayerRule, IPQPlan)):
        return plan
    if isinstance(plan, dict):  # as to_dict wrote it
        fields = {k: v for k, v in plan.items() if k != "type"}
        if plan.get("type") == "IPQPlan":
            return IPQPlan(stages=[LayerRule(**s) for s in fields.get("stages", [])], seed=fields.get("seed", 0))
        return LayerRule(**fields)
    raise ValueError(f"QuantNoiseHfConfig plan={plan!r} is invalid: pass a LayerRule or an IPQPlan")


def describe(meta: dict, opts: ExportOptions, weights: str = WEIGHTS) -> QuantNoiseHfConfig:
    """The ``quantization_config`` of a folder whose .qnz has the JSON map ``meta`` (written with ``opts``)."""
    rules = {}
    for name, e in meta["layers"].items():
        if e["scheme"] == "pq":
            key = ("pq", e["block_size"], e["n_centroids"], e["codes"], e["centroids"])
            entry = {"scheme": "pq", "block_size": e["block_size"], "n_centroids": e["n_centroids"],
                     "codes_dtype": e["codes"], "centroids_dtype": e["centroids"]}
        else:
            key = ("scalar", e["bits"], e["pack_width"], e.get("rows_per_scale", 1))
            entry = {"scheme": "scalar", "bits": e["bits"], "stored_bits": e["pack_width"],
                     "rows_per_scale": e.get("rows_per_scale", 1), "scales_dtype": "float32"}
        rules.setdefault(key, {**entry, "layers": []})["layers"].append(name)
    return QuantNoiseHfConfig(weights=weights, rest_dtype=opts.rest_dtype, centroids_dtype=opts.centroids_dtype,
                              format_version=meta["format_version"], compressed_layers=len(meta["layers"]),
                              rules=list(rules.values()), aliases=dict(meta["aliases"]))


def is_compressed(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (CompressedMixin, RuntimeMixin)) for m in model.modules())


class QuantNoiseHfQuantizer(HfQuantizer):
    requires_calibration = False  # a QuantNoiseHfConfig given for an fp32 folder compresses at load
    required_packages = None

    def __init__(self, quantization_config: QuantNoiseHfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.device = None  # the one device of a device_map, moved to after the model is filled

    def validate_environment(self, *args, **kwargs) -> None:
        devices = _devices(kwargs.get("device_map"))
        if len(devices) > 1:
            raise ValueError(f"a quantnoise model loads on one device, not a device_map over {sorted(map(str, devices))}; "
                             f"pass device_map='cpu' (or one device), or load it without device_map, then .to(device)")
        dtype = kwargs.get("dtype")
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"torch_dtype={dtype} is no floating dtype: pass float32, float16 or bfloat16 (what is not "
                             f"compressed, and the activations, in that dtype)")

    def update_device_map(self, device_map):
        devices = _devices(device_map)
        if devices:  # accelerate would move the model while it is still on meta: move it once filled instead
            self.device = next(iter(devices))
            if self.device == "auto" or self.device in ("balanced", "balanced_low_0", "sequential"):
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return None

    def update_expected_keys(self, model, expected_keys, loaded_keys):
        if not self.pre_quantized:
            return expected_keys
        model._keys_to_ignore_on_load_unexpected = [r"^"]  # every file key "unexpected": transformers loads none
        return []  # (and reports none missing): _process_model_after_weight_loading fills the model from the file

    def update_missing_keys(self, model, missing_keys, prefix):
        return [] if self.pre_quantized else missing_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)  # the class's own again
        if self.pre_quantized:
            fill_from_folder(model, weights_file(model))
            dtype = getattr(model.config, "_pre_quantization_dtype", None)
            if isinstance(dtype, torch.dtype) and dtype != torch.float32:
                model.to(dtype)  # what is not compressed and the codebooks / scales: the activations follow
        else:
            compress_at_load(model, self.quantization_config)
        if self.device is not None and str(self.device) != "cpu":
            model.to(self.device)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True  # as safetensors; get_state_dict_and_metadata refuses safe_serialization=False (one line)

    def get_state_dict_and_metadata(self, model, safe_serialization=False):
        """The .qnz's tensors and its JSON map (the safetensors metadata), so transformers' ``model.safetensors`` is
        the file ``quantnoise.hf.save_pretrained`` writes; with nothing compressed, transformers' own state dict."""
        from .pretrained import qnz_contents

        if not is_compressed(model):
            if isinstance(getattr(model.config, "quantization_config", None), QuantNoiseHfConfig):
                del model.config.quantization_config  # a plain model: saved and loaded as transformers does
            return None, {}
        if safe_serialization is False:
            raise ValueError("a quantnoise compressed model is saved as safetensors (its model.safetensors is the "
                             ".qnz), not pickled: call save_pretrained(dir) with safe_serialization=True (the default)")
        tensors, metadata, config = qnz_contents(model)
        model.config.quantization_config = config
        return tensors, metadata

    @property
    def is_trainable(self) -> bool:
        """A folder loads as runtime layers (inference); compressed at load (or by ``compress_``), the centroids
        train (Stock et al.'s mean-gradient rule) in a Trainer."""
        return not self.pre_quantized


def _devices(device_map) -> set:
    if device_map is None:
        return set()
    if isinstance(device_map, dict):
        return {str(v) if isinstance(v, torch.device) else v for v in device_map.values()}
    return {str(device_map) if isinstance(device_map, torch.device) else device_map}


def compress_at_load(model, config: QuantNoiseHfConfig) -> None:
    """``compress_(model, config.compression_plan())``, one tied group of layers at a time under a progress bar
    (k-means takes a while on a large model): each layer is seeded by its name, so the result is that of one call."""
    from transformers.utils import logging as tf_logging

    from ..api import _matrix_layer, compress_
    from ..compress.layers import tied_layers

    plan = config.compression_plan()
    groups = [{n for n, _ in members} for members in tied_layers(model)  # those compress_ would compress
              if any(_matrix_layer(m) and plan.rule_for(n)[1] is not None for n, m in members)]
    if not groups:
        compress_(model, plan)  # nothing selected: compress_'s own one-line error, naming the layers there are
    for names in tf_logging.tqdm(groups, desc="quantnoise compress", disable=len(groups) < 2):
        compress_(model, plan, filter_fn=lambda m, n, names=names: n in names)


def attach(model) -> None:
    """Give a transformers model the quantnoise quantizer (unless it has one), so that ``model.save_pretrained`` of it
    compressed writes the quantnoise folder, and the model card (``WithCard``).  Called by quantnoise.extensions for
    every model ``quantize_``, ``compress_`` or ``load_qnz`` meets (a folder loaded by transformers too: its
    quantizer fills the model with ``fill_model_``)."""
    if not hasattr(model, "config"):
        return
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = QuantNoiseHfQuantizer(QuantNoiseHfConfig(), pre_quantized=False)
    for name in WithCard.METHODS:
        if not isinstance(model.__dict__.get(name), WithCard):
            setattr(model, name, WithCard(model, name))


class WithCard:
    """A model's ``save_pretrained`` / ``_upload_modified_files`` that, once the model is compressed, also writes the
    model card (README.md with ``quantnoise inspect``'s summary: pretrained.write_card), as ``hf.save_pretrained``
    does.  transformers gives a quantizer no hook after saving, so this instance attribute stands in front of the
    class's method (and pickles with the model).  ``_upload_modified_files`` is the step both ``push_to_hub`` paths
    (``model.push_to_hub(repo)``, ``save_pretrained(dir, push_to_hub=True)``) take after writing their own card:
    transformers' empty template is replaced by quantnoise's card there, a repo's own card kept (as transformers
    keeps it)."""

    METHODS = ("save_pretrained", "_upload_modified_files")

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    @property
    def __wrapped__(self):  # inspect.signature / help() show transformers' method
        return getattr(type(self.model), self.name).__get__(self.model)

    def __call__(self, *args, **kwargs):
        method = self.__wrapped__
        if self.name == "_upload_modified_files":  # (working_dir, repo_id, files_timestamps, ...)
            self.card(args[0] if args else kwargs["working_dir"])
            return method(*args, **kwargs)
        out = method(*args, **kwargs)
        folder = args[0] if args else kwargs.get("save_directory")
        if kwargs.get("is_main_process", True) and not kwargs.get("push_to_hub") and folder is not None:
            self.card(folder)  # (a push wrote it before its upload)
        return out

    def card(self, folder) -> None:
        from .pretrained import write_card

        qc = getattr(self.model.config, "quantization_config", None)
        if not is_compressed(self.model) or not isinstance(qc, QuantNoiseHfConfig) or not hasattr(qc, "format_version"):
            return  # saved as transformers saves a plain model: its own card rules
        if not (pathlib.Path(folder) / qc.weights).is_file():
            return  # saved in shards (which the loaders refuse, naming the fix): no .qnz to summarize
        write_card(folder, type(self.model).__name__, qc)


if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:  # a reload of this module registers nothing twice
    register_quantization_config(METHOD)(QuantNoiseHfConfig)
    register_quantizer(METHOD)(QuantNoiseHfQuantizer)
    from transformers.modeling_utils import PreTrainedModel

    extensions.register_model_hook(PreTrainedModel, attach)
