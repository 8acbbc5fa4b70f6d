"""The whole path on a tiny trained LM: quantize -> fine-tune in fairseq-train -> export -> inspect ->
fairseq-eval-lm on the .qnz (plugin) and on the decompressed checkpoint (stock fairseq, no plugin),
both compared with the fine-tuned checkpoint the .qnz came from (tensor by tensor, and perplexity)."""
import re
import shutil
import sys

import pytest
import torch

from conftest import USER_DIR, run, train_tiny_lm

EVAL = ["--tokens-per-sample", "32", "--max-tokens", "512", "--num-workers", "0"]
PLAN = """seed: 0
stages:
  - {pattern: 'fc[12]', block_size: 8, n_centroids: 32, updates: 4}
  - {pattern: 'embed_tokens|output_projection', block_size: 8, n_centroids: 64, updates: 4}
  - {pattern: '_proj', block_size: 4, n_centroids: 32, updates: 4}
"""


def qn(*args):
    return run([sys.executable, "-m", "quantnoise.cli", *args])


def perplexity(out) -> str:
    m = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", out.stderr + out.stdout)
    assert m, out.stderr[-2000:]
    return m.group(0)


@pytest.mark.slow
def test_quantize_finetune_export_inspect_eval(tiny_lm_ckpt, lm_data, tmp_path):
    qn("quantize", tiny_lm_ckpt, "-o", tmp_path / "q.pt", "--centroids", "64")
    # fine-tune the centroids (and the remaining fp weights) of the quantized model
    train_tiny_lm(lm_data, tmp_path / "ft", "--restore-file", tmp_path / "q.pt", "--reset-optimizer",
                  "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", updates=6)
    before = torch.load(tmp_path / "q.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=True)["model"]
    key = "decoder.layers.0.fc1"
    assert torch.equal(before[f"{key}.codes"], after[f"{key}.codes"])  # codes fixed
    assert not torch.equal(before[f"{key}.centroids"], after[f"{key}.centroids"])  # centroids trained

    qn("export", tmp_path / "ft" / "checkpoint_last.pt", "-o", tmp_path / "m.qnz")
    report = qn("inspect", tmp_path / "m.qnz").stdout
    assert "decoder.layers.1.self_attn.q_proj" in report and "compression x" in report
    qn("decompress", tmp_path / "m.qnz", "-o", tmp_path / "d.pt")

    # the .qnz holds the fine-tuned checkpoint it came from: codebook[codes] with the centroids rounded
    # to fp16, every other tensor rounded to fp16 (the default --rest)
    from quantnoise.export import load_qnz

    state, meta = load_qnz(tmp_path / "m.qnz")
    for name, e in meta["layers"].items():
        want = after[f"{name}.centroids"].half().float()[after[f"{name}.codes"].long()].reshape(e["shape"])
        assert torch.equal(state[f"{name}.weight"], want), name
    for key in meta["dense"]:
        assert torch.equal(state[key], after[key].half().to(after[key].dtype)), key
    for key, target in meta["aliases"].items():
        assert state[key] is state[f"{target}.weight"], key
    assert set(meta["layers"]) == {k[: -len(".codes")] for k in after if k.endswith(".codes")}

    checkpoint = run(["fairseq-eval-lm", lm_data, "--path", tmp_path / "ft" / "checkpoint_last.pt", "--user-dir",
                      USER_DIR, *EVAL])  # the fine-tuned PQ layers themselves (fp32 centroids)
    with_plugin = run(["fairseq-eval-lm", lm_data, "--path", tmp_path / "m.qnz", "--user-dir", USER_DIR, *EVAL])
    stock = run(["fairseq-eval-lm", lm_data, "--path", tmp_path / "d.pt", *EVAL])  # no --user-dir
    assert perplexity(with_plugin) == perplexity(stock)
    ppl = [float(re.search(r"Perplexity: ([0-9.]+)", perplexity(p)).group(1)) for p in (checkpoint, with_plugin)]
    assert abs(ppl[1] - ppl[0]) / ppl[0] < 0.002, ppl  # the file changes the model by fp16 rounding only


@pytest.mark.slow
def test_stage_plan_resumes_mid_plan_exactly(tiny_lm_ckpt, lm_data, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    common = ["--ipq-plan", plan, "--save-interval-updates", "6"]
    train_tiny_lm(lm_data, tmp_path / "full", "--restore-file", tiny_lm_ckpt, "--reset-optimizer",
                  "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", *common, updates=12)
    mid = torch.load(tmp_path / "full" / "checkpoint_1_6.pt", weights_only=True)["model"]
    assert "decoder.embed_tokens.codes" in mid and "decoder.layers.0.self_attn.q_proj.weight" in mid  # stage 1 of 3
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint_1_6.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    out = train_tiny_lm(lm_data, tmp_path / "resumed", *common, updates=12)
    assert "stage 2" in out.stderr + out.stdout
    a = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and "decoder.layers.1.self_attn.q_proj.codes" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_eval_lm_rejects_a_bad_or_forged_qnz_in_one_line(tiny_lm_ckpt, lm_data, tmp_path):
    from quantnoise import export
    from quantnoise.checkpoint import load_checkpoint
    from quantnoise.compress.layers import LayerRule
    from quantnoise.compress.plan import IPQPlan, quantize_state_dict
    from test_export import write_signed

    (tmp_path / "bad.qnz").write_bytes(b"\x00" * 64)
    # checksums valid, codes beyond the 16-centroid codebook (issue 10: an IndexError deep in the decoder)
    state = load_checkpoint(tiny_lm_ckpt)
    model, _ = quantize_state_dict(state["model"], IPQPlan([LayerRule(pattern="fc1", block_size=4, n_centroids=16)]))
    tensors, meta = export.encode(model, {"cfg": state["cfg"], "num_updates": 1}, export.ExportOptions())
    tensors["decoder.layers.0.fc1.codes"][3] = 200
    write_signed(tmp_path / "forged.qnz", tensors, meta)
    # (a missing path is fairseq's own check, for every path: "OSError: Model file not found", with a traceback)
    for name, words in (("bad.qnz", "is not a valid .qnz file"),
                        ("forged.qnz", "codes up to 200, but the codebook has 16 centroids")):
        out = run(["fairseq-eval-lm", lm_data, "--path", tmp_path / name, "--user-dir", USER_DIR, *EVAL], check=False)
        assert out.returncode != 0 and words in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
