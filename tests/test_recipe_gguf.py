"""recipes/gguf/q4_0.py at its --tiny size: the three arms (Q4_0 post hoc, Quant-Noise on the q4_0 grid, QAT) trained in
the Trainer, written as GGUF, TEST perplexity in PyTorch on the grid and (with llama-cpp-python) in llama.cpp."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run

pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.mark.slow
@pytest.mark.peers  # runs without llama-cpp-python too (its column is then None); `make peers` runs it with it
def test_tiny_recipe_records_three_arms(tmp_path):
    run([sys.executable, ROOT / "scripts" / "make_corpus.py", tmp_path / "txt", "--max-lines", "300"])
    txt, rec = tmp_path / "txt", tmp_path / "rec.json"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "gguf" / "q4_0.py"), txt / "train.txt",
                        txt / "valid.txt", txt / "test.txt", tmp_path / "out", "--tiny", "--record", str(rec)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["arm"]: row for row in json.loads(rec.read_text())["figures"]["rows"]}
    assert list(rows) == ["q4_0 post hoc", "quant-noise q4_0", "QAT q4_0"]
    for row in rows.values():
        assert 1 < row["fp32_ppl"] < 1e4 and 1 < row["q4_0_torch_ppl"] < 1e4 and row["gguf_bytes"] > 0
        if importlib.util.find_spec("llama_cpp") is None:
            assert row["q4_0_llama_cpp_ppl"] is None
        else:  # llama.cpp's Q8_0 activations move the perplexity by well under 1% (tests/test_hf_gguf_llama_cpp.py)
            assert row["q4_0_llama_cpp_ppl"] == pytest.approx(row["q4_0_torch_ppl"], rel=1e-2)
    assert "| quant-noise q4_0 |" in r.stdout
