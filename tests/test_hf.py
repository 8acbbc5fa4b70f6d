"""quantnoise.hf: TSV data checks, batching, and the Hugging Face model's .qnz round trip."""
import copy

import pytest
import torch
from torch import nn

from quantnoise import hf
from quantnoise.export import ExportOptions, load_state_dict, save_state_dict
from quantnoise.compress.layers import LayerRule, compress_module, set_submodule
from quantnoise.presets import Q8BERT_LAYERS


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_tsv(tmp_path):
    ys, xs = hf.read_tsv(write(tmp_path / "t.tsv", "pos\tgood film\n\nneg\tbad\tfilm\n"))
    assert ys == ["pos", "neg"] and xs == ["good film", "bad\tfilm"]


@pytest.mark.parametrize("text,labels,match", [
    ("pos\tgood\nno tab here\n", None, r"t.tsv:2: no tab in 'no tab here'"),
    ("pos\tgood\nmaybe\tfine\n", ["pos", "neg"], r"t.tsv:2: label 'maybe' does not occur in the training file"),
    ("", None, "t.tsv is empty"),
    ("\n\n", None, "t.tsv is empty"),
    ("\tno label\n", None, "empty label or text"),
])
def test_bad_tsv_is_one_clear_error(tmp_path, text, labels, match):
    with pytest.raises(ValueError, match=match):
        hf.read_tsv(write(tmp_path / "t.tsv", text), labels)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hf.read_tsv(tmp_path / "nope.tsv")


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("transformers")
    return hf.load_tokenizer()


def test_batches_pad_mask_and_keep_every_line_once(tok):
    texts = ["a", "a much longer sentence than the first one", "mid length text", "b c"]
    bs = hf.batches(tok, texts, [0, 1, 2, 0], batch_size=3, max_len=8, seed=0)
    assert sorted(torch.cat([b["index"] for b in bs]).tolist()) == [0, 1, 2, 3]
    for b in bs:
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 8
        assert torch.equal(b["input_ids"] != 0, b["attention_mask"].bool())
        assert b["labels"].tolist() == [[0, 1, 2, 0][i] for i in b["index"].tolist()]


def test_mean_pool_excludes_padding():
    h = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(hf.mean_pool(h, torch.tensor([[1, 1, 0]])), h[:, :2].mean(1))


def int8(model):
    model = copy.deepcopy(model)
    rule = LayerRule(pattern=Q8BERT_LAYERS, scheme="scalar", bits=8)
    for name, m in list(model.named_modules()):
        if name and isinstance(m, (nn.Linear, nn.Embedding)) and rule.matches(name):
            set_submodule(model, name, compress_module(m, rule, name))
    return model


def test_hf_bert_qnz_round_trip_identical_outputs(tmp_path, tok):
    model = hf.load_classifier(3, seed=0).eval()
    batch = hf.batches(tok, ["a real sentence.", "and another, longer one here"], [0, 1], 2, 16)[0]
    for name, m in (("fp32", model), ("int8", int8(model))):
        path = tmp_path / f"{name}.qnz"
        save_state_dict(path, m.state_dict(), ExportOptions(rest_dtype="float32"))
        fresh = hf.load_classifier(3, seed=1).eval()  # a different head: everything must come from the file
        fresh.load_state_dict(load_state_dict(path))
        assert torch.equal(hf.forward(fresh, batch).logits, hf.forward(m, batch).logits), name
    assert (tmp_path / "int8.qnz").stat().st_size < 0.3 * (tmp_path / "fp32.qnz").stat().st_size


def test_loading_changes_no_process_wide_state(monkeypatch):
    """issue 22 item 14: loading set HF_HUB_OFFLINE and transformers' verbosity for the whole process."""
    import os

    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        hf.load_tokenizer()
        hf.load_encoder()
        assert "HF_HUB_OFFLINE" not in os.environ
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
    finally:
        transformers.logging.set_verbosity(level)
