"""scripts/report.py: BENCHMARKS.md's tables rendered from results/*.json, and --check catching a hand edit."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _report()

DOC = """# Bench

Prose stays as written.

<!-- table: made; run: python benchmarks/made.py -->
stale
<!-- /table -->

<!-- table: old; run: recipes/x/run.sh -->
<!-- /table -->

<!-- table: demo; run: RECORD=results/demo.json make demo -->
<!-- /table -->
"""

MACHINE = {"cpu": "Test CPU 9000", "isa": "avx2", "cores": 2, "threads": 1, "load_avg": [1.5, 2.25, 3.0]}


def _record(results, file: str, name: str, figures: dict, command: str = "c", date: str = "2026-12-07"):
    """A made-up record of the harness's shape: results/<file>.json."""
    (results / f"{file}.json").write_text(json.dumps(
        {"name": name, "command": command, "commit": "abc", "date": date, "machine": MACHINE, "figures": figures}))


def _records(results):
    results.mkdir()
    (results / "made.json").write_text(json.dumps({
        "name": "made", "command": "python benchmarks/made.py --rounds 3", "commit": "abc1234", "dirty": False,
        "date": "2026-12-07T19:00:00Z", "machine": MACHINE,
        "figures": {"columns": ["case", "x fp32"], "rows": [["pq", "2.87"], ["int4", "1.93"]]}}))
    (results / "old.json").write_text(json.dumps({
        "name": "old", "command": "recipes/x/run.sh a b", "commit": "7907864", "date": "2026-12-03",
        "machine": {"cpu": "an old VM"}, "figures": {"columns": ["row", "acc"], "rows": [["fp32", "0.7620"]]},
        "provenance": {"transcribed_from": "BENCHMARKS.md@7907864", "section": "s", "machine": "an old VM",
                       "date": "2026-12-03", "command": "recipes/x/run.sh a b"}}))


def test_renders_tables_footers_and_placeholders(tmp_path):
    _records(tmp_path / "results")
    out = report.render(DOC, tmp_path / "results")
    assert "stale" not in out and "Prose stays as written." in out
    assert "| case | x fp32 |\n|---|---|\n| pq | 2.87 |\n| int4 | 1.93 |" in out
    # the footer names command, commit, date, CPU / ISA, threads and load
    assert ("*`python benchmarks/made.py --rounds 3` · commit abc1234 · 2026-12-07 · Test CPU 9000 (avx2), 2 cores, "
            "1 threads · load average 1.50/2.25/3.00*") in out
    assert "*(recorded at 7907864 on an old VM, 2026-12-03; not rerun)* *`recipes/x/run.sh a b`*" in out
    assert "(no record yet: run `RECORD=results/demo.json make demo`)" in out  # a missing record is a placeholder
    assert report.render(out, tmp_path / "results") == out  # rendering is idempotent: the markers stay


def test_demo_record_renders_seeds_interval_and_sizes(tmp_path):
    seeds = [{"seed": s, "fp32": {"ppl": 73.0 + s}, "ipq_plain": {"ppl": 98.0}, "ipq_qn": {"ppl": 82.0 + s},
              "gap_cut": c} for s, c in ((1, 0.64), (2, 0.5), (3, 0.58))]
    fig = {"seeds": seeds, "gap_cut": {"mean": 0.5733, "lo90": 0.4516, "hi90": 0.695, "n": 3},
           "bytes": {"fp32": 7806730, "ipq_plain": 329253, "ipq_qn": 329253}}
    (tmp_path / "results").mkdir()
    _record(tmp_path / "results", "demo", "lm_recipe", fig, command="make demo")
    out = report.render(DOC, tmp_path / "results")
    assert "| 1 | 74.00 | 98.00 | 83.00 | 64% |" in out and "| 3 | 76.00 | 98.00 | 85.00 | 58% |" in out
    assert "Gap cut: mean 57%, 90% interval 45% to 70% (n = 3 seeds)." in out
    assert "Files: fp32 7.45 MiB, iPQ 0.31 MiB (x23.7)." in out
    # the recipe's records: the row shows the gap's reference; a regularised seed prints the verdict, not a cut
    seeds[0]["reference"] = {"from": "baseline_best", "ppl": 70.0}
    fig.update(regularised_seeds=1, verdict="regularisation, not a cut: in 1 of 3 seed(s) ...")
    _record(tmp_path / "results", "demo", "lm_recipe", fig, command="make demo")
    out = report.render(DOC, tmp_path / "results")
    assert "| 1 | 70.00 | 98.00 | 83.00 | 64% |" in out and "Gap cut: mean" not in out
    assert "Gap: regularisation, not a cut: in 1 of 3 seed(s) ..." in out


