"""Masks keyed on (update, micro-batch) in real ``fairseq-train`` runs: activation checkpointing
re-runs each layer's forward inside backward and must see the masks of the original forward, and
a run with ``--update-freq 2`` interrupted and resumed must end where the uninterrupted run ends."""
from __future__ import annotations

import pytest
import torch

from conftest import train_tiny_lm

pytestmark = pytest.mark.slow

NOISE = ["--quant-noise-scheme", "drop", "--quant-noise-p", "0.5", "--quant-noise-block-size", "4"]


def params(save_dir):
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def test_checkpoint_activations_sees_the_same_masks(lm_data, tmp_path):
    train_tiny_lm(lm_data, tmp_path / "plain", *NOISE, updates=3)
    train_tiny_lm(lm_data, tmp_path / "ckpt", *NOISE, "--checkpoint-activations", updates=3)
    assert_same_params(params(tmp_path / "plain"), params(tmp_path / "ckpt"))


def test_update_freq_run_resumed_ends_like_the_uninterrupted_run(lm_data, tmp_path):
    freq = ["--update-freq", "2", *NOISE]
    train_tiny_lm(lm_data, tmp_path / "whole", *freq, updates=4)
    train_tiny_lm(lm_data, tmp_path / "parts", *freq, updates=2)
    first = params(tmp_path / "parts")
    proc = train_tiny_lm(lm_data, tmp_path / "parts", *freq, updates=4)  # resumes from checkpoint_last.pt
    assert "Loaded checkpoint" in proc.stdout + proc.stderr and "@ 2 updates" in proc.stdout + proc.stderr
    assert_same_params(params(tmp_path / "whole"), params(tmp_path / "parts"))
    assert any(not torch.equal(first[k], v) for k, v in params(tmp_path / "parts").items())
