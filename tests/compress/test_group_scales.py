"""Group-wise int-N scales (Q-BERT): one scale per group of consecutive output rows (an attention
head's rows, or sub-groups of them), through ipq, the .qnz container and the runtime layers."""
import copy

import pytest
import torch
from torch import nn

from quantnoise import export, runtime
from quantnoise.compress.layers import LayerRule, compress_module, scalar_decode, scalar_quantize
from quantnoise.compress.plan import IPQPlan, quantize_state_dict


def test_scale_per_row_group_exact_reference():
    w = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    q, scale = scalar_quantize(w, 4, rows_per_scale=4)  # 3 groups ("heads") of 4 rows
    assert q.shape == (12, 5) and scale.shape == (3, 1)
    ref = w.reshape(3, -1).abs().amax(1, keepdim=True) / 7  # symmetric int4: qmax 7
    assert torch.equal(scale, ref)
    assert torch.equal(q, torch.round(w / ref.repeat_interleave(4, 0)).to(torch.int8))
    assert (scalar_decode(q, scale, w.shape) - w).abs().max() <= ref.max() / 2 + 1e-7
    q1, s1 = scalar_quantize(w, 4)  # default: one scale per row, as before
    assert s1.shape == (12, 1) and torch.equal(s1, w.abs().amax(1, keepdim=True) / 7)
    assert scalar_quantize(w, 4, rows_per_scale=12)[1].shape == (1, 1)  # per tensor
    q0, s0 = scalar_quantize(w, 4, rows_per_scale=0)  # 0: per tensor, whatever the row count
    assert torch.equal(s0, w.abs().max().reshape(1, 1) / 7) and torch.equal(q0, scalar_quantize(w, 4, rows_per_scale=12)[0])
    with pytest.raises(ValueError, match="0 = per tensor"):
        scalar_quantize(w, 4, rows_per_scale=5)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.Linear(16, 4))


def test_group_scales_round_trip_through_qnz_exactly(tmp_path):
    m = model()
    plan = IPQPlan(stages=[LayerRule(pattern="^1$", scheme="scalar", bits=3, rows_per_scale=4),  # 4 heads of 4
                           LayerRule(pattern="^0$", scheme="scalar", bits=4, rows_per_scale=5),
                           LayerRule(pattern="^2$", scheme="scalar", bits=2)])
    state, names = quantize_state_dict(m.state_dict(), plan)
    assert [tuple(state[f"{n}.qscale"].shape) for n in names] == [(2, 1), (4, 1), (4, 1)]
    meta = export.save_state_dict(tmp_path / "m.qnz", state)
    assert meta["layers"]["1"]["rows_per_scale"] == 4 and meta["layers"]["0"]["rows_per_scale"] == 5
    assert "rows_per_scale" not in meta["layers"]["2"]  # per row: the map of files written before
    back = export.load_state_dict(tmp_path / "m.qnz")  # read_qnz runs check_map
    for n in names:
        ref = scalar_decode(state[f"{n}.qweight"], state[f"{n}.qscale"], state[f"{n}.weight_size"].tolist())
        assert torch.equal(back[f"{n}.weight"], ref)
    # the compressed layer of quantnoise.compress.layers decodes the same weight
    layer = compress_module(m[1], plan.stages[0], "1")
    assert torch.equal(layer.weight, back["1.weight"])
    # the runtime (compressed kernels read from the file) computes what the decoded model computes
    tensors, meta = export.read_qnz(tmp_path / "m.qnz")
    fast = runtime.fill_model_(copy.deepcopy(m).to("meta"), tensors, meta)
    ref_model = copy.deepcopy(m)
    ref_model.load_state_dict(back)
    x = torch.tensor([[1, 2, 3], [4, 5, 9]])
    assert torch.allclose(fast(x), ref_model(x), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda meta, t: meta["layers"]["1"].update(rows_per_scale=3), "rows_per_scale 3, which does not divide"),
    (lambda meta, t: meta["layers"]["1"].update(rows_per_scale=2), "has shape \\[4, 1\\], the map implies \\[8, 1\\]"),
    (lambda meta, t: meta["layers"]["1"].pop("rows_per_scale"), "the map implies \\[16, 1\\]"),
])
def test_check_map_rejects_scales_that_do_not_match_the_groups(change, message):
    state, _ = quantize_state_dict(model().state_dict(), IPQPlan(stages=[
        LayerRule(pattern="^1$", scheme="scalar", bits=4, rows_per_scale=4)]))
    tensors, meta = export.encode(state, {}, export.ExportOptions())
    export.check_map(tensors, meta)
    change(meta, tensors)
    with pytest.raises(ValueError, match=message) as e:
        export.check_map(tensors, meta)
    assert "\n" not in str(e.value)


def test_bad_rows_per_scale_is_one_error():
    with pytest.raises(ValueError, match="rows_per_scale=3 does not divide its 16 output rows"):
        scalar_quantize(torch.randn(16, 4), 4, name="layer 'q'", rows_per_scale=3)
    with pytest.raises(ValueError, match="rows_per_scale=-1 .* is invalid"):
        LayerRule(scheme="scalar", rows_per_scale=-1)
