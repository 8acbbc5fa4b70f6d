"""docs/hf.md: every Python block, run in order in one namespace (a fresh folder as working directory)."""
import pathlib
import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_doc_has_the_whole_path():
    text = "\n".join(blocks())
    for step in ("quantize_(gpt2", "tf.Trainer(", "compress_(gpt2", "gpt2.save_pretrained(", "hf.save_pretrained(",
                 "hf.from_pretrained(", "AutoModelForCausalLM.from_pretrained(", ".generate(", "LlamaForCausalLM",
                 "QuantNoiseCallback(plan=", "scheme=\"scalar\", bits=4", "QuantNoiseHfConfig(", "torch_dtype=",
                 'format="aqlm"'):
        assert step in text, step


@pytest.mark.slow
def test_every_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "hf_doc"}
    for i, code in enumerate(blocks()):
        exec(compile(code, f"{DOC}:block{i + 1}", "exec"), namespace)
    assert (tmp_path / "gpt2-pq" / "model.safetensors").is_file() and (tmp_path / "llama-pq" / "config.json").is_file()
    assert '"quant_method": "aqlm"' in (tmp_path / "llama-aqlm" / "config.json").read_text()
