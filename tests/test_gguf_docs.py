"""docs/gguf.md: every Python block, run in order in one namespace (a fresh folder as working directory)."""
import pathlib
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "gguf.md"


def test_every_block_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "gguf_doc"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC}:block{i + 1}", "exec"), namespace)
    assert (tmp_path / "llama-q4_0.gguf").is_file() and (tmp_path / "llama-q4_0-compressed.gguf").is_file()
