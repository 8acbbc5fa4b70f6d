"""scripts/gpu_check.sh: the one-command GPU check.  No CUDA here, so its steps run in their CPU dry-run form
(the same commands, amp only, tiny sizes): the script's own logic is checked before a GPU ever runs it."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(out, **env) -> subprocess.CompletedProcess:
    # GPU_CHECK_* of an enclosing run (this file runs inside the check's own pytest step) must not leak in
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=900,
                          env={**base, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: run the real check")
def test_without_a_gpu_it_stops_at_once_saying_so(tmp_path):
    out = check(tmp_path / "gc")
    assert out.returncode == 1
    summary = (tmp_path / "gc" / "summary.md").read_text()
    assert "| env | FAIL | torch sees no CUDA device" in summary and "train_" not in summary


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_folder(tmp_path):
    out = check(tmp_path / "gc", GPU_CHECK_DRY_RUN="1")
    summary = (tmp_path / "gc" / "summary.md").read_text()
    assert out.returncode == 0, summary + out.stderr[-2000:]
    rows = dict(re.findall(r"^\| (\w+) \| (PASS|FAIL) \|", summary, re.M))
    assert rows == {k: "PASS" for k in ("env", "tests", "train_drop_amp", "train_scalar_amp", "train_pq_amp",
                                         "ipq_eval", "bench")}, summary
    ppl = re.search(r"compressed \.qnz Perplexity: ([0-9.]+), decoded Perplexity: ([0-9.]+)", summary)
    assert ppl and ppl.group(1) == ppl.group(2)  # the compressed runtime computes what the decoded model does
    assert "| qn pq p=0.1 |" in summary and (tmp_path / "gc" / "bench.json").exists()
