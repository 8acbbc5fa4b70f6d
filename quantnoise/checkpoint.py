"""fairseq checkpoints as plain dicts (no fairseq import): safe loading, atomic saving, and the
architecture names of the plugin versus stock fairseq.

A fairseq checkpoint is ``{"cfg": nested dict, "model": state dict, "optimizer_history": [...],
"extra_state": {...}, "last_optimizer_state": ..., ...}``; fairseq >= 0.10 stores ``cfg`` as plain
containers, so ``torch.load(weights_only=True)`` reads it without running pickled code.
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import stat
import tempfile
from typing import Callable

import torch

# arch names of the plugin whose stock equivalent is not just the name without "qn_" (the tiny test
# archs: their saved config holds every size field, so the base arch rebuilds them exactly)
STOCK_ARCH = {"qn_transformer_lm_tiny": "transformer_lm", "qn_roberta_tiny": "roberta"}
# fields of fairseq's own model configs that start with quant_noise_ (everything else is the plugin's)
FAIRSEQ_QN_FIELDS = {"quant_noise_pq", "quant_noise_pq_block_size", "quant_noise_scalar"}
PLUGIN_FIELDS = {"ipq_plan"}


def load_checkpoint(path) -> dict:
    """The checkpoint dict at ``path``, tensors memory-mapped (optimizer state is never read into RAM
    unless used).  Raises ValueError with one line when the file is not a readable checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise OSError(f"checkpoint {path} does not exist")
    try:
        # args of fairseq's argparse models (a plain attribute bag): allowed for good, as the plugin's compat
        # does; torch's safe_globals() context would be process-wide yet removed on exit, racing other threads
        if argparse.Namespace not in torch.serialization.get_safe_globals():
            torch.serialization.add_safe_globals([argparse.Namespace])
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable fairseq checkpoint ({first}); pass a checkpoint_*.pt "
                         f"written by fairseq-train or quantnoise quantize") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' entry); pass a checkpoint_*.pt")
    if not isinstance(state["model"], dict):
        raise ValueError(f"{path} is not a fairseq checkpoint (its 'model' entry is a {type(state['model']).__name__}, "
                         f"not a state dict); pass a checkpoint_*.pt")
    return state


def _new_file_mode(path: pathlib.Path) -> int:
    """The permissions ``open(path, "w")`` would give: an existing file's own, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)  # the only portable way to read the umask is to set it
        os.umask(mask)
        return 0o666 & ~mask


def check_output(path) -> pathlib.Path:
    """``path`` as a Path; OSError (one line) unless its folder exists and it is not itself a folder.
    Commands call it before their work, so a typo in ``-o`` costs nothing."""
    path = pathlib.Path(path)
    folder = path.parent
    if not folder.exists():
        raise OSError(f"output folder {folder} does not exist; create it first or choose another output path")
    if not folder.is_dir():
        raise OSError(f"output folder {folder} is not a folder; choose another output path")
    if path.is_dir():
        raise OSError(f"output {path} is a folder; give a file name inside it")
    return path


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` for a temp file in ``path``'s folder, fsync it, then rename it to
    ``path``.  If anything fails (a full disk, an interrupt), the temp file is removed and ``path`` is
    untouched.  The file gets the permissions a plain write would give (the umask's, or those of the
    file it replaces), not mkstemp's 0600."""
    path = check_output(path)
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))  # after the write: a read-only target's mode would block it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state: dict, path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _model_dict(cfg: dict) -> dict:
    model = (cfg or {}).get("model") or {}
    return vars(model) if isinstance(model, argparse.Namespace) else model  # argparse models keep a Namespace


def model_name(cfg: dict) -> str:
    model = _model_dict(cfg)
    return str(model.get("_name") or model.get("arch") or "")


def set_model_name(cfg: dict, name: str) -> None:
    model = _model_dict(cfg)
    model["_name"] = name
    if "arch" in model:
        model["arch"] = name


def stock_arch(name: str) -> str:
    """qn_transformer_lm -> transformer_lm, qn_transformer_lm_tiny -> transformer_lm, others unchanged."""
    if name in STOCK_ARCH:
        return STOCK_ARCH[name]
    return name[3:] if name.startswith("qn_") else name


def plugin_arch(name: str) -> str:
    """transformer_lm -> qn_transformer_lm (the plugin's model registered for it)."""
    return name if name.startswith("qn_") or not name else f"qn_{name}"


def stock_cfg(cfg: dict, arch: str = None) -> dict:
    """A copy of ``cfg`` that stock fairseq loads without the plugin: the model renamed to its stock
    arch, the plugin's fields dropped, fairseq's own quant-noise off, no ``--user-dir``."""
    cfg = copy.deepcopy(cfg)
    cfg["model"] = model = dict(_model_dict(cfg))  # a Namespace would need the plugin's unpickling allowlist
    name = arch or stock_arch(model_name(cfg))
    for key in [k for k in model if (k.startswith("quant_noise_") and k not in FAIRSEQ_QN_FIELDS)
                or k in PLUGIN_FIELDS]:
        del model[key]
    model["_name"] = name
    if "arch" in model:
        model["arch"] = name
    for key in ("quant_noise_pq", "quant_noise_scalar"):
        if key in model:
            model[key] = 0.0
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    return cfg


def stock_checkpoint(model_state: dict, meta: dict, arch: str = None) -> dict:
    """A minimal fairseq checkpoint (what eval tools read) for a decoded .qnz state dict."""
    fs = meta.get("fairseq") or {}
    if not fs.get("cfg"):
        raise ValueError("the .qnz holds no fairseq config (it was not exported from a fairseq checkpoint), "
                         "so no fairseq checkpoint can be built from it")
    return {
        "args": None,
        "cfg": stock_cfg(fs["cfg"], arch),
        "model": model_state,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {}, "num_updates": int(fs.get("num_updates", 0))}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
    }
