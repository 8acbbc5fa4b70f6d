"""fairseq's own distributed training with the plugin: 2 CPU processes (gloo), tiny LM, pq noise.

Each rank runs fairseq-train's entry point (``fairseq_cli.train.cli_main``) through a small driver
that, after training, saves what that rank holds: parameters, pq codebooks, step counters, and the
noised weight each layer would use on the next training forward.  fairseq only saves checkpoints on
rank 0, hence the driver.  On CPU fairseq needs ``--ddp-backend legacy_ddp`` (its c10d path passes
GPU device ids to DistributedDataParallel) and one process per rank (its spawn path counts GPUs).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import TINY_LM, USER_DIR

DRIVER = r'''
import sys, torch
import fairseq.trainer as T
from fairseq_cli import train
from quantnoise.nn import QuantNoiseMixin

seen = {}
init = T.Trainer.__init__
T.Trainer.__init__ = lambda self, *a, **k: (init(self, *a, **k), seen.setdefault("trainer", self))[0]
out = sys.argv.pop(1)
sys.argv[0] = "fairseq-train"
train.cli_main()

t = seen["trainer"]
model = t.get_model()  # the unwrapped model
layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantNoiseMixin)}
state = {"world": t.data_parallel_world_size,
         "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
         "codebooks": {n: m.qn_codebook.clone() for n, m in layers.items() if m.qn_codebook is not None},
         "steps": {n: m.qn_step for n, m in layers.items()}}
with torch.no_grad():
    model.train()
    state["next_noisy"] = {n: m.noisy(m.weight.detach(), m.qn_cfg.p) for n, m in layers.items()}
torch.save(state, f"{out}/rank{t.data_parallel_rank}.pt")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(tmp_path, driver: str, lm_data, *extra) -> list:
    """Write ``driver`` to tmp_path and run it as fairseq ranks 0 and 1 of the tiny LM (CPU, gloo,
    ``legacy_ddp``, checkpoints in tmp_path/ckpt) with the ``extra`` flags; the logs, once both exited 0."""
    (tmp_path / "driver.py").write_text(driver)
    flags = [str(lm_data), "--user-dir", USER_DIR, *TINY_LM, "--max-tokens", "256", "--save-dir", str(tmp_path / "ckpt"),
             "--cpu", "--distributed-world-size", "2", "--distributed-backend", "gloo",
             "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}", "--distributed-no-spawn",
             "--ddp-backend", "legacy_ddp", *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path), *flags,
                               "--distributed-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    return logs


@pytest.mark.slow
def test_two_cpu_ranks_end_identical_with_identical_codebooks(lm_data, tmp_path):
    import torch

    logs = launch_two_ranks(tmp_path, DRIVER, lm_data, "--max-update", "12", "--quant-noise-scheme", "pq",
                            "--quant-noise-p", "0.2", "--quant-noise-block-size", "4", "--quant-noise-centroids", "16",
                            "--quant-noise-refresh-every", "5")
    assert "initialized host" in logs[1] and "as rank 1" in logs[1]

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    start = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)["model"]
    assert r0["params"].keys() == r1["params"].keys() == start.keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])  # ranks agree exactly
    assert all(torch.equal(r0["params"][k], start[k]) for k in start)  # ...and with the saved checkpoint

    # pq codebooks: k-means seeded by (seed, layer, refresh) on identical weights -> identical on each rank
    assert len(r0["codebooks"]) == len(r0["steps"]) == 14
    assert all(torch.equal(r0["codebooks"][n], r1["codebooks"][n]) for n in r0["codebooks"])
    # masks: seeded by (seed, layer, step), the same step counters -> the same noised weights
    assert r0["steps"] == r1["steps"] and set(r0["steps"].values()) == {12}
    assert all(torch.equal(r0["next_noisy"][n], r1["next_noisy"][n]) for n in r0["next_noisy"])
    assert any(not torch.equal(r0["next_noisy"][n], r0["params"][n + ".weight"]) for n in r0["next_noisy"])
