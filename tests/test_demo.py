"""recipes/demo.sh (`make demo`) end to end at the tests' tiny size: the recipe's noise fine-tune on the default
corpus, `quantnoise inspect`, and the table (method, test perplexity, file size, ratio to fp32) it prints."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import BIN, ROOT


@pytest.mark.slow
def test_demo_prints_the_noise_finetune_table(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "BIN": str(BIN), "WORK": str(work), "SIZE": "tiny", "BASE": "10", "N": "4",
           "NOISE": "pq_p0.5", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    ft = json.loads((work / "lm" / "results.json").read_text())["finetune"]
    assert ft["updates"] == 4 and ft["noise"] == "pq_p0.5" and ft["baseline"]["updates"] == 10
    assert (work / "data-bin" / "dict.txt").is_file()  # configs/lm_tiny.yaml reads runs/demo/data-bin
    assert "quantnoise.qnz v2" in out  # `quantnoise inspect` of the noise model's file
    rows = re.findall(r"^(fp32 \(trained.*|iPQ of it.*|iPQ of the Quant-Noise.*?)\s+([0-9.]+)\s+(\d+)\s+([0-9.]+)x$",
                      out, re.M)
    assert len(rows) == 3, out[-2000:]
    for (_, ppl, size, ratio), key in zip(rows, ("fp32", "ipq_plain", "ipq_qn")):
        assert float(ppl) == pytest.approx(ft[key]["ppl"], abs=0.005)
        assert int(size) == ft[key]["bytes"] == (work / "lm" / "qnz" / f"ft.{key}.qnz").stat().st_size
        assert float(ratio) == pytest.approx(ft["fp32"]["bytes"] / ft[key]["bytes"], abs=0.05)
    assert float(rows[1][3]) > 5  # iPQ: the file is several times smaller than fp32's
    assert re.search(r"iPQ perplexity gap to the fp32 model: plain [+-][0-9.]+, Quant-Noise fine-tune [+-][0-9.]+: cut by", out)
