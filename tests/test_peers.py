"""benchmarks/peers.py end to end at its --quick size: the rows that need nothing optional (fp32, quantnoise int8 /
int4 / pq) measured and recorded, a peer that is not installed named in its row; with the peers installed (`make
peers`) their rows too."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CORE = ["fp32", "quantnoise int8", "quantnoise int4", "quantnoise pq"]


def bench(tmp_path, *cases, extra=()):
    rec = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), str(tmp_path / "work"), "--quick",
                        "--cases", *cases, *extra, "--record", str(rec)],
                       capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(rec.read_text()), r.stdout


PEERS = {"torchao int8": "torchao", "quanto int8": "optimum.quanto", "quanto int4": "optimum.quanto",
         "llama.cpp q8_0": "llama_cpp", "llama.cpp q4_0": "llama_cpp"}


def installed(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
def test_quick_run_records_the_core_rows(tmp_path):
    absent = [case for case, mod in PEERS.items() if not installed(mod)][:1]  # a row that only says so
    rec, out = bench(tmp_path, *CORE, *absent)
    rows = {r["case"]: r for r in rec["figures"]["rows"]}
    assert list(rows) == CORE + absent
    for case in CORE:
        t1 = rows[case]["t1"]
        assert t1["gen_tok_s"] > 0 and t1["prefill_tok_s"] > 0 and t1["gen_s"]["n"] == 1
        assert rows[case]["bytes"] > 0 and rows[case]["rss"]["after_load"] > 0
    assert rows["fp32"]["t1"]["gen_vs_fp32"] == 1.0
    assert rows["quantnoise int4"]["bytes"] < rows["quantnoise int8"]["bytes"] < rows["fp32"]["bytes"] / 2
    for case in absent:
        assert rows[case]["note"] == f"not installed ({PEERS[case]})" and f"| {case} | not installed (" in out
    assert rec["figures"]["config"]["quick"] and rec["name"] == "peers"
    assert "| quantnoise pq |" in out


@pytest.mark.peers
@pytest.mark.skipif(not all(installed(m) for m in PEERS.values()),
                    reason="the peers are not all importable (llama_cpp, torchao, optimum.quanto): `make peers` "
                           "installs them and runs this")
def test_quick_run_measures_the_peers(tmp_path):
    rec, out = bench(tmp_path, "fp32", *PEERS)
    rows = {r["case"]: r for r in rec["figures"]["rows"]}
    for case in PEERS:
        assert "note" not in rows[case], rows[case]
        assert rows[case]["t1"]["gen_tok_s"] > 0 and rows[case]["rss"]["after_load"] > 0
    assert rows["llama.cpp q4_0"]["bytes"] < rows["llama.cpp q8_0"]["bytes"]
