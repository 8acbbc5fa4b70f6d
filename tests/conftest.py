"""Shared fixtures: a tiny real corpus binarised by fairseq-preprocess, and a helper to run the
real fairseq / quantnoise command-line tools from this venv."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` runs one pytest worker per core (pytest-xdist):
    import torch  # in-process tests then share the cores instead of each taking all of them

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
USER_DIR = str(ROOT / "quantnoise" / "qn_fairseq")

# the tiny LM every plugin test trains: seconds per run on 2 CPU cores
TINY_LM = ["--task", "language_modeling", "--arch", "qn_transformer_lm_tiny", "--tokens-per-sample", "32",
           "--max-tokens", "512", "--optimizer", "adam", "--lr", "0.002", "--no-progress-bar",
           "--log-format", "simple", "--log-interval", "5", "--num-workers", "0", "--seed", "1",
           "--no-epoch-checkpoints", "--disable-validation"]


def run(cmd, cwd=None, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run a tool from the venv's bin (first word) and return the completed process."""
    exe = cmd[0] if os.sep in cmd[0] else str(BIN / cmd[0])
    # PYTHONFAULTHANDLER: a process killed by a signal (a native abort) prints every thread's Python stack
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.run([exe, *map(str, cmd[1:])], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout: {proc.stdout[-1500:]}\n"
                             f"stderr: {proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> pathlib.Path:
    """fairseq-binarised LM data made from the generated stdlib-docstring corpus (small slice)."""
    d = tmp_path_factory.mktemp("lm")
    run([sys.executable, ROOT / "scripts" / "make_corpus.py", d / "txt", "--max-lines", "600"])
    run(["fairseq-preprocess", "--only-source", "--trainpref", d / "txt" / "train.txt",
         "--validpref", d / "txt" / "valid.txt", "--testpref", d / "txt" / "test.txt",
         "--destdir", d / "bin", "--workers", "1", "--thresholdsrc", "2"])
    return d / "bin"


def train_tiny_lm(data, save_dir, *extra, updates=20) -> subprocess.CompletedProcess:
    """``fairseq-train`` the tiny LM with the plugin for ``updates`` updates."""
    return run(["fairseq-train", data, "--user-dir", USER_DIR, *TINY_LM, "--max-update", updates,
                "--save-dir", save_dir, *extra])


@pytest.fixture(scope="session")
def tiny_lm_ckpt(lm_data, tmp_path_factory) -> pathlib.Path:
    """A tiny qn_transformer_lm trained 20 updates with drop noise; returns checkpoint_last.pt."""
    save = tmp_path_factory.mktemp("ckpt")
    train_tiny_lm(lm_data, save, "--quant-noise-scheme", "drop", "--quant-noise-p", "0.1")
    return save / "checkpoint_last.pt"
