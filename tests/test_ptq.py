"""Post-training baselines: PyTorch dynamic int8, and static calibration against hand references."""
import pytest
import torch
from torch import nn

from quantnoise import QNLinear, QuantNoiseConfig
from quantnoise import ptq


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()


def run(model, x):
    return model(x)


def test_dynamic_int8_uses_pytorch_int8_kernels_and_stays_close():
    model = mlp()
    dq = ptq.dynamic_int8(model)
    assert type(dq[0]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(model[0]) is nn.Linear  # the original is left alone
    x = torch.randn(8, 16)
    torch.testing.assert_close(dq(x), model(x), rtol=0, atol=0.05)


@pytest.mark.parametrize("fn", ["dynamic", "static"])
def test_model_without_linear_is_one_clear_error(fn):
    model = nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU())
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        if fn == "dynamic":
            ptq.dynamic_int8(model)
        else:
            ptq.static_int8(model, [torch.randn(1, 4, 3)], run)


def test_minmax_calibration_is_the_extreme_over_batches():
    model = mlp()
    xs = [torch.randn(5, 16), 4 * torch.randn(5, 16)]
    cfg = QuantNoiseConfig(scheme="scalar", act_bits=8)
    r = ptq.calibrate(model, xs, run, cfg, "minmax")
    a = max(x.abs().max() for x in xs)
    assert torch.equal(r["0"][1], a) and torch.equal(r["0"][0], -a)
    h = model[1](model[0](xs[1]))
    assert torch.equal(r["2"][1], torch.maximum(model[1](model[0](xs[0])).abs().max(), h.abs().max()))


def test_percentile_calibration_is_the_mean_of_per_batch_percentiles():
    model = mlp()
    xs = [torch.randn(10, 16), torch.randn(10, 16)]
    r = ptq.calibrate(model, xs, run, QuantNoiseConfig(act_bits=8), "percentile", 90.0)
    ref = torch.stack([x.abs().flatten().sort().values[round(0.9 * 160) - 1] for x in xs]).mean()
    assert torch.equal(r["0"][1], ref)


def test_static_int8_freezes_calibrated_ranges_and_matches_reference():
    model = mlp()
    xs = [torch.randn(6, 16) for _ in range(3)]
    q = ptq.static_int8(model, xs, run, QuantNoiseConfig(scheme="scalar", p=1.0, bits=8, eval_quantized=True,
                                                        block_size=8, act_bits=8))
    assert isinstance(q[0], QNLinear) and not q.training and type(model[0]) is nn.Linear
    a = max(x.abs().max() for x in xs)
    assert torch.equal(q[0].qn_act_hi, a)
    x = 3 * torch.randn(2, 16)
    s = a / 127
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    w = model[0].weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 127
    ref = nn.functional.linear(xq, torch.clamp(torch.round(w / sw), -127, 127) * sw, model[0].bias)
    assert torch.equal(q[0](x), ref)


def test_bad_calibration_settings():
    with pytest.raises(ValueError, match="method 'mean'"):
        ptq.calibrate(mlp(), [torch.randn(2, 16)], run, QuantNoiseConfig(act_bits=8), "mean")
    with pytest.raises(ValueError, match="got no batch"):
        ptq.calibrate(mlp(), [], run, QuantNoiseConfig(act_bits=8))
    with pytest.raises(ValueError, match="act_bits"):
        ptq.static_int8(mlp(), [torch.randn(2, 16)], run, QuantNoiseConfig(scheme="scalar"))


def test_channel_calibration_is_per_input_feature():
    model = mlp()
    xs = [torch.randn(5, 16), 4 * torch.randn(3, 2, 16)]
    cfg = QuantNoiseConfig(act_bits=8, act_granularity="channel")
    r = ptq.calibrate(model, xs, run, cfg, "minmax")
    a = torch.maximum(xs[0].abs().amax(0), xs[1].abs().amax((0, 1)))  # (16,): extreme over batches and rows
    assert torch.equal(r["0"][1], a) and torch.equal(r["0"][0], -a)
    r = ptq.calibrate(model, xs[:1], run, cfg, "percentile", 80.0)
    assert torch.equal(r["0"][1], xs[0].abs().sort(0).values[3])  # 4th of 5 values per column


def test_static_int8_channel_and_token_match_references():
    model = mlp()
    xs = [torch.randn(6, 16) for _ in range(2)]
    base = dict(scheme="scalar", p=1.0, bits=8, eval_quantized=True, block_size=8, act_bits=8)
    x = 3 * torch.randn(2, 16)
    w = model[0].weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 127
    wq = torch.clamp(torch.round(w / sw), -127, 127) * sw
    for gran, a in (("channel", torch.maximum(*(x_.abs().amax(0) for x_ in xs))), ("token", x.abs().amax(1, keepdim=True))):
        q = ptq.static_int8(model, xs, run, QuantNoiseConfig(**base, act_granularity=gran))
        assert (q[0].qn_act_hi is None) == (gran == "token")  # per-token scales are never calibrated
        s = a / 127
        xq = torch.clamp(torch.round(x / s), -127, 127) * s
        assert torch.equal(q[0](x), nn.functional.linear(xq, wq, model[0].bias))
