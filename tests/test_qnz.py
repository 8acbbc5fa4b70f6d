"""quantnoise.save_qnz / load_qnz: the .qnz of any module tree, loaded on meta into runtime layers."""
import copy

import pytest
import torch
from torch import nn

from quantnoise import IPQPlan, LayerRule, compress_, load_qnz, save_qnz
from quantnoise.export import ExportOptions
from quantnoise.runtime import CodesEmbedding, CodesLinear, IntLinear, RuntimeMixin

from test_api import TinyBert


def close(a, b, rel):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def compressed_bert(seed=0, int8_out=True):
    torch.manual_seed(seed)
    model = TinyBert()
    model.head.weight = model.word.weight  # tied
    plan = IPQPlan(stages=[LayerRule(pattern=r"fc[12]|^word$", block_size=8, n_centroids=16),
                           LayerRule(pattern=r"query|key|value", block_size=4, n_centroids=16),
                           LayerRule(pattern=r"out", **(dict(scheme="scalar", bits=8) if int8_out else {}))])
    compress_(model, plan)
    return model.eval()


def test_save_load_runs_compressed_on_meta_and_matches(tmp_path, caplog):
    model = compressed_bert()
    ids = torch.randint(0, 64, (2, 8))
    meta = save_qnz(model, tmp_path / "m.qnz", ExportOptions(rest_dtype="float32"))
    assert meta["aliases"] == {"head.weight": "word"}  # one codebook stored once
    with torch.device("meta"):
        fresh = TinyBert()
    fresh.head.weight = fresh.word.weight
    with caplog.at_level("WARNING"):
        out = load_qnz(tmp_path / "m.qnz", fresh)
    assert out is fresh and not fresh.training and "decoding" not in caplog.text
    assert isinstance(fresh.word, CodesEmbedding) and isinstance(fresh.head, CodesLinear)
    assert fresh.head.codes.data_ptr() == fresh.word.codes.data_ptr()  # the tied copy computes from the same codes
    assert isinstance(fresh.layers[0]["query"], CodesLinear) and isinstance(fresh.layers[1]["out"], IntLinear)
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    with torch.no_grad():  # int8 layers quantize their input activations on the fly (fbgemm): not exact
        assert close(fresh(ids), model(ids), 2e-2)
    assert sum(isinstance(m, RuntimeMixin) for m in fresh.modules()) == 2 + 2 * 6
    pq = compressed_bert(int8_out=False)
    save_qnz(pq, tmp_path / "pq.qnz")
    with torch.device("meta"):
        fresh = TinyBert()
    with torch.no_grad():  # fp16 centroids and fp16 dense tensors in the file
        assert close(load_qnz(tmp_path / "pq.qnz", fresh)(ids), pq(ids), 1e-3)


def test_fp32_centroids_are_stored_exactly_and_load_in_the_runtime(tmp_path):
    model = compressed_bert(int8_out=False)
    save_qnz(model, tmp_path / "c32.qnz", ExportOptions(rest_dtype="float32", centroids_dtype="float32"))
    with torch.device("meta"):
        fresh = TinyBert()
    fresh.head.weight = fresh.word.weight
    load_qnz(tmp_path / "c32.qnz", fresh)
    for name, m in model.named_modules():
        if hasattr(m, "centroids"):  # the runtime layer holds the model's codebook bit for bit, not an fp16 rounding
            got = fresh.get_submodule(name)
            assert isinstance(got, RuntimeMixin) and torch.equal(got.centroids, m.centroids.detach()), name
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert close(fresh(ids), model(ids), 1e-5)
    with pytest.raises(ValueError, match="centroids dtype 'float64' is invalid: choose float16, float32 or int8"):
        ExportOptions(centroids_dtype="float64")


def test_a_plain_model_round_trips_exactly_in_fp32(tmp_path):
    torch.manual_seed(1)
    model = TinyBert().eval()
    save_qnz(model, tmp_path / "p.qnz", ExportOptions(rest_dtype="float32"))
    fresh = load_qnz(tmp_path / "p.qnz", TinyBert())  # built on CPU: works too
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_file_of_another_model_is_one_line_error_and_changes_nothing(tmp_path):
    save_qnz(compressed_bert(), tmp_path / "m.qnz")
    with torch.device("meta"):
        other = TinyBert(layers=3)
    with pytest.raises(ValueError, match=r"does not fit the model: 16 of the model's tensors are not in the file "
                                         r"\(layers\.2\.fc1\.bias") as e:
        load_qnz(tmp_path / "m.qnz", other)
    assert "\n" not in str(e.value) and isinstance(other.layers[0]["fc1"], nn.Linear)
    with torch.device("meta"):
        wide = TinyBert(d=48)
    with pytest.raises(ValueError, match=r"34 shapes differ \(layers\.0\.fc1\.weight \[128, 32\] in the file, \[192, 48\] in the model"):
        load_qnz(tmp_path / "m.qnz", wide)
    with torch.device("meta"):
        fewer = nn.Sequential()
    with pytest.raises(ValueError, match=r"0 of the model's tensors are not in the file \(-\)"):
        load_qnz(tmp_path / "m.qnz", fewer)


def test_non_persistent_buffers_on_meta_are_named(tmp_path):
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("table", torch.arange(8.0), persistent=False)

    save_qnz(WithTable(), tmp_path / "t.qnz")
    with torch.device("meta"):
        fresh = WithTable()
    with pytest.raises(ValueError, match="non-persistent buffers table are on the meta device"):
        load_qnz(tmp_path / "t.qnz", fresh)


def test_runtime_load_qnz_is_renamed_load_fairseq():
    from quantnoise import runtime

    assert hasattr(runtime, "load_fairseq") and not hasattr(runtime, "load_qnz")
