"""A compressed ``transformers`` model as a folder: ``save_pretrained(model, dir)`` / ``from_pretrained(dir)``.

The folder holds
  - ``config.json``: the model's config, with ``quantization_config = {"quant_method": "quantnoise",
    "weights": "model.qnz", ...}`` (transformers' own key for a quantized checkpoint);
  - ``model.qnz``: every tensor of the model (quantnoise/export.py's container; compressed layers as codes /
    int weights, the rest fp16 or fp32), written by ``quantnoise.save_qnz``;
  - ``model.safetensors.index.json``: an index of no shard, so that transformers' ``from_pretrained`` finds a
    checkpoint and leaves the loading to the ``quantnoise`` quantizer (quantizer.py), which reads ``model.qnz``;
  - ``generation_config.json`` for a model that generates, and the tokenizer's files when one is given.
``from_pretrained(dir)`` builds the architecture named by ``config.architectures`` on ``meta`` (parameters only:
buffers that no checkpoint holds, e.g. rotary tables, are made as usual) and fills it with runtime layers
(``quantnoise.load_qnz``): no fp32 copy of a compressed weight is ever made.  So does
``AutoModelForCausalLM.from_pretrained(dir)`` (any ``AutoModel*`` class) once quantnoise.hf is imported.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib

from torch import nn

from ..checkpoint import atomic_write
from ..export import ExportOptions
from ..qnz import load_qnz, save_qnz

logger = logging.getLogger(__name__)
WEIGHTS = "model.qnz"
INDEX = "model.safetensors.index.json"


def save_pretrained(model: nn.Module, save_dir, tokenizer=None, opts: ExportOptions = ExportOptions()) -> pathlib.Path:
    """Write ``model`` (a transformers ``PreTrainedModel``, compressed by ``quantnoise.compress_`` or not) as a
    folder that ``from_pretrained`` (quantnoise.hf's or transformers' own) loads compressed; return the folder."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError(f"save_pretrained takes a transformers PreTrainedModel, not a {type(model).__name__}; "
                         f"for any other module use quantnoise.save_qnz(model, path)")
    folder = pathlib.Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = save_qnz(model, folder / WEIGHTS, opts)
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.quantization_config = {"quant_method": "quantnoise", "weights": WEIGHTS, "format_version": meta["format_version"],
                                  "compressed_layers": len(meta["layers"])}
    _write_text(folder / "config.json", config.to_json_string(use_diff=True))
    _write_text(folder / INDEX, json.dumps({"metadata": {"quantnoise": f"every tensor is in {WEIGHTS}"},
                                            "weight_map": {}}, indent=2) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def from_pretrained(load_dir, model_class=None) -> nn.Module:
    """The model of a folder written by ``save_pretrained``, running compressed (eval mode).  ``model_class``:
    a transformers class to build instead of ``config.architectures[0]`` (e.g. ``AutoModel`` for the base model)."""
    from .bert import _quiet

    with _quiet() as tf:  # transformers' logging quiet while building, the caller's level after
        return _from_pretrained(tf, load_dir, model_class)


def _from_pretrained(tf, load_dir, model_class) -> nn.Module:
    folder = pathlib.Path(load_dir)
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder} is not a quantnoise model folder (it needs config.json and {WEIGHTS}): write one "
                         f"with quantnoise.hf.save_pretrained(model, dir)")
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = model_class or _architecture(tf, config, folder)
    if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):  # an Auto class
        cls = cls._model_mapping[type(config)]
    from transformers.modeling_utils import init_empty_weights, no_init_weights

    with no_init_weights(), init_empty_weights():  # parameters on meta, buffers made as usual
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    fill_from_folder(model, folder)
    if getattr(model, "can_generate", lambda: False)() and (folder / "generation_config.json").is_file():
        model.generation_config = tf.GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model


def fill_from_folder(model: nn.Module, folder) -> nn.Module:
    """Fill ``model`` (built on meta) from ``folder``'s ``model.qnz`` (runtime layers)."""
    folder = pathlib.Path(folder)
    weights = ((getattr(model.config, "quantization_config", None) or {}) if hasattr(model, "config") else {})
    name = weights.get("weights", WEIGHTS) if isinstance(weights, dict) else getattr(weights, "weights", WEIGHTS)
    if not isinstance(name, str) or pathlib.PurePath(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{folder}/config.json's quantization_config.weights is {name!r}: it must name a file in "
                         f"that folder (e.g. {WEIGHTS!r}); write the folder with quantnoise.hf.save_pretrained")
    load_qnz(folder / name, model)
    return model.eval()


def _architecture(tf, config, folder):
    names = getattr(config, "architectures", None) or []
    cls = getattr(tf, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names architectures {names!r}, which this transformers "
                         f"({tf.__version__}) does not define; pass model_class=...")
    return cls


def folder_of(model) -> str:
    """The local folder a transformers model was loaded from (``config.name_or_path``)."""
    path = str(getattr(model.config, "name_or_path", "") or "")
    if not os.path.isdir(path):
        raise ValueError(f"the quantnoise quantizer loads local folders only; {path!r} is not one (download it first, "
                         f"e.g. huggingface_hub.snapshot_download, and pass its path)")
    return path
