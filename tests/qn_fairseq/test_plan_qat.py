"""``fairseq-train --quant-noise-plan plan.yaml``: quantization-aware training of the tiny LM at a bit plan's
per-layer widths (real fairseq-train), the checkpoint's model rebuilt by fairseq with those widths, and the
.qnz export storing each layer at its width, decoding to the QAT model's own quantized weights."""
from __future__ import annotations

import math
import sys
from argparse import Namespace

import pytest

from conftest import USER_DIR, run, train_tiny_lm
from qn_helpers import assert_finite_and_trained

LAYERS = ["decoder.embed_tokens"] + [f"decoder.layers.{i}.{p}" for i in range(2) for p in
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                      "fc1", "fc2")]
BITS = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(LAYERS)}
ROWS = {n: 16 for n in LAYERS if n.endswith(("q_proj", "k_proj", "v_proj"))}  # head_dim 64 / 4 heads: one per head


def write_plan(path):
    from quantnoise.compress.bitplan import BitPlan

    BitPlan(bits=BITS, sizes={n: 1 for n in LAYERS}, budget_bits=0, used_bits=0, objective=0.0).save_yaml(
        path, rows_per_scale=ROWS)
    return path


def qn(*args, check=True):
    return run([sys.executable, "-m", "quantnoise.cli", *map(str, args)], check=check)


def test_fairseq_train_with_a_bit_plan_and_export(lm_data, tmp_path):
    plan = write_plan(tmp_path / "plan.yaml")
    proc = train_tiny_lm(lm_data, tmp_path / "ckpt", "--quant-noise-plan", plan, updates=10)
    assert_finite_and_trained(proc, 10)
    assert f"quant-noise bit plan (p=1.0, widths [2, 3, 4, 8]) on {len(LAYERS)} layers" in proc.stdout + proc.stderr
    ckpt = tmp_path / "ckpt" / "checkpoint_last.pt"

    from fairseq import checkpoint_utils, utils

    utils.import_user_module(Namespace(user_dir=USER_DIR))
    from quantnoise.nn import QuantNoiseMixin

    (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)])  # rebuilt with the plan
    model.eval()
    for n in LAYERS:  # every layer at its planned width, scale groups and p=1 (full QAT)
        m = model.get_submodule(n)
        assert isinstance(m, QuantNoiseMixin), n
        assert (m.qn_cfg.bits, m.qn_cfg.rows_per_scale, m.qn_cfg.p) == (BITS[n], ROWS.get(n, 1), 1.0), n
    assert not isinstance(model.decoder.output_projection, QuantNoiseMixin)  # not in the plan: left alone

    qn("quantize", ckpt, "-o", tmp_path / "q.pt", "--config", plan)
    qn("export", tmp_path / "q.pt", "-o", tmp_path / "m.qnz")
    from quantnoise.export import decode, read_qnz

    tensors, meta = read_qnz(tmp_path / "m.qnz")
    state = decode(tensors, meta)
    for n in LAYERS:
        e = meta["layers"][n]
        assert (e["bits"], e["pack_width"], e.get("rows_per_scale", 1)) == (BITS[n], BITS[n], ROWS.get(n, 1)), n
        assert tensors[f"{n}.qweight"].numel() == math.ceil(math.prod(e["shape"]) * BITS[n] / 8)  # int3 in 3 bits
        m = model.get_submodule(n)
        q = m.noisy(m.weight, 1.0).detach()  # what the QAT model computes with in eval
        assert (state[f"{n}.weight"] - q).abs().max() <= 1e-6 * q.abs().max(), n


@pytest.mark.parametrize("plan,words", [
    ({"decoder.layers.0.fc1": 3, "decoder.fc9": 4}, "bit plan names 1 layer(s) that QNTransformerLanguageModel lacks (decoder.fc9"),
    ({"decoder.layers.0.fc1": 9}, "layer 'decoder.layers.0.fc1': bits=9 is invalid: use an integer from 2 to 8"),
])
def test_bad_plan_stops_fairseq_train_in_one_line(lm_data, tmp_path, plan, words):
    import json

    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = run(["fairseq-train", lm_data, "--user-dir", USER_DIR, "--task", "language_modeling",
                "--arch", "qn_transformer_lm_tiny", "--tokens-per-sample", "32", "--max-tokens", "512",
                "--optimizer", "adam", "--lr", "0.002", "--max-update", "1", "--num-workers", "0", "--cpu",
                "--save-dir", tmp_path / "ckpt", "--quant-noise-plan", tmp_path / "plan.json"], check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and err and err[-1].startswith("error: --quant-noise-plan"), proc.stderr[-2000:]
    assert words in err[-1], err[-1]
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
