"""A compressed ``transformers`` model as a folder: ``save_pretrained(model, dir)`` / ``from_pretrained(dir)``.

The folder (what ``model.save_pretrained(dir)`` writes too, through the quantnoise quantizer: quantizer.py) holds
  - ``config.json``: the model's config, with ``quantization_config`` (transformers' own key for a quantized
    checkpoint) ``{"quant_method": "quantnoise", "weights": "model.safetensors", "format_version": 2,
    "compressed_layers": N, "rules": [one entry per distinct setting: scheme, block_size / n_centroids or bits,
    stored dtypes, layers], "rest_dtype": ..., "centroids_dtype": ..., "aliases": {tied copy: layer}}``;
  - ``model.safetensors``: the ``.qnz`` (quantnoise/export.py's container, a safetensors file whose metadata holds
    its JSON map): compressed layers as codes + codebooks / packed int weights + scales, every other tensor in
    ``rest_dtype`` (``ExportOptions``: float16 by default, float32 on request), tied copies stored once;
  - ``README.md``: a model card with the compression summary ``quantnoise inspect`` prints;
  - ``generation_config.json`` for a model that generates, and the tokenizer's files when one is given.
Folders of earlier quantnoise versions (``model.qnz`` beside an index of no shard) still load.
``from_pretrained(dir)`` builds the architecture named by ``config.architectures`` (or ``model_class``: an
``AutoModel`` gets the base model of a head folder, as transformers gives it) on ``meta`` (parameters only:
buffers that no checkpoint holds, e.g. rotary tables, are made as usual) and fills it with runtime layers
(``fill_from_folder``): no fp32 copy of a compressed weight is ever made.  So does
``AutoModelForCausalLM.from_pretrained(dir)`` (any ``AutoModel*`` class) once quantnoise.hf is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import pathlib
import zlib
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..checkpoint import atomic_write
from ..export import ExportOptions, _json_default, read_qnz
from ..qnz import check_fits, encode_model

logger = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"  # the .qnz, under the name transformers' save_pretrained writes and from_pretrained reads
INDEX = "model.safetensors.index.json"
CARD, CARD_TAG = "README.md", "- quantnoise\n"
CARD_MARK = "<!-- quantnoise model card: rewritten at every save; delete this line to keep your own edits -->"
HUB_TEMPLATE = "This model card has been automatically generated."  # transformers' push_to_hub card of a new repo


def save_pretrained(model: nn.Module, save_dir, tokenizer=None, opts: Optional[ExportOptions] = None,
                    format: str = "quantnoise") -> pathlib.Path:
    """Write ``model`` (a transformers ``PreTrainedModel`` compressed by ``quantnoise.compress_``, or loaded
    compressed) as a folder that ``from_pretrained`` (quantnoise.hf's or transformers' own) loads compressed; return
    the folder.  ``model.save_pretrained(dir)`` writes the same folder (README.md included), non-atomically.  ``opts``:
    the stored dtypes (``ExportOptions(rest_dtype="float16" | "float32", centroids_dtype="float16" | "float32" |
    "int8")``; default: those a loaded model was stored with, else float16 for both).  Every file is written atomically.
    ``format="aqlm"``: a transformers AQLM folder instead (quantnoise/hf/aqlm.py: iPQ Linears with <= 256 centroids
    as AQLM 1x8, loaded by transformers with the ``aqlm`` package and served by vLLM)."""
    if format == "aqlm":
        from .aqlm import save_aqlm

        return save_aqlm(model, save_dir, tokenizer, opts)
    if format != "quantnoise":
        raise ValueError(f"save_pretrained format={format!r} is unknown: choose 'quantnoise' (the .qnz folder) or "
                         f"'aqlm' (a transformers AQLM folder)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError(f"save_pretrained takes a transformers PreTrainedModel, not a {type(model).__name__}; "
                         f"for any other module use quantnoise.save_qnz(model, path)")
    tensors, metadata, qconfig = qnz_contents(model, opts)
    if not qconfig.compressed_layers:
        logger.warning("save_pretrained: %s has no compressed layer (compressed_layers: 0): every tensor is stored "
                       "dense in %s; compress it first (quantnoise.compress_, after unquantize_ for a noise-trained "
                       "model), or save a plain model with model.save_pretrained", type(model).__name__,
                       qconfig.rest_dtype)
    folder = pathlib.Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / WEIGHTS, tensors, metadata)
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.quantization_config = qconfig
    _write_text(folder / "config.json", config.to_json_string(use_diff=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_card(folder, type(model).__name__, qconfig)
    return folder


def write_card(folder, arch: str, qconfig) -> bool:
    """Write ``folder``'s README.md, the model card of its .qnz (``qconfig.weights``, written already); return
    whether it did.  As transformers treats a repo's card on ``push_to_hub`` (it keeps one the repo has, only adding
    tags): a README.md of the user's own is left as it is; quantnoise's own card (the ``CARD_MARK`` line: a user who
    edits the card deletes it) and transformers' empty template (what ``push_to_hub`` writes for a repo without a
    card) are replaced, their tags kept."""
    folder = pathlib.Path(folder)
    tags = replaceable_card(folder / CARD)
    if tags is None:
        return False
    _write_text(folder / CARD, model_card(arch, folder / getattr(qconfig, "weights", WEIGHTS), qconfig, tags))
    return True


def replaceable_card(card: pathlib.Path) -> Optional[list]:
    """None when ``card`` is a README.md of the user's own (logged: left as it is), else the tags to keep of the card
    it is (quantnoise's, by its ``CARD_MARK`` line, or transformers' empty template), [] where there is none."""
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")
    if CARD_MARK not in text and HUB_TEMPLATE not in text:
        logger.info("save_pretrained: %s exists and is not quantnoise's model card: left as it is", card)
        return None
    return _card_tags(text)


def _card_tags(text: str) -> list:
    """The tags of a model card's metadata (huggingface_hub's parser), [] where it has none or they do not parse."""
    from huggingface_hub import ModelCard

    try:
        return [str(t) for t in (ModelCard(text, ignore_metadata_errors=True).data.tags or [])]
    except Exception:  # a card whose metadata does not parse: its tags are not worth failing the save for
        return []


def qnz_contents(model: nn.Module, opts: Optional[ExportOptions] = None):
    """(tensors, safetensors metadata, quantization_config) of ``model``'s ``model.safetensors``: the .qnz's
    tensors, its JSON map (+ transformers' ``format: pt``), and the config describing them."""
    from .quantizer import QuantNoiseHfConfig, describe

    if opts is None:
        previous = getattr(getattr(model, "config", None), "quantization_config", None)
        opts = previous.export_options() if isinstance(previous, QuantNoiseHfConfig) else ExportOptions()
    tensors, meta = encode_model(model, opts)
    text = json.dumps(meta, sort_keys=True, default=_json_default)
    metadata = {"qnz": text, "qnz_crc32": str(zlib.crc32(text.encode())), "format": "pt"}
    return tensors, metadata, describe(meta, opts)


def model_card(arch: str, weights: pathlib.Path, qconfig, tags=()) -> str:
    """README.md of a saved folder: how to load it, and ``quantnoise inspect``'s summary of its weights; ``tags``:
    more tags for its metadata (those of the card it replaces)."""
    from ..commands.inspect import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(argparse.Namespace(model=str(weights), all=False))
    summary = out.getvalue().replace(str(weights), weights.name)
    more = "".join(f"- {json.dumps(t)}\n" for t in dict.fromkeys(tags) if t not in ("quantnoise", "compressed"))
    return (f"---\nlibrary_name: transformers\ntags:\n{CARD_TAG}- compressed\n{more}---\n\n{CARD_MARK}\n\n"
            f"# {arch}, compressed with quantnoise\n\n"
            f"{qconfig.compressed_layers} layers compressed (iPQ / int-N: Fan, Stock et al. 2020, Quant-Noise); "
            f"the rest stored in {qconfig.rest_dtype}. It runs compressed (no fp32 copy of a compressed weight):\n\n"
            f"```python\nimport quantnoise.hf  # registers the quantnoise quantization method\n"
            f"from transformers import AutoModel\nmodel = AutoModel.from_pretrained(\"path/to/this/folder\")\n```\n\n"
            f"`quantnoise inspect {weights.name}`:\n\n```\n{summary}```\n")


def _write_safetensors(path: pathlib.Path, tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> None:
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(blob))


def _write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def from_pretrained(load_dir, model_class=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of a folder written by ``save_pretrained`` (or ``model.save_pretrained``), running compressed (eval
    mode).  ``model_class``: a transformers class to build instead of ``config.architectures[0]`` (e.g. ``AutoModel``
    for the base model of a head folder).  ``dtype``: float16 / bfloat16 for what is not compressed, the codebooks
    and scales (and so the activations); default: float32."""
    from .bert import _quiet

    with _quiet() as tf:  # transformers' logging quiet while building, the caller's level after
        return _from_pretrained(tf, load_dir, model_class, dtype)


def _from_pretrained(tf, load_dir, model_class, dtype) -> nn.Module:
    folder = pathlib.Path(load_dir)
    if not folder.exists():
        raise ValueError(f"{folder} does not exist: pass the folder quantnoise.hf.save_pretrained (or "
                         f"model.save_pretrained) wrote")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a quantnoise model folder (it has no config.json): write one with "
                         f"quantnoise.hf.save_pretrained(model, dir)")
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) != "quantnoise":
        raise ValueError(f"{folder} is not a quantnoise model folder (its config.json has no quantization_config of "
                         f"quant_method quantnoise): load it with transformers' from_pretrained")
    from .quantizer import QuantNoiseHfConfig

    config.quantization_config = QuantNoiseHfConfig.from_dict(qc) if isinstance(qc, dict) else qc
    cls = model_class or _architecture(tf, config, folder)
    if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):  # an Auto class
        cls = cls._model_mapping[type(config)]
    from transformers.modeling_utils import init_empty_weights, no_init_weights

    with no_init_weights(), init_empty_weights():  # parameters on meta, buffers made as usual
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    model.tie_weights()  # on meta, as transformers' loader ties them: a head tied to a stored embedding
    fill_from_folder(model, weights_file(model, folder))
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
    if getattr(model, "can_generate", lambda: False)() and (folder / "generation_config.json").is_file():
        model.generation_config = tf.GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model


def weights_file(model: nn.Module, folder=None) -> pathlib.Path:
    """The .qnz of the folder ``model`` comes from (``folder``, or ``config.name_or_path``: a local folder or a repo
    id in the local Hugging Face cache): the file its ``quantization_config.weights`` names."""
    qc = getattr(model.config, "quantization_config", None) or {}
    name = qc.get("weights", WEIGHTS) if isinstance(qc, dict) else getattr(qc, "weights", WEIGHTS)
    where = folder if folder is not None else str(getattr(model.config, "name_or_path", "") or "")
    if not isinstance(name, str) or pathlib.PurePath(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{where}/config.json's quantization_config.weights is {name!r}: it must name a file in "
                         f"that folder (e.g. {WEIGHTS!r}); write the folder with quantnoise.hf.save_pretrained")
    if folder is None and not os.path.isdir(where):
        return _cached(model, where, name)
    path = pathlib.Path(where) / name
    if not path.is_file():
        sharded = (pathlib.Path(where) / INDEX).is_file() and json.loads((pathlib.Path(where) / INDEX).read_text())["weight_map"]
        raise ValueError(f"{where} has no {name}" + (" but shards of it: save it with a max_shard_size larger than the "
                                                     "model (its .qnz is one file)" if sharded else
                                                     ": write the folder with quantnoise.hf.save_pretrained"))
    return path


def _cached(model: nn.Module, repo: str, name: str) -> pathlib.Path:
    from transformers.utils.hub import cached_file

    path = None
    with contextlib.suppress(OSError, ValueError):
        path = cached_file(repo, name, _commit_hash=getattr(model.config, "_commit_hash", None),
                           local_files_only=True, _raise_exceptions_for_missing_entries=False)
    if path is None:
        raise ValueError(f"{repo!r}: its {name} is not in the default Hugging Face cache (downloaded to another "
                         f"cache_dir?); download the repo (huggingface_hub.snapshot_download) and pass its folder")
    return pathlib.Path(path)


def fill_from_folder(model: nn.Module, path) -> nn.Module:
    """Fill ``model`` (built on meta) from the .qnz at ``path`` (runtime layers).  As transformers' loader does: a
    base model from a head folder (``AutoModel`` of a ``GPT2LMHeadModel`` folder) takes the tensors under its
    ``base_model_prefix``; a head model takes the base from a base folder or another head's folder, its own head
    tied to a stored embedding or newly initialized (a warning names it), another head's tensors left out."""
    from ..runtime.load import fill_model_

    tensors, meta = read_qnz(path)
    tensors, meta, new = _align(model, tensors, meta, str(path))
    if new:
        _initialize(model, new, str(path))
    stored = {*(f"{n}.weight" for n in meta["layers"]), *meta["dense"], *meta["aliases"]}
    if not new or set(model.state_dict()) - set(new) != stored:
        check_fits(model, meta, tensors, str(path))  # its one-line error, naming what differs
    return fill_model_(model, tensors, meta)  # T5's one embedding under three names: one runtime layer under all


def _rename(tensors: Dict[str, Tensor], meta: dict, name) -> Tuple[Dict[str, Tensor], dict]:
    """``(tensors, meta)`` with every key (layer, dense tensor, alias and its target) renamed by ``name(key)``, those
    it maps to None left out."""
    layers = {name(n): e for n, e in meta["layers"].items() if name(n)}
    dense = {name(k): e for k, e in meta["dense"].items() if name(k)}
    aliases = {name(k): name(t) for k, t in meta["aliases"].items() if name(k) and name(t)}
    kept = {}
    for key, t in tensors.items():
        owner, _, part = key.rpartition(".")
        new = name(key) if key in meta["dense"] else (f"{name(owner)}.{part}" if name(owner) else None)
        if new is not None:
            kept[new] = t
    return kept, {**meta, "layers": layers, "dense": dense, "aliases": aliases}


def _align(model: nn.Module, tensors: Dict[str, Tensor], meta: dict, path: str):
    """(tensors, meta, keys to initialize): the file's keys as ``model`` names them (see ``fill_from_folder``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = [*(f"{n}.weight" for n in meta["layers"]), *meta["dense"], *meta["aliases"]]
    has = bool(prefix) and any(k.startswith(prefix + ".") for k in keys)
    expects = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    cut = len(prefix) + 1
    for key, target in meta["aliases"].items():
        if has and not expects and key.startswith(prefix + ".") and not target.startswith(prefix + "."):
            raise ValueError(f"{path}: the base model's {key} is stored as a tied copy of the head's {target}; load "
                             f"the head class (config.architectures[0]) instead")
    if has and not expects:  # the base of a head folder
        tensors, meta = _rename(tensors, meta, lambda k: k[cut:] if k.startswith(prefix + ".") else None)
    elif expects and not has:  # a head model from a base folder
        tensors, meta = _rename(tensors, meta, lambda k: f"{prefix}.{k}")
    state = model.state_dict(keep_vars=True)
    stored = {*(f"{n}.weight" for n in meta["layers"]), *meta["dense"], *meta["aliases"]}
    if type(model).__name__ in (getattr(model.config, "architectures", None) or [type(model).__name__]):
        return tensors, meta, []  # the class the folder was saved from: every key must fit (check_fits)
    unused = stored - set(state)  # another head's tensors (or a pooler the model has not)
    if unused:
        logger.warning("Some tensors of %s are not used by %s (another task's head): %s", path, type(model).__name__,
                       sorted(unused))
        tensors, meta = _rename(tensors, meta, lambda k: None if k in unused or f"{k}.weight" in unused else k)
        stored -= unused
    missing = sorted(k for k in set(state) - stored if not expects or not k.startswith(prefix + "."))
    owners = {id(state[k]): k for k in stored if k in state}
    new = []
    for key in missing:  # a head tied (on meta) to a stored tensor: an alias of it, as the model ties it
        tied = owners.get(id(state[key]))
        if tied is not None and key.endswith(".weight"):
            layer = tied[: -len(".weight")] if tied.endswith(".weight") else None
            meta["aliases"][key] = layer if layer in meta["layers"] else meta["aliases"].get(tied, tied)
        else:
            new.append(key)
    return tensors, meta, new


def _initialize(model: nn.Module, keys, path: str) -> None:
    """Materialize and initialize (the model's own ``_init_weights``) the head modules holding ``keys``."""
    owners = {k.rpartition(".")[0] for k in keys}
    for name in sorted(owners):
        module = model.get_submodule(name)
        module.to_empty(device="cpu", recurse=False)
        if hasattr(model, "_init_weights"):
            model._init_weights(module)
    logger.warning("Some weights of %s were not in %s and are newly initialized: %s; train them (the head of "
                   "another task) before using its predictions", type(model).__name__, path, sorted(keys))


def _architecture(tf, config, folder):
    names = getattr(config, "architectures", None) or []
    cls = getattr(tf, names[0], None) if names else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names architectures {names!r}, which this transformers "
                         f"({tf.__version__}) does not define; pass model_class=...")
    return cls
