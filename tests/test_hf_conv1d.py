"""GPT-2's Conv1D noised, compressed and run compressed like a Linear of W.T, each equal to a reference."""
import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from quantnoise import LayerRule, QuantNoiseConfig, compress_, load_qnz, quantize_, save_qnz, unquantize_  # noqa: E402
from quantnoise.compress.layers import scalar_decode, scalar_quantize  # noqa: E402
from quantnoise.export import ExportOptions, load_state_dict  # noqa: E402
from quantnoise.hf.conv1d import CodesConv1D, IntConv1D, PQConv1D, QNConv1D, ScalarConv1D  # noqa: E402


def conv(nf=12, nx=16, seed=0):
    torch.manual_seed(seed)
    c = Conv1D(nf, nx)
    nn.init.normal_(c.bias)
    return c


def reference(c: Conv1D, weight):
    """The plain Conv1D with ``weight`` (in, out)."""
    ref = copy.deepcopy(c)
    ref.weight = nn.Parameter(weight.detach().clone())
    return ref


def linear_of(c: Conv1D) -> nn.Linear:
    """The nn.Linear that computes what ``c`` does (weight W.T, same bias), with its own Parameters."""
    lin = nn.Linear(*c.weight.shape)
    lin.weight, lin.bias = nn.Parameter(c.weight.detach().t().clone()), nn.Parameter(c.bias.detach().clone())
    return lin


def test_noise_wrapper_is_the_linear_wrapper_on_w_transposed():
    c = conv()
    lin = linear_of(c)
    cfg = QuantNoiseConfig(scheme="pq", p=0.5, block_size=4, n_centroids=8, seed=1)
    model_c, model_l = nn.Sequential(c), nn.Sequential(lin)
    assert quantize_(model_c, cfg) == ["0"] and quantize_(model_l, cfg) == ["0"]
    qc, ql = model_c[0], model_l[0]
    assert isinstance(qc, QNConv1D) and isinstance(qc, Conv1D) and qc.weight is c.weight  # same Parameters
    x = torch.randn(2, 5, 16)
    yc, yl = qc(x), ql(x)  # training: the same blocks (of W.T) noised with the same codebook
    torch.testing.assert_close(yc, yl)
    yc.sum().backward()
    yl.sum().backward()
    torch.testing.assert_close(c.weight.grad, lin.weight.grad.t())  # straight-through to the (in, out) Parameter
    qc.eval()
    assert torch.equal(qc(x), reference(c, c.weight)(x))  # eval without eval_quantized: the plain layer
    unquantize_(model_c)
    assert type(model_c[0]) is Conv1D and model_c[0].weight is c.weight


def test_pq_and_int_layers_decode_w_transposed_and_train_centroids():
    c = conv()
    x = torch.randn(3, 16)
    model = nn.Sequential(copy.deepcopy(c))
    compress_(model, LayerRule(block_size=4, n_centroids=8))
    pq = model[0]
    assert isinstance(pq, PQConv1D) and pq.codes.numel() == 12 * 16 // 4
    assert pq.weight.shape == (16, 12)
    assert torch.equal(pq.weight, pq.centroids[pq.codes.long()].reshape(12, 16).t())  # blocks along input features
    assert torch.equal(pq(x), reference(c, pq.weight)(x))
    pq(x).pow(2).sum().backward()
    assert pq.centroids.grad is not None and pq.centroids.grad.abs().sum() > 0
    model = nn.Sequential(copy.deepcopy(c))
    compress_(model, LayerRule(scheme="scalar", bits=8))
    sc = model[0]
    q, scale = scalar_quantize(c.weight.detach().t(), 8)  # one scale per output feature
    assert isinstance(sc, ScalarConv1D) and torch.equal(sc.qweight, q)
    assert torch.equal(sc.weight, scalar_decode(q, scale, (12, 16)).t())
    assert torch.equal(sc(x), reference(c, sc.weight)(x))
    assert isinstance(sc.to_float(), Conv1D) and torch.equal(sc.to_float().weight, sc.weight)


@pytest.mark.parametrize("scheme", ["pq", "scalar"])
def test_runtime_layer_equals_the_decoded_conv1d(tmp_path, scheme):
    c = conv(nf=24, nx=32)
    model = nn.Sequential(copy.deepcopy(c))
    compress_(model, LayerRule(scheme=scheme, block_size=8, n_centroids=16, bits=8))
    meta = save_qnz(model, tmp_path / "c.qnz", ExportOptions(rest_dtype="float32"))
    assert meta["layers"]["0"]["transposed"] is True and meta["layers"]["0"]["shape"] == [24, 32]
    decoded = load_state_dict(tmp_path / "c.qnz")
    assert decoded["0.weight"].shape == (32, 24)  # the ordinary state dict of the plain Conv1D
    with torch.device("meta"):
        fresh = nn.Sequential(Conv1D(24, 32))
    load_qnz(tmp_path / "c.qnz", fresh)
    rt = fresh[0]
    assert isinstance(rt, CodesConv1D if scheme == "pq" else IntConv1D) and (rt.nf, rt.nx) == (24, 32)
    ref = reference(c, decoded["0.weight"])
    ref.bias = nn.Parameter(decoded["0.bias"])
    assert torch.equal(rt.weight, ref.weight)
    for tokens in (1, 4, 200):  # look-up table and decode + matmul kernels
        x = torch.randn(tokens, 32)
        with torch.no_grad():
            y, want = rt(x), ref(x)
        tol = 1e-5 if scheme == "pq" else 2e-2 * float(want.abs().max())  # int8: activations quantized on the fly
        torch.testing.assert_close(y, want, rtol=1e-4, atol=tol)
    with torch.device("meta"):
        linear = nn.Sequential(nn.Linear(32, 24))
    with pytest.raises(ValueError, match=r"0\.weight \[32, 24\] in the file, \[24, 32\] in the model"):
        load_qnz(tmp_path / "c.qnz", linear)


def test_activation_quantization_as_for_a_linear():
    c = conv()
    lin = linear_of(c)
    cfg = QuantNoiseConfig(scheme="scalar", p=0.3, block_size=4, bits=8, act_bits=8)
    model_c, model_l = nn.Sequential(c), nn.Sequential(lin)
    quantize_(model_c, cfg)  # a Conv1D alone is enough for act_bits
    quantize_(model_l, cfg)
    x = torch.randn(2, 5, 16)
    for train in (True, False):
        model_c.train(train), model_l.train(train)
        torch.testing.assert_close(model_c(x), model_l(x))
    assert model_c[0].qn_act_lo is not None
