"""recipes/demo.sh (`make demo`) end to end at the tests' tiny size: the recipe's noise fine-tune over seeds on the
default corpus, `quantnoise inspect`, and what it prints: each seed's cut, the mean with its interval, the machine."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import BIN, ROOT


@pytest.mark.slow
def test_demo_prints_each_seed_and_the_spread(tmp_path):
    work = tmp_path / "demo"
    record = tmp_path / "results" / "demo.json"
    env = {**os.environ, "BIN": str(BIN), "WORK": str(work), "SIZE": "tiny", "BASE": "10", "N": "4", "SEEDS": "2",
           "NOISE": "pq_p0.5", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "RECORD": str(record)}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    rec = json.loads(record.read_text())
    ft = rec["figures"]["finetune"]
    assert rec["name"] == "demo" and rec["figures"] == json.loads((work / "lm" / "results.json").read_text())
    assert ft["updates"] == 4 and ft["noise"] == "pq_p0.5" and ft["baseline"]["cap"] == 10 and ft["baseline"]["auto"]
    assert (work / "data-bin" / "dict.txt").is_file()  # configs/lm_tiny.yaml reads runs/demo/data-bin
    assert "quantnoise.qnz v2" in out  # `quantnoise inspect` of the noise model's file
    rows = re.findall(r"^\s+(\d) +([0-9.]+) \((plain|base best)\) +([0-9.]+) +([0-9.]+) +(\S+)$", out, re.M)
    assert len(rows) == 2, out[-2000:]
    for (seed, ref, _, plain, qn, cut), e in zip(rows, ft["seeds"]):
        assert int(seed) == e["seed"] and float(ref) == pytest.approx(e["reference"]["ppl"], abs=0.005)
        assert float(plain) == pytest.approx(e["ipq_plain"]["ppl"], abs=0.005)
        assert float(qn) == pytest.approx(e["ipq_qn"]["ppl"], abs=0.005)
        assert cut == ("regularisation" if e["regularised"] else "n/a" if e["gap_cut"] is None else f"{100 * e['gap_cut']:.0f}%")
    assert f"iPQ perplexity gap to the fp32 reference: {ft['verdict']}" in out
    m = re.search(r"^files: fp32 (\d+) bytes, iPQ (\d+) \(([0-9.]+)x smaller\)", out, re.M)
    assert m and int(m.group(1)) == ft["fp32"]["bytes"] and int(m.group(2)) == ft["ipq_plain"]["bytes"]
    assert float(m.group(3)) > 5  # iPQ: the file is several times smaller than fp32's
    assert re.search(r"^machine: .+, (avx512|avx2|avx|sse4_2|\w+), \d+ cores, 1 thread\(s\) per process, torch ", out, re.M)
