"""iPQ under fairseq's distributed training: 2 CPU ranks (gloo, ``legacy_ddp``), each fed its own
batches.  Centroids created after fairseq wrapped the model (by a stage swap, or when a quantized
checkpoint loads) must be all-reduced like every other parameter; if they are not, each rank trains
them on its own data and the ranks drift.  DDP averaging of the parameters it knew at wrap time does
not give this, so the tests check that ranks which saw different data end with identical centroids.
Set-up as in test_plugin_distributed.py (fairseq-train's entry point, one process per rank)."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import run
from test_plugin_distributed import launch_two_ranks

pytestmark = pytest.mark.slow

DRIVER = r'''
import sys, torch
import fairseq.trainer as T
from fairseq_cli import train

seen, tokens = {}, []
init, step = T.Trainer.__init__, T.Trainer.train_step
T.Trainer.__init__ = lambda self, *a, **k: (init(self, *a, **k), seen.setdefault("trainer", self))[0]

def train_step(self, samples, raise_oom=False):
    tokens.extend(int(s["net_input"]["src_tokens"].sum()) for s in samples if s)  # this rank's data
    return step(self, samples, raise_oom)

T.Trainer.train_step = train_step
out = sys.argv.pop(1)
sys.argv[0] = "fairseq-train"
train.cli_main()
t = seen["trainer"]
torch.save({"world": t.data_parallel_world_size, "tokens": tokens,
            "params": {k: v.detach().clone() for k, v in t.get_model().state_dict().items()}},
           f"{out}/rank{t.data_parallel_rank}.pt")
'''


def two_ranks(tmp_path, lm_data, *extra):
    logs = launch_two_ranks(tmp_path, DRIVER, lm_data, *extra)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["tokens"] and r0["tokens"] != r1["tokens"]  # each rank trained on its own batches
    return r0["params"], r1["params"], logs


def assert_identical(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"ranks drifted on {differ}"


def test_centroids_from_a_restored_checkpoint_and_a_stage_swap_stay_identical_across_ranks(lm_data, tiny_lm_ckpt, tmp_path):
    # fc1/fc2 arrive quantized in the restored checkpoint (swapped in while it loads, after fairseq
    # wrapped the model); the embedding is quantized by the plan's stage 1 at update 2
    run([sys.executable, "-m", "quantnoise.cli", "quantize", tiny_lm_ckpt, "-o", tmp_path / "q.pt", "--include", "fc[12]",
         "--centroids", "16"])
    (tmp_path / "plan.yaml").write_text("""stages:
  - {pattern: 'fc[12]', block_size: 8, n_centroids: 16, updates: 2}
  - {pattern: 'embed_tokens', block_size: 8, n_centroids: 16, updates: 3}
""")
    # each rank reads the file: fairseq's rank-0 broadcast of a checkpoint re-loads it with torch.load's
    # weights_only default (torch >= 2.6), which refuses the DictConfig inside
    a, b, logs = two_ranks(tmp_path, lm_data, "--restore-file", tmp_path / "q.pt", "--reset-optimizer",
                           "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", "--load-checkpoint-on-all-dp-ranks",
                           "--ipq-plan", tmp_path / "plan.yaml", "--max-update", "5")
    assert "compressed layers in the loaded state" in logs[0] and "stage 1" in logs[0]
    assert "decoder.embed_tokens.centroids" in a and "decoder.layers.0.self_attn.q_proj.weight" in a
    assert_identical(a, b)
    start = torch.load(tmp_path / "q.pt", weights_only=True)["model"]
    key = "decoder.layers.0.fc1.centroids"
    assert not torch.equal(a[key], start[key])  # the restored centroids did train