def test_lm_recipe_record_renders_its_table_and_an_unknown_record_says_so(tmp_path):
    e = lambda ppl, b: {"ppl": ppl, "bytes": b}  # noqa: E731
    fig = {"fp32": e(141.6, 7806730), **{k: {c: e(p, b) for c in ("posthoc", "qat", "quant_noise")}
                                          for k, p, b in (("int8", 141.61, 2030043), ("ipq", 182.33, 329253))},
           "ipq_pq_noise": e(180.4, 329253), "details": {}}
    (tmp_path / "results").mkdir()
    for name, rec_name, figures in (("made", "lm_recipe", fig), ("old", "something_new", {"x": 1})):
        _record(tmp_path / "results", name, rec_name, figures)
    out = report.render(DOC, tmp_path / "results")
    assert "| ipq | 182.33 (0.31 MiB, x23.7) | 182.33 (0.31 MiB, x23.7) | 182.33 (0.31 MiB, x23.7) |" in out
    assert "| fp32 | 141.60 (7.45 MiB) |  |  |" in out
    assert "cannot render this record yet: name 'something_new'" in out


def test_a_seeded_lm_table_under_its_own_record_name_renders_intervals_and_cuts(tmp_path):
    iv = lambda m, h: {"mean": m, "lo90": m - h, "hi90": m + h, "sd": 1.0, "n": 3}  # noqa: E731
    e = lambda ppl, b, h=None: {"ppl": ppl, "bytes": b, **({"ppl_interval": iv(ppl, h)} if h else {})}  # noqa: E731
    fig = {"fp32": e(140.0, 7806730, 2.0), **{k: {c: e(p, b, h) for c in ("posthoc", "qat", "quant_noise")}
                                              for k, p, b, h in (("int8", 141.0, 2030043, None), ("ipq", 180.0, 329253, 5.0))},
           "ipq_pq_noise": e(170.0, 329253, 4.0), "details": {},
           "seeds": {"seeds": [{"seed": s, "gap_cut": {"ipq.quant_noise": c, "ipq_pq_noise": 1.2}} for s, c in ((1, 0.1), (2, 0.2), (3, 0.3))],
                     "gap_cut": {"ipq.quant_noise": iv(0.2, 0.17), "ipq_pq_noise": iv(1.2, 0.0)}}}
    (tmp_path / "results").mkdir()
    _record(tmp_path / "results", "made", "lm_scratch_small", fig, date="2026-12-08")
    out = report.render(DOC, tmp_path / "results")
    assert "| fp32 | 140.00 ± 2.00 (7.45 MiB) |  |  |" in out and "| ipq | 180.00 ± 5.00 (0.31 MiB, x23.7) |" in out
    assert "| int8 | 141.00 (1.94 MiB, x3.8) |" in out  # seed 1 only: no interval
    assert "- ipq.quant_noise: 20% (3% to 37%; per seed 10%, 20%, 30%)" in out
    assert "- ipq_pq_noise: regularisation, not a cut" in out and "cannot render" not in out


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_check_catches_a_hand_edit_and_render_fixes_it(tmp_path):
    _records(tmp_path / "results")
    doc = tmp_path / "B.md"
    doc.write_text(DOC)
    r = _run("--check", "--doc", doc, "--results", tmp_path / "results")
    assert r.returncode == 1 and "line(s) differ" in r.stderr and "(table made)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # a one-line summary
    assert _run("--doc", doc, "--results", tmp_path / "results").returncode == 0
    assert _run("--check", "--doc", doc, "--results", tmp_path / "results").returncode == 0
    doc.write_text(doc.read_text().replace("| pq | 2.87 |", "| pq | 3.10 |"))  # a figure typed by hand
    r = _run("--check", "--doc", doc, "--results", tmp_path / "results")
    assert r.returncode == 1 and "(table made)" in r.stderr
    doc.write_text(doc.read_text().replace("Prose stays", "Prose may change"))  # prose is the file's own
    _run("--doc", doc, "--results", tmp_path / "results")
    assert _run("--check", "--doc", doc, "--results", tmp_path / "results").returncode == 0


