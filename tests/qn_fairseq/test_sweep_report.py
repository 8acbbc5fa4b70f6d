"""``quantnoise sweep-report`` on hand-made multirun folders: finished, crashed and missing runs
each get their own row (the end-to-end sweep is in test_plugin_hydra.py)."""
from __future__ import annotations

import re

from conftest import run

LOG_OK = """[2026][fairseq_cli.train][INFO] - Start iterating over samples
[2026][train_inner][INFO] - epoch 001:     50 / 60 loss=7.1, ppl=137.2, num_updates=50, lr=0.003, wall=3
[2026][valid][INFO] - epoch 001 | valid on 'valid' subset | loss {loss} | ppl {ppl} | wps 0 | num_updates 60
[2026][fairseq_cli.train][INFO] - done training in 4.5 seconds
"""
LOG_CRASHED = """[2026][train_inner][INFO] - epoch 001:     20 / 60 loss=nan, ppl=nan, num_updates=20, wall=1.5
"""


def make_sweep(root, values, jobs):
    """A Hydra-like multirun folder sweeping model.quant_noise_p over ``values``; ``jobs`` maps the job
    number to its log text (None: folder absent)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - task.data=/data\n"
        f"    - model.quant_noise_p={','.join(values)}\n    - quant_noise=scalar_int8\n")
    for num, log in jobs.items():
        if log is None:
            continue
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- task.data=/data\n- model.quant_noise_p={values[num]}\n- quant_noise=scalar_int8\n")
        (job / ".hydra" / "config.yaml").write_text(
            f"model:\n  _name: qn_transformer_lm\n  quant_noise_scheme: scalar\n  quant_noise_p: {values[num]}\n")
        (job / "hydra_train.log").write_text(log)
    return root


def rows(md: str):
    return [[c.strip() for c in l.strip("|").split("|")] for l in md.splitlines() if re.match(r"\| (\d|—) ", l)]


def test_crashed_and_missing_runs_are_reported(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["0", "0.1", "0.2", "0.3"],
                       {0: LOG_OK.format(loss="6.5", ppl="90.51"), 1: LOG_CRASHED, 2: None,
                        3: LOG_OK.format(loss="6.9", ppl="119.43")})
    out = run(["quantnoise", "sweep-report", sweep])
    assert "4 runs: 2 ok, 1 crashed, 1 missing" in out.stdout
    table = rows((sweep / "report.md").read_text())
    by_p = {r[1]: r for r in table}  # columns: run, model.quant_noise_p, scheme, noise rate, loss, ppl, ...
    assert set(by_p) == {"0", "0.1", "0.2", "0.3"}
    assert by_p["0"][2:] == ["none", "0", "6.500", "90.51", "60", "4.5", "ok"]
    assert by_p["0.3"][2] == "scalar" and by_p["0.3"][5] == "119.43"
    assert by_p["0.1"][-1] == "**crashed**" and by_p["0.1"][6] == "20" and by_p["0.1"][7] == "1.5"
    assert by_p["0.2"][0] == "—" and by_p["0.2"][-1] == "**missing**" and by_p["0.2"][3] == "0.2"
    assert "2 crashed or missing" in (sweep / "report.md").read_text()
    assert (sweep / "ppl_vs_noise.png").read_bytes()[:4] == b"\x89PNG"


def test_custom_outputs_and_bad_folder(tmp_path):
    sweep = make_sweep(tmp_path / "s", ["0", "0.1"], {0: LOG_OK.format(loss="6", ppl="64"),
                                                       1: LOG_OK.format(loss="6.2", ppl="73.5")})
    run(["quantnoise", "sweep-report", sweep, "--markdown", tmp_path / "r.md", "--plot", tmp_path / "r.png"])
    assert len(rows((tmp_path / "r.md").read_text())) == 2 and (tmp_path / "r.png").stat().st_size > 1000

    bad = run(["quantnoise", "sweep-report", tmp_path], check=False)
    assert bad.returncode == 2 and "multirun.yaml" in bad.stderr and "Traceback" not in bad.stderr


def test_quantnoise_eval_json_adds_a_column(tmp_path):
    sweep = make_sweep(tmp_path / "sweep", ["0", "0.1"], {0: LOG_OK.format(loss="6.5", ppl="90.51"),
                                                           1: LOG_OK.format(loss="6.6", ppl="97.00")})
    (sweep / "0" / "quantnoise_eval.json").write_text('{"ppl_valid_ipq": 120.5}')
    (sweep / "1" / "quantnoise_eval.json").write_text('{"ppl_valid_ipq": 110.25}')
    run(["quantnoise", "sweep-report", sweep])
    md = (sweep / "report.md").read_text()
    assert "`ppl_valid_ipq`" in md and "| 120.50 |" in md and "| 110.25 |" in md
    assert (sweep / "ppl_vs_noise.png").stat().st_size > 0
