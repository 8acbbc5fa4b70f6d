"""benchmarks/harness.py: interleaved rounds, the record a benchmark writes, and two benchmarks run end to end
(tiny sizes) writing records that scripts/report.py renders."""
import json
import subprocess
import sys

import pytest

from benchmarks import harness
from conftest import ROOT
from test_report import report


def test_interleaved_shuffles_each_round_and_takes_ratios():
    order = []
    times = {"plain": 1.0, "a": 2.0, "b": 3.0}
    cases = {k: (lambda k=k: order.append(k) or times[k]) for k in times}
    out = harness.interleaved(cases, rounds=6, seed=3, baseline="plain")
    rounds = [tuple(order[i:i + 3]) for i in range(0, 18, 3)]
    assert all(sorted(r) == ["a", "b", "plain"] for r in rounds) and len(set(rounds)) > 1  # every case, reordered
    assert out["b"]["ratio"] == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 6}
    assert out["a"]["s"]["median"] == 2.0 and out["a"]["rounds"] == [2.0] * 6
    order.clear()
    harness.interleaved(cases, rounds=6, seed=3)
    assert [tuple(order[i:i + 3]) for i in range(0, 18, 3)] == rounds  # the seed fixes the order


def test_interleaved_times_a_case_that_returns_none():
    out = harness.interleaved({"x": lambda: None}, rounds=2)
    assert out["x"]["s"]["n"] == 2 and out["x"]["s"]["min"] >= 0


@pytest.mark.parametrize("kw, msg", [({"rounds": 0}, "rounds must be >= 1"), ({"baseline": "nope"}, "baseline 'nope'")])
def test_interleaved_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        harness.interleaved({"x": lambda: 1.0}, **{"rounds": 1, **kw})


def test_record_names_a_repository_script_by_its_path(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "noise.py"), "--rounds", "3"])
    rec = harness.record("noise", {"x": 1})
    assert rec["command"] == "python benchmarks/noise.py --rounds 3"
    assert {"cpu", "isa", "cores", "threads", "load_avg", "versions"} <= set(rec["machine"])
    assert harness.save("noise", {"x": 1}, "-") is None  # --record -: no file
    path = harness.save("noise", {"x": 1}, str(tmp_path / "r.json"))
    assert json.loads(path.read_text())["figures"] == {"x": 1}


def _bench(script, *args, tmp_path):
    rec = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--record", str(rec)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # run as a file, from elsewhere
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(rec.read_text())


def test_noise_benchmark_writes_a_record_the_report_renders(tmp_path):
    rec = _bench("noise", "--rounds", "2", "--iters", "1", "--layer", "Embedding", "--ours-only", "--threads", "1",
                 tmp_path=tmp_path)
    assert rec["name"] == "noise" and rec["machine"]["threads"] == 1
    rows = {r["impl"]: r for r in rec["figures"]["rows"]}
    assert set(rows) == {"plain", "ours drop", "ours scalar int8", "ours scalar int4", "ours pq"}
    assert rows["plain"]["ratio"]["median"] == 1.0 and rows["ours pq"]["ratio"]["n"] == 2
    text = "\n".join(report.render_record(rec))
    assert "| Embedding(32000,512) | ours pq |" in text and "python benchmarks/noise.py --rounds 2" in text


def test_int_widths_benchmark_writes_a_record(tmp_path):
    rec = _bench("int_widths", "--shapes", "16x32", "--tokens", "1", "--repeats", "1", tmp_path=tmp_path)
    assert [r["bits"] for r in rec["figures"]["rows"]] == list(range(2, 9))
    assert all(r["ms"] > 0 for r in rec["figures"]["rows"])