def test_bad_record_is_a_one_line_error(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "made.json").write_text("{not json")
    doc = tmp_path / "B.md"
    doc.write_text(DOC)
    r = _run("--check", "--doc", doc, "--results", tmp_path / "results")
    assert r.returncode != 0 and "made.json is not JSON" in r.stderr and "Traceback" not in r.stderr


def test_the_repository_benchmarks_md_is_what_its_records_render():
    r = _run("--check")
    assert r.returncode == 0, r.stderr


def test_benchmarks_md_is_current_state_only():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 700
    for bad in ("/work/", "/tmp/", "/home/", "this run", "this session", "the day before", "not committed"):
        assert bad not in text, bad
    names = [m["name"] for m in report.MARKER.finditer(text)]
    assert {"noise", "kmeans", "ipq_export", "demo", "lm_finetune_stdlib", "lm_finetune_man", "bert_ipq", "bert_q8bert", "bert_qbert",
            "runtime_speed", "hf_speed"} <= set(names)


@pytest.mark.parametrize("path", sorted((ROOT / "results").glob("*.json")), ids=lambda p: p.name)
def test_committed_records_say_where_they_come_from(path):
    rec = json.loads(path.read_text())
    assert rec["command"] and rec["commit"] and rec["date"] and rec["machine"]["cpu"]
    if "provenance" in rec:
        assert set(rec["provenance"]) >= {"transcribed_from", "section", "machine", "date", "command"}
    else:
        assert {"isa", "threads", "load_avg", "versions"} <= set(rec["machine"])
    commands = [rec["command"], rec.get("provenance", {}).get("command", "")]  # shown in BENCHMARKS.md
    assert not any(p in c for c in commands for p in ("/work/", "/tmp/", "/home/")), commands


def test_peers_record_renders_speeds_ratios_and_absent_peers():
    s = lambda m: {"median": m, "min": m, "max": m, "n": 1}  # noqa: E731
    row = lambda case, gen, ratio: {"case": case, "t1": {"gen_tok_s": gen, "gen_s": s(1.0), "prefill_tok_s": 2 * gen,  # noqa: E731
                                                         "prefill_s": s(1.0), "gen_vs_fp32": ratio, "prefill_vs_fp32": ratio},
                                    "bytes": 2**20, "rss": {"before": 0, "after_load": 3 * 2**20, "after_prefill": 0}}
    fig = {"config": {"layers": 2, "dim": 128, "vocab": 512, "ffn": 256, "new_tokens": 8, "prompt": 8, "prefill": 16,
                      "rounds": 1, "threads": [1], "quick": True},
           "rows": [row("fp32", 10.0, 1.0), row("quantnoise pq", 40.0, 4.0), {"case": "quanto int4",
                                                                               "note": "not installed (optimum.quanto)"}],
           "versions": {"gguf": "0.19.0"}}
    out = "\n".join(report.render_record({"name": "peers", "command": "c", "commit": "abc", "date": "2026-12-08",
                                          "machine": MACHINE, "figures": fig}))
    assert "| quantnoise pq | 40.0 (4.00x) | 80.0 (4.00x) | 3.00 | 1.00 |" in out
    assert "| quanto int4 | not installed (optimum.quanto) |  |  |  |" in out
    assert "Llama 2x128 (FFN 256, vocabulary 512)" in out and "gguf 0.19.0" in out
