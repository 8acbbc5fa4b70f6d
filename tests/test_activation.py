"""Activation fake quantization of QNLinear (Q8BERT): the EMA observer, the frozen eval range and the
straight-through gradient, each against a hand-written reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantnoise import QNLinear, QuantNoiseConfig, quantize_
from quantnoise import functional as QF


def qlinear(**kw):
    torch.manual_seed(0)
    base = dict(scheme="scalar", p=0.0, block_size=4, act_bits=8, act_ema_momentum=0.25)
    lin = nn.Linear(16, 8)
    return lin, QNLinear.from_float(copy.deepcopy(lin), QuantNoiseConfig(**{**base, **kw}), "fc")


def ref_sym(x, a, bits=8):
    """round-to-nearest on the symmetric grid of [-a, a], written out."""
    qmax = 2 ** (bits - 1) - 1
    s = a / qmax
    return torch.clamp(torch.round(x / s), -qmax, qmax) * s


def ref_absmax(x, granularity):
    """max|x| per scale: whole tensor, each row of x.reshape(-1, in) (token), each input feature (channel)."""
    rows = x.reshape(-1, x.shape[-1]).abs()
    return {"tensor": rows.max(), "token": rows.amax(1, keepdim=True).reshape(*x.shape[:-1], 1),
            "channel": rows.amax(0)}[granularity]


def test_ema_update_then_use_in_training():
    lin, qn = qlinear()
    x1, x2 = torch.randn(4, 16), 3 * torch.randn(4, 16)
    qn.train()
    y1 = qn(x1)
    a1 = x1.abs().max()
    assert torch.equal(qn.qn_act_hi, a1) and torch.equal(qn.qn_act_lo, -a1)  # first batch sets the range
    assert torch.equal(y1, F.linear(ref_sym(x1, a1), lin.weight, lin.bias))
    y2 = qn(x2)
    a2 = a1 + 0.25 * (x2.abs().max() - a1)  # EMA: the newest batch weighs act_ema_momentum
    torch.testing.assert_close(qn.qn_act_hi, a2, rtol=0, atol=1e-6)
    assert torch.equal(y2, F.linear(ref_sym(x2, qn.qn_act_hi), lin.weight, lin.bias))  # updated range, then used


def test_range_frozen_in_eval_and_values_clamped():
    lin, qn = qlinear()
    qn.train()
    qn(torch.randn(4, 16))
    hi = qn.qn_act_hi.clone()
    qn.eval()
    x = 10 * torch.randn(4, 16)  # far outside the trained range
    y = qn(x)
    assert torch.equal(qn.qn_act_hi, hi)
    assert torch.equal(y, F.linear(ref_sym(x, hi), lin.weight, lin.bias))
    assert ref_sym(x, hi).abs().max() <= hi + 1e-6


def test_eval_without_a_trained_range_uses_the_batch_range_and_sets_nothing():
    lin, qn = qlinear()
    qn.eval()
    x = torch.randn(3, 16)
    assert torch.equal(qn(x), F.linear(ref_sym(x, x.abs().max()), lin.weight, lin.bias))
    assert qn.qn_act_hi is None


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
def test_straight_through_gradient(granularity):
    lin, qn = qlinear(act_granularity=granularity)
    qn.train()
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 8)
    qn(x).backward(g)
    xq = ref_sym(x.detach(), ref_absmax(x.detach(), granularity))
    assert torch.equal(x.grad, g @ lin.weight.detach())  # d xq / d x = identity (STE)
    torch.testing.assert_close(qn.weight.grad, g.t() @ xq, rtol=0, atol=0)


@pytest.mark.parametrize("granularity,expected", [
    ("token", [[4 / 3, -8 / 3, 0.0, 4.0], [0.1, 0.2, -0.3, 0.0]]),  # rows: max|x| 4 and 0.3, 3-bit grid
    ("channel", [[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, -1 / 3, 0.0]]),  # columns: max|x| 1, 2, 0.5, 4
])
def test_token_and_channel_grids_by_hand(granularity, expected):
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.1, 0.2, -0.3, 0.0]])
    lo, hi = QF.activation_range(x, True, granularity)
    torch.testing.assert_close(QF.fake_quantize_activation(x, lo, hi, 3, True), torch.tensor(expected),
                               rtol=0, atol=1e-6)


def test_token_scales_are_per_row_of_the_flattened_input_and_never_stored():
    lin, qn = qlinear(act_granularity="token")
    x = torch.randn(2, 3, 16) * torch.arange(1.0, 4.0).view(1, 3, 1)  # (B, T, in): rows of different size
    for training in (True, False):  # dynamic: the same in training and eval
        qn.train(training)
        assert torch.equal(qn(x), F.linear(ref_sym(x, ref_absmax(x, "token")), lin.weight, lin.bias))
    assert qn.qn_act_lo is None and qn.qn_act_hi is None


def test_channel_ema_per_input_feature_then_frozen_in_eval():
    lin, qn = qlinear(act_granularity="channel")
    x1, x2 = torch.randn(2, 3, 16), 3 * torch.randn(4, 16)
    qn.train()
    y1 = qn(x1)
    a1 = ref_absmax(x1, "channel")  # (16,): over the 6 rows of x1
    assert qn.qn_act_hi.shape == (16,) and torch.equal(qn.qn_act_hi, a1) and torch.equal(qn.qn_act_lo, -a1)
    assert torch.equal(y1, F.linear(ref_sym(x1, a1), lin.weight, lin.bias))
    qn(x2)
    a2 = a1 + 0.25 * (ref_absmax(x2, "channel") - a1)
    torch.testing.assert_close(qn.qn_act_hi, a2, rtol=0, atol=1e-6)
    hi = qn.qn_act_hi.clone()
    qn.eval()
    x = 10 * torch.randn(4, 16)  # far outside the trained ranges: clamped to them
    assert torch.equal(qn(x), F.linear(ref_sym(x, hi), lin.weight, lin.bias))
    assert torch.equal(qn.qn_act_hi, hi)


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_asymmetric_per_token_and_per_channel(granularity):
    lin, qn = qlinear(act_symmetric=False, act_bits=4, act_granularity=granularity)
    qn.train()
    x = torch.rand(6, 16) * 2 - 0.5
    dim = 1 if granularity == "token" else 0
    lo, hi = x.amin(dim, keepdim=True).clamp(max=0), x.amax(dim, keepdim=True).clamp(min=0)  # the grid holds 0
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    torch.testing.assert_close(qn(x), F.linear(xq, lin.weight, lin.bias), rtol=0, atol=1e-6)


def test_asymmetric_grid_uses_ema_min_max_and_zero_point():
    lin, qn = qlinear(act_symmetric=False, act_bits=4)
    qn.train()
    x = torch.rand(6, 16) * 2 - 0.5
    y = qn(x)
    lo, hi = x.min(), x.max()
    assert torch.equal(qn.qn_act_lo, lo) and torch.equal(qn.qn_act_hi, hi)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    xq = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    assert torch.equal(y, F.linear(xq, lin.weight, lin.bias))


def test_combined_with_weight_noise_p1():
    lin, qn = qlinear(p=1.0, bits=8, granularity="tensor")
    qn.train()
    x = torch.randn(4, 16)
    w = lin.weight.detach()
    assert torch.equal(qn(x), F.linear(ref_sym(x, x.abs().max()), ref_sym(w, w.abs().max()), lin.bias))


def test_state_dict_keys_unchanged_and_no_act_quant_without_act_bits():
    lin, qn = qlinear()
    assert set(qn.state_dict()) == set(lin.state_dict())
    _, plain = qlinear(act_bits=None)
    x = torch.randn(2, 16)
    assert torch.equal(plain(x), lin(x))


@pytest.mark.parametrize("field,value", [("act_bits", 1), ("act_bits", 17), ("act_bits", 8.0), ("act_bits", True),
                                         ("act_ema_momentum", 0.0), ("act_ema_momentum", 1.5),
                                         ("act_granularity", "group"), ("act_granularity", "row")])
def test_bad_activation_settings(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        QuantNoiseConfig(**{field: value})


def test_act_bits_on_a_model_without_linear_layers_is_an_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Conv1d(8, 8, 1))
    with pytest.raises(ValueError, match="act_bits=8.*Linear.*include none"):
        quantize_(model, QuantNoiseConfig(scheme="scalar", p=1.0, block_size=1, act_bits=8))


@pytest.mark.parametrize("granularity", ["tensor", "token", "channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_quantization_keeps_half_precision_dtype_and_matches_fp32(dtype, granularity):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    x[1], x[:, 3] = 0.0, 0.0  # an all-zero token and channel: a positive fp32 scale, not 0 / 0
    outs = {}
    for dt in (torch.float32, dtype):
        m = nn.Sequential(copy.deepcopy(base).to(dt))
        quantize_(m, QuantNoiseConfig(scheme="scalar", p=0.0, bits=8, block_size=8, act_bits=8,
                                      act_granularity=granularity))
        m.train()
        y = m(x.to(dt))
        assert y.dtype == dt and torch.isfinite(y).all()
        outs[dt] = y.float()
    torch.testing.assert_close(outs[dtype], outs[torch.float32], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_trained_ranges_are_saved_and_loaded(granularity):
    """issue 22 item 5: the EMA ranges were non-persistent, so a reloaded model evaluated with per-batch ranges."""
    lin, qn = qlinear(act_granularity=granularity)
    qn.train()
    for s in (1.0, 3.0, 0.5):
        qn(s * torch.randn(8, 16))
    qn.eval()
    x = 4 * torch.randn(5, 16)
    want = qn(x)
    state = qn.state_dict()
    assert torch.equal(state["qn_act_hi"], qn.qn_act_hi) and torch.equal(state["qn_act_lo"], qn.qn_act_lo)
    _, fresh = qlinear(act_granularity=granularity)  # never run: no range yet
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh.qn_act_hi, qn.qn_act_hi) and fresh.qn_act_hi.data_ptr() != qn.qn_act_hi.data_ptr()
    assert torch.equal(fresh(x), want)
    torch.save(state, buf := __import__("io").BytesIO())  # and through a file, weights_only
    buf.seek(0)
    _, again = qlinear(act_granularity=granularity)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(again.eval()(x), want)


def test_a_state_dict_without_ranges_loads_with_a_warning():
    """A checkpoint written before the ranges were saved (no qn_act_* keys) loads strictly into a layer that has
    ranges; the layer then has none (per-batch ranges in eval, as that checkpoint was evaluated)."""
    lin, qn = qlinear()
    qn.train()
    qn(torch.randn(4, 16))
    old = {k: v for k, v in qn.state_dict().items() if not k.startswith("qn_act")}
    with pytest.warns(UserWarning, match="no activation ranges"):
        qn.load_state_dict(old)
    assert qn.qn_act_lo is None and qn.qn_act_hi is None
    x = torch.randn(3, 16)
    assert torch.equal(qn.eval()(x), F.linear(ref_sym(x, x.abs().max()), lin.weight, lin.bias))


def test_export_leaves_activation_ranges_out():
    """The ranges are training state of the fake quantization: a .qnz (run by fbgemm / the stock layers) holds
    none, so it still fits the plain architecture."""
    from quantnoise import export

    _, qn = qlinear()
    qn.train()
    qn(torch.randn(4, 16))
    tensors, meta = export.encode({f"fc.{k}": v for k, v in qn.state_dict().items()}, {}, export.ExportOptions())
    assert sorted(meta["dense"]) == ["fc.bias", "fc.weight"] and sorted(tensors) == ["fc.bias", "fc.weight"]
