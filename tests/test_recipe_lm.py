"""recipes/lm/run.sh: the whole Quant-Noise table on a tiny corpus (real fairseq-preprocess, fairseq-train,
fairseq-hydra-train -m, quantnoise quantize/export/sweep-report, fairseq-eval-lm), and its bad-input errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run

sys.path.insert(0, str(ROOT / "recipes" / "lm"))
import lm_recipe as R  # noqa: E402

RUN_SH = ROOT / "recipes" / "lm" / "run.sh"
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def recipe(*args, timeout=1800):
    return subprocess.run(["bash", str(RUN_SH), *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    run([sys.executable, ROOT / "scripts" / "make_corpus.py", d, "--max-lines", "300"])
    return d


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["missing_train", "empty_valid", "outdir_is_file", "test_not_in_vocab",
                                  "other_run_in_outdir"])
def test_bad_input_is_one_line_and_touches_nothing(corpus, tmp_path, case):
    train, valid, test, out = corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", tmp_path / "out"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"size": "tiny"}))  # a previous run's folder
    (out / "results.md").write_text("earlier results\n")
    expect = None
    if case == "missing_train":
        train, expect = tmp_path / "nope.txt", "nope.txt' does not exist"
    elif case == "empty_valid":
        valid = tmp_path / "empty.txt"
        valid.write_text("\n  \n")
        expect = "empty.txt' is empty"
    elif case == "outdir_is_file":
        out = tmp_path / "file"
        out.write_text("x")
        expect = "is a file; pass a folder"
    elif case == "test_not_in_vocab":
        test = tmp_path / "foreign.txt"
        test.write_text("zzqx wvvb qqqj\n")
        expect = "foreign.txt' has no token of the vocabulary"
    else:  # the folder holds a run with other settings (the fake recipe.json): refuse to mix them
        expect = "holds a run with other inputs or size"
    before = snapshot(tmp_path)
    proc = recipe(train, valid, test, out, "--size", "tiny", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing overwritten


@pytest.mark.slow
def test_recipe_end_to_end_tiny(corpus, tmp_path):
    out = tmp_path / "run"
    # --seeds 2: both parts run a second seed (the table: of its fp32 and iPQ rows; the fine-tune: after the baseline)
    proc = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", out, "--size", "tiny", "--seeds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [l for l in proc.stdout.splitlines() if "] [" in l]
    assert len(steps) >= 20 and all("s, cpu" in l for l in steps)  # one progress line per step, with times

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"fp32", "ipq", "int4", "int8", "ipq_pq_noise", "sweep"}
    entries = [res["fp32"], res["ipq_pq_noise"]] + [res[k][c] for k in ("ipq", "int4", "int8")
                                                    for c in ("posthoc", "qat", "quant_noise")]
    for e in entries:
        assert set(e) >= {"ppl", "bytes"} and e["ppl"] > 1 and e["bytes"] > 0
    # compression: int4 < int8 < fp32 file sizes, iPQ < fp32 (at this tiny width a 256-entry codebook per layer
    # is larger than int4 codes, so iPQ vs int4 is not asserted)
    assert res["int4"]["posthoc"]["bytes"] < res["int8"]["posthoc"]["bytes"] < res["fp32"]["bytes"]
    assert res["ipq"]["posthoc"]["bytes"] < res["fp32"]["bytes"]
    rates = [e["p"] for e in res["sweep"]]
    assert rates == [0.0, 0.1, 0.2]  # tiny sweeps 2 rates and the baseline; the real sizes at least 4 rates, the baseline p = 0 included (below)
    assert all(len(R.SIZES[size]["rates"]) >= 4 and 0 in R.SIZES[size]["rates"] for size in ("small", "base"))
    assert all(e["ppl_valid_fp32"] > 1 and e["ppl_valid_ipq"] > 1 for e in res["sweep"])
    assert res["details"]["drop_p_chosen_on_valid"] in rates
    for row in ("fp32", "ipq.posthoc", "ipq.qat", "ipq.quant_noise", "ipq_pq_noise", "int4.posthoc", "int4.qat",
                "int4.quant_noise", "int8.posthoc", "int8.qat", "int8.quant_noise"):
        qnz = out / "qnz" / f"{row}.qnz"
        assert qnz.is_file() and qnz.stat().st_size > 0, row
    # the table's second seed retrains the models of its fp32 and iPQ rows with --seed 2 and runs their iPQ with seed 2
    t = res["seeds"]
    assert [e["seed"] for e in t["seeds"]] == [1, 2] and all((out / "qnz" / f"{r}.s2.qnz").is_file() for r in R.Recipe.TABLE_SEEDED)
    assert t["seeds"][0]["fp32"] != t["seeds"][1]["fp32"]  # another seed, another baseline
    assert res["fp32"]["ppl"] == pytest.approx((t["seeds"][0]["fp32"] + t["seeds"][1]["fp32"]) / 2)
    assert res["fp32"]["ppl_seed1"] == t["seeds"][0]["fp32"] and res["ipq"]["posthoc"]["ppl_interval"]["n"] == 2
    assert "--seed 2" in (out / "logs" / "train_ipq_qat.s2.log").read_text()
    assert "over 2 seeds" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0 and (out / "sweep.png").stat().st_size > 0
    assert "| iPQ" in (out / "results.md").read_text()
    sweep = (out / "sweep_report.md").read_text()  # quantnoise sweep-report with the iPQ column
    assert "ppl_valid_ipq" in sweep and "3 of 3 runs finished" in sweep
    assert len(list((out / "sweep").glob("p*/hydra_train.log"))) == 3  # one Hydra multirun job per rate

    # the noise fine-tune: baseline -> plain and noise continuations -> the same iPQ + centroid fine-tune -> TEST
    ft = res["finetune"]
    assert ft["updates"] == R.FINETUNE["tiny"]["updates"]
    assert R.FINETUNE["tiny"]["seeds"] == 1 and [e["seed"] for e in ft["seeds"]] == [1, 2] and ft["gap_cut"]["n"] <= 2
    step = lambda o, n: json.loads((o / "steps" / f"{n}.json").read_text())["result"]  # noqa: E731
    assert step(out, "ft_plain.s2")["valid"] != step(out, "ft_plain.s1")["valid"]  # seed 2 reseeds what follows the baseline
    cuts = [e["gap_cut"] for e in ft["seeds"] if e["gap_cut"] is not None]
    if len(cuts) == 2:
        assert ft["gap_cut"]["mean"] == pytest.approx(sum(cuts) / 2)
        assert ft["gap_cut"]["lo90"] <= ft["gap_cut"]["mean"] <= ft["gap_cut"]["hi90"]
    assert all(len(c["ppl_valid_ipq_seeds"]) == 2 for c in ft["candidates"])
    e = ft["seeds"][0]
    assert e["fp32"]["ppl"] > 1 and all(e[k]["ppl"] > 1 and 0 < e[k]["bytes"] < e["fp32"]["bytes"]
                                        for k in ("ipq_plain", "ipq_qn"))
    assert e["gap_plain"] == pytest.approx(e["ipq_plain"]["ppl"] - e["reference"]["ppl"])
    assert [c["candidate"] for c in ft["candidates"]] == R.FINETUNE["tiny"]["candidates"]
    best = min(ft["candidates"], key=lambda c: c["ppl_valid_ipq"])
    assert ft["noise"] == best["candidate"]  # chosen on VALID
    b = ft["baseline"]
    assert b["updates"] == R.FINETUNE["tiny"]["base_updates"] and not b["given"] and not b["auto"]
    assert [u for u, _ in b["valid_curve"]][-1] == R.FINETUNE["tiny"]["base_updates"]
    assert len(b["valid_curve"]) >= 5 and isinstance(b["converged"], bool)
    assert b["best"]["valid"] == min(v for _, v in b["valid_curve"])  # the reference candidate: its best VALID
    assert (out / "finetune" / "baseline" / "checkpoint_best.pt").is_file()
    for name in ["plain", *R.FINETUNE["tiny"]["candidates"]]:  # each continuation restarted its update count
        log = (out / "logs" / f"ft_{name}.s1.log").read_text()
        assert re.findall(r"num_updates (\d+)", log)[-1] == str(ft["updates"])
    assert "--quant-noise-scheme" in " ".join(ft["candidates"][0]["flags"])
    assert "## Noise fine-tune" in (out / "results.md").read_text()
    assert (out / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads((out / "record.json").read_text())  # the project's record of the run (benchmarks/harness.py)
    assert rec["figures"] == res and rec["machine"]["cores"] == os.cpu_count() and rec["command"].startswith("recipes/lm/run.sh")

    # a rerun skips every finished step and changes nothing
    before = (out / "results.json").read_bytes()
    again = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", out, "--size", "tiny", "--seeds", "2",
                   timeout=300)
    assert again.returncode == 0 and "resuming:" in again.stdout and "] [" not in again.stdout, again.stdout
    assert (out / "results.json").read_bytes() == before

    # --from CKPT --only finetune: the same baseline given as a checkpoint gives seed 1 the same plain continuation
    base = out / "finetune" / "baseline" / "checkpoint_last.pt"
    out2 = tmp_path / "from"
    proc = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", out2, "--size", "tiny",
                  "--only", "finetune", "--from", base, "--ft-candidates", "pq_p0.5_vocab", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res2 = json.loads((out2 / "results.json").read_text())
    ft2 = res2["finetune"]
    assert set(res2) == {"finetune", "details"} and ft2["baseline"]["given"]
    assert step(out2, "ft_plain.s1")["valid"] == step(out, "ft_plain.s1")["valid"]
    assert [e["seed"] for e in ft2["seeds"]] == [1] and ft2["gap_cut"]["lo90"] is None  # one seed: no interval
    assert ft2["noise"] == "pq_p0.5_vocab" and len(ft2["candidates"][0]["ppl_valid_ipq_seeds"]) == 1
    assert R.VOCAB_LAYERS in ft2["candidates"][0]["flags"]
    assert not (out2 / "sweep").exists()  # the from-scratch table was not run

    # a --from checkpoint of another size or a missing one: one line, exit 2, nothing written
    for ckpt, args, expect in ((base, ("--size", "small"), "is a 1-layer, 32-d, FFN 64 model"),
                               (tmp_path / "nope.pt", ("--size", "tiny"), "nope.pt' does not exist")):
        bad = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", tmp_path / "bad", *args,
                     "--from", ckpt, timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and expect in lines[0], bad.stderr
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["drop_p0", "drop_p1.5", "scalar_p0.1", "pq_0.3", "drop_p0.3_emb"])
def test_bad_noise_candidate_is_one_line(corpus, tmp_path, name):
    proc = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", tmp_path / "out", "--size", "tiny",
                  "--ft-candidates", name, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"noise candidate '{name}'" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_candidate_flags():
    assert R.candidate_flags("drop_p0.3", 25) == ["--quant-noise-scheme", "drop", "--quant-noise-p", "0.3",
                                                  "--quant-noise-block-size", "8"]
    pq = R.candidate_flags("pq_p1_vocab", 25)
    assert pq[pq.index("--quant-noise-p") + 1] == "1.0" and pq[pq.index("--quant-noise-refresh-every") + 1] == "25"
    assert pq[-2:] == ["--quant-noise-layers", R.VOCAB_LAYERS]

def test_command_output_is_read_back_after_non_ascii_lines(tmp_path):
    """issue 22 item 10: the output was sliced at a byte offset of a str: earlier non-ASCII lines in the same
    log shifted it (eval_lm then found no perplexity, or parsed the wrong text)."""
    rec = R.Recipe(tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "s.txt", tmp_path / "out", "tiny", 1)
    (rec.out / "logs").mkdir(parents=True)
    rec.cpu = {}  # set by run(): the CPU seconds per step
    (rec.out / "logs" / "eval.log").write_text("« earlier run » — ünïcödé " * 20 + "\n", encoding="utf-8")
    out = rec.sh("eval", [sys.executable, "-c", "print('naïve | Perplexity: 12.50')"], log="eval")
    assert out == "naïve | Perplexity: 12.50\n"
    again = rec.sh("eval", [sys.executable, "-c", "print('second')"], log="eval")
    assert again == "second\n"


@pytest.mark.parametrize("args, expect", [
    (("--seeds", "0"), "--seeds 0 is invalid"),
    (("--seeds", "2", "--base-seeds", "3"), "--base-seeds 3 is invalid with 2 seed(s)"),
    (("--ft-base-updates", "soon"), "--ft-base-updates soon is invalid"),
    (("--ft-base-patience", "0"), "--ft-base-patience 0 is invalid"),
])
def test_bad_seed_and_baseline_options_are_one_line(corpus, tmp_path, args, expect):
    proc = recipe(corpus / "train.txt", corpus / "valid.txt", corpus / "test.txt", tmp_path / "out", "--size", "tiny",
                  *args, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def fake_finetune(tmp_path, rows, base_best_valid=100.0, base_best_ppl=90.0):
    """A Recipe whose step results are made up: rows = [(plain valid, fp32 test, iPQ plain test, iPQ noise test)]."""
    rec = R.Recipe(tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "s.txt", tmp_path / "out", "tiny", 1,
                   parts=("finetune",), finetune={"seeds": len(rows), "candidates": ["pq_p0.5"]})
    rec.results.update({"ft_baseline": {"best": {"valid": base_best_valid, "updates": 10}, "given": False},
                        "test_ft_baseline.best": {"ppl": base_best_ppl, "bytes": 1000},
                        "ft_select": {"candidate": "pq_p0.5", "candidates": [], "criterion": "c"}})
    for s, (valid, fp32, plain, qn) in enumerate(rows, 1):
        rec.results.update({f"ft_plain.s{s}": {"valid": valid}, f"ipq_ft_plain.s{s}": {"valid_noft": 1, "valid_ft": 1},
                            f"test_ft.fp32.s{s}": {"ppl": fp32, "bytes": 1000},
                            f"test_ft.ipq_plain.s{s}": {"ppl": plain, "bytes": 100},
                            f"test_ft.ipq_base.s{s}": {"ppl": plain + 1000, "bytes": 100},
                            f"test_ft.ipq_qn.s{s}": {"ppl": qn, "bytes": 100}})
    return rec.finetune_results()


def test_reference_is_the_better_on_valid_and_cuts_are_paired(tmp_path):
    # seed 1: the plain continuation is better on VALID than the baseline's best -> it is the reference;
    # seed 2: it is worse (past its best) -> the baseline's best checkpoint is
    # (and the plain row is then the iPQ of the baseline's best: fake_finetune gives it plain + 1000)
    ft = fake_finetune(tmp_path, [(95.0, 80.0, 100.0, 90.0), (105.0, 85.0, -890.0, 95.0)])
    s1, s2 = ft["seeds"]
    assert s1["reference"]["from"] == "plain" and s1["gap_cut"] == pytest.approx(1 - 10 / 20)
    assert s2["reference"]["from"] == "baseline_best" and s2["reference"]["ppl"] == 90.0
    assert s2["ipq_plain"]["ppl"] == 110.0 and s2["ipq_plain_continuation"]["ppl"] == -890.0
    assert s2["gap_cut"] == pytest.approx(1 - 5 / 20)
    assert ft["gap_cut"]["mean"] == pytest.approx(0.625) and ft["gap_cut"]["n"] == 2
    half = 6.3137515 * (0.25 / 2 ** 0.5) / 2 ** 0.5  # t(0.95, 1) * sd / sqrt(2), sd of (0.5, 0.75)
    assert ft["gap_cut"]["hi90"] - ft["gap_cut"]["mean"] == pytest.approx(half, rel=1e-6)
    assert ft["verdict"].startswith("cut by 62% (mean of 2 seed(s), 90% interval -16% to 141%)"), ft["verdict"]
    assert ft["ppl_gain"]["mean"] == pytest.approx(12.5)  # paired: per seed plain minus noise


def test_a_noise_model_better_than_the_reference_is_regularisation_not_a_cut(tmp_path):
    ft = fake_finetune(tmp_path, [(95.0, 80.0, 100.0, 75.0), (95.0, 80.0, 100.0, 90.0)])
    assert ft["seeds"][0]["regularised"] and ft["seeds"][0]["gap_cut"] > 1 and ft["regularised_seeds"] == 1
    assert ft["verdict"].startswith("regularisation, not a cut: in 1 of 2 seed(s)") and "%" not in ft["verdict"]
    md = "\n".join(R.finetune_markdown({**ft, "baseline": {"given": True, "checkpoint": "x.pt", "valid": 1.0}},
                                       {"ipq": R.IPQ}))
    assert "| regularisation |" in md and "125%" not in md


def test_table_seeds_are_paired_cuts_with_an_interval(tmp_path):
    # made-up TEST perplexities of the from-scratch table's fp32 and iPQ rows for 3 seeds (seed 1: the sweep's steps)
    rec = R.Recipe(tmp_path / "t.txt", tmp_path / "v.txt", tmp_path / "s.txt", tmp_path / "out", "tiny", 1,
                   parts=("table",), finetune={"seeds": 3})
    rows = {1: (50.0, 70.0, 65.0, 60.0, 58.0), 2: (52.0, 72.0, 70.0, 57.0, 62.0), 3: (51.0, 61.0, 60.0, 56.0, 45.0)}
    for seed, values in rows.items():
        sfx = "" if seed == 1 else f".s{seed}"
        for (row, step), v in zip(R.Recipe.TABLE_SEEDED.items(), values):
            rec.results[step + sfx] = {"ppl": v, "bytes": 100}
    t = rec.table_seeds()
    assert [e["seed"] for e in t["seeds"]] == [1, 2, 3]
    cuts = [1 - 10 / 20, 1 - 5 / 20, 1 - 5 / 10]  # 1 - (quant_noise - fp32) / (posthoc - fp32), per seed
    assert [e["gap_cut"]["ipq.quant_noise"] for e in t["seeds"]] == pytest.approx(cuts)
    assert t["gap_cut"]["ipq.quant_noise"]["mean"] == pytest.approx(sum(cuts) / 3) and t["gap_cut"]["ipq.quant_noise"]["n"] == 3
    assert t["gap_cut"]["ipq_pq_noise"]["hi90"] > 1  # seed 3's pq noise row beats its fp32 (cut 160%)
    assert t["ppl"]["fp32"]["mean"] == pytest.approx(51.0) and t["ppl"]["fp32"]["lo90"] < 51.0
    res = {"fp32": {"ppl": 51.0, "bytes": 1000, "ppl_interval": t["ppl"]["fp32"]},
           **{k: {c: {"ppl": 60.0, "bytes": 100} for c in ("posthoc", "qat", "quant_noise")} for k in ("ipq", "int4", "int8")},
           "ipq_pq_noise": {"ppl": 55.0, "bytes": 100}, "seeds": t, "sweep": [],
           "details": {"size": "tiny", "model": {"layers": 1, "dim": 32, "ffn": 64}, "vocab": 9, "updates": 1,
                       "tokens_per_update": 1, "ipq": R.IPQ, "finetune_updates": 1, "drop_p_chosen_on_valid": 0.1, "noise": {}}}
    md = "\n".join(R.table_markdown(res))
    assert "over 3 seeds" in md and "- ipq.quant_noise: iPQ gap to fp32 cut by 58% (90% interval" in md
    assert "per seed 50%, 75%, 50%" in md and "| fp32 | 51.00 ± " in md
