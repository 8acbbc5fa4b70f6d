"""Half precision (issue 12): every scheme on every wrapper and every compressed layer gives, in
fp16 and bf16, the fp32 result computed on the same values, rounded to the dtype (saturated at
its largest finite value), and never NaN/inf from finite weights.  Hard rows: all zero, constant,
near fp16's max (65504), fp16 denormals."""
import copy

import pytest
import torch
from torch import nn

from quantnoise import QuantNoiseConfig, quantize_
from quantnoise import functional as QF
from quantnoise.compress import layers as ipq
from quantnoise.nn import wrapper_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEMES = [dict(scheme="drop", p=0.5), dict(scheme="scalar", bits=8), dict(scheme="scalar", bits=4, symmetric=False),
           dict(scheme="scalar", bits=8, granularity="tensor"), dict(scheme="pq", n_centroids=8)]
KINDS = ["linear", "embedding", "conv1d", "conv2d", "mha"]
FP16_MAX = torch.finfo(torch.float16).max  # 65504
FP16_DENORMAL = torch.finfo(torch.float16).smallest_normal / 8  # 7.6e-6


def tol(dtype):
    """One rounding to ``dtype`` of the fp32 result: relative eps, absolute the smallest subnormal."""
    fi = torch.finfo(dtype)
    return dict(rtol=fi.eps, atol=fi.smallest_normal * fi.eps)


def hard_rows(n_rows: int, row: int, huge: bool) -> torch.Tensor:
    """Weight rows: all zero, constant, fp16 denormals, mixed signs, [near fp16's max], random."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_rows, row, generator=g) * 0.1
    w[0] = 0.0
    w[1] = 0.25
    w[2] = FP16_DENORMAL * torch.randint(-7, 8, (row,), generator=g)
    w[3, ::2] = 0.0
    if huge:
        w[4] = FP16_MAX * (1 - torch.rand(row, generator=g) * 0.1) * torch.sign(torch.randn(row, generator=g))
        w[5] = -FP16_MAX
    return w


def layer(kind: str):
    return {"linear": lambda: nn.Linear(16, 12), "embedding": lambda: nn.Embedding(12, 16, padding_idx=0),
            "conv1d": lambda: nn.Conv1d(4, 12, 4), "conv2d": lambda: nn.Conv2d(1, 12, (4, 4)),
            "mha": lambda: nn.MultiheadAttention(16, 2, batch_first=True)}[kind]()


def with_weight(kind: str, w: torch.Tensor, dtype) -> nn.Module:
    m = layer(kind)
    with torch.no_grad():
        target = m.in_proj_weight if kind == "mha" else m.weight
        target.copy_(w.reshape(-1, 16)[: target.shape[0]].reshape(target.shape)
                     if kind != "mha" else w.repeat(4, 1)[: target.shape[0]])
    return m.to(dtype)


def wrapped(m: nn.Module, scheme: dict, name: str = "layer"):
    return wrapper_for(m).from_float(copy.deepcopy(m), QuantNoiseConfig(**{"p": 0.5, "block_size": 4, "seed": 3,
                                                                          **scheme}), name)


def saturate(x: torch.Tensor, dtype) -> torch.Tensor:
    big = torch.finfo(dtype).max
    return x.clamp(-big, big)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noisy_weight_matches_fp32_reference(kind, scheme, dtype):
    w = hard_rows(12, 16, huge=True)
    low = wrapped(with_weight(kind, w, dtype), scheme).train()
    ref = wrapped(with_weight(kind, w, dtype).float(), scheme).train()  # fp32, the same (rounded) values
    for _ in range(3):  # successive steps: fresh masks (and, for pq, the first codebook)
        out = low.noisy(low.weight, low.qn_cfg.p)
        expected = ref.noisy(ref.weight, ref.qn_cfg.p)
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), f"non-finite noisy weight in {dtype}"
        torch.testing.assert_close(out.float(), saturate(expected, dtype), **tol(dtype))
        if scheme["scheme"] != "pq":  # an all-zero row stays exactly zero (it was NaN in fp16)
            assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_are_finite(kind, scheme, dtype):
    m = wrapped(with_weight(kind, hard_rows(12, 16, huge=False), dtype), {**scheme, "p": 1.0 if scheme["scheme"] != "drop"
                                                                         else 0.5}).train()
    x = {"linear": torch.randn(3, 16), "embedding": torch.tensor([[0, 1, 2, 3, 0]]), "conv1d": torch.randn(2, 4, 9),
         "conv2d": torch.randn(2, 1, 6, 6), "mha": torch.randn(2, 5, 16)}[kind]
    x = x.to(dtype) if x.is_floating_point() else x
    out = m(x, x, x)[0] if kind == "mha" else m(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(m.weight.grad).all()


def test_issue_snippet_fp16_embedding_with_padding_row_is_finite():
    m = nn.Sequential(nn.Embedding(10, 16, padding_idx=1)).half()
    quantize_(m, QuantNoiseConfig(scheme="scalar", p=1.0, bits=8, block_size=8))
    m.train()
    out = m(torch.tensor([[1, 2, 3, 1]]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0], torch.zeros(16, dtype=torch.float16))  # the padding row stays zero


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_qparams_are_fp32_and_positive(dtype):
    lo = torch.tensor([0.0, -FP16_DENORMAL, -FP16_MAX, 1.0]).to(dtype).reshape(4, 1, 1)
    hi = torch.tensor([0.0, FP16_DENORMAL, FP16_MAX, 1.0]).to(dtype).reshape(4, 1, 1)
    for sym in (True, False):
        scale, zero = QF.scalar_qparams(lo, hi, 8, sym)
        assert scale.dtype == torch.float32 and (scale > 0).all() and torch.isfinite(zero).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_nearest_centroid_in_half_does_not_overflow(dtype):
    c = torch.tensor([[FP16_MAX * 0.99, FP16_MAX * 0.99], [1000.0, 1000.0], [0.0, 0.0]])
    x = torch.tensor([[FP16_MAX * 0.98, FP16_MAX * 0.97], [900.0, 1100.0], [1.0, -1.0]])
    assert QF.nearest_centroid(x.to(dtype), c.to(dtype)).tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- compressed layers
@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
@pytest.mark.parametrize("rule", [dict(scheme="pq", n_centroids=8, block_size=4), dict(scheme="scalar", bits=8),
                                  dict(scheme="scalar", bits=4)], ids=lambda r: f"{r['scheme']}{r.get('bits', '')}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compressed_layer_matches_fp32_reference(kind, rule, dtype):
    w = hard_rows(12, 16, huge=True)
    low = ipq.compress_module(with_weight(kind, w, dtype), ipq.LayerRule(**rule), "layer", seed=1)
    ref = ipq.compress_module(with_weight(kind, w, dtype).float(), ipq.LayerRule(**rule), "layer", seed=1)
    assert low.weight.dtype == dtype and torch.isfinite(low.weight).all()
    torch.testing.assert_close(low.weight.float(), saturate(ref.weight.detach(), dtype), **tol(dtype))
    small = ipq.compress_module(with_weight(kind, hard_rows(12, 16, huge=False), dtype), ipq.LayerRule(**rule), "l")
    x = {"linear": torch.randn(3, 16), "embedding": torch.tensor([[0, 1, 2]]), "conv1d": torch.randn(2, 4, 9),
         "conv2d": torch.randn(2, 1, 6, 6)}[kind]
    out = small(x.to(dtype) if x.is_floating_point() else x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if rule["scheme"] == "pq":
        out.float().sum().backward()
        assert small.centroids.grad.dtype == dtype and torch.isfinite(small.centroids.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_scalar_layer_follows_model_dtype_and_keeps_fp32_scales(dtype):
    w = hard_rows(12, 16, huge=False)
    q = ipq.compress_module(nn.Linear(16, 12).requires_grad_(False), ipq.LayerRule(scheme="scalar"), "l")
    ref = ipq.compress_module(with_weight("linear", w, torch.float32), ipq.LayerRule(scheme="scalar"), "l")
    q.load_state_dict(ref.state_dict())
    q.to(dtype)  # what fairseq's trainer does to the whole model with --fp16 / --bf16
    assert q.weight.dtype == dtype and q.qscale.dtype == torch.float32
    torch.testing.assert_close(q.weight.float(), ref.weight, **tol(dtype))  # tiny-row scales not underflowed
    assert q.state_dict()["qscale"].dtype == torch.float32


def test_pq_centroid_gradient_counts_above_fp16_max():
    """Issue 13.6: a centroid holding more than 65504 blocks still gets the mean of their gradients."""
    n = 70_000
    codes = torch.zeros(n, dtype=torch.uint8)
    codes[:10] = 1
    centroids = torch.zeros(2, 2, dtype=torch.float16, requires_grad=True)
    w = ipq.pq_weight(centroids, codes, (n, 2))
    w.backward(torch.full((n, 2), 0.5, dtype=torch.float16))
    assert centroids.grad.dtype == torch.float16
    torch.testing.assert_close(centroids.grad, torch.full((2, 2), 0.5, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adopted_compressed_layers_follow_a_half_model(dtype):
    """Issue 13.8: layers built from a state dict take the model's dtype (and device)."""
    src = nn.Sequential(nn.Linear(16, 8), nn.Embedding(10, 16))
    torch.manual_seed(0)
    state = {}
    for i, scheme in ((0, "pq"), (1, "scalar")):
        new = ipq.compress_module(src[i], ipq.LayerRule(scheme=scheme, n_centroids=4, block_size=4), str(i))
        state.update({f"{i}.{k}": v for k, v in new.state_dict().items()})
    model = nn.Sequential(nn.Linear(16, 8), nn.Embedding(10, 16)).to(dtype)
    assert ipq.adopt_state_structure_(model, state) == ["0", "1"]
    model.load_state_dict(state)
    assert model[0].centroids.dtype == dtype and model[0].weight.dtype == dtype
    assert model[1].weight.dtype == dtype and model[1].qscale.dtype == torch.float32
    x = torch.randn(2, 16, dtype=dtype)
    assert model[0](x).dtype == dtype and model[1](torch.tensor([1, 2])).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_adopted_compressed_layers_follow_a_cuda_model(dtype):
    src = nn.Linear(16, 8)
    new = ipq.compress_module(src, ipq.LayerRule(scheme="pq", n_centroids=4, block_size=4), "0")
    state = {f"0.{k}": v for k, v in new.state_dict().items()}
    model = nn.Sequential(nn.Linear(16, 8)).to("cuda", dtype)
    ipq.adopt_state_structure_(model, state)
    model.load_state_dict(state)
    assert model[0].centroids.device.type == "cuda" and model[0].codes.device.type == "cuda"
    assert model[0](torch.randn(2, 16, device="cuda", dtype=dtype)).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noisy_weight_on_cuda_matches_cpu_fp32(scheme, dtype):
    w = hard_rows(12, 16, huge=True)
    gpu = wrapped(with_weight("linear", w, dtype).cuda(), scheme).train()
    ref = wrapped(with_weight("linear", w, dtype).float(), scheme).train()
    out, expected = gpu.noisy(gpu.weight, gpu.qn_cfg.p), ref.noisy(ref.weight, ref.qn_cfg.p)
    assert torch.isfinite(out).all()
    if scheme["scheme"] != "drop":  # the CUDA generator draws other masks: compare the fully noised case
        full = wrapped(with_weight("linear", w, dtype).cuda(), {**scheme, "p": 1.0}).train()
        fref = wrapped(with_weight("linear", w, dtype).float(), {**scheme, "p": 1.0}).train()
        torch.testing.assert_close(full.noisy(full.weight, 1.0).float().cpu(),
                                   saturate(fref.noisy(fref.weight, 1.0), dtype), **tol(dtype))


# ------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("scheme", SCHEMES[:2] + SCHEMES[-1:], ids=lambda s: s["scheme"])
def test_non_finite_weight_is_one_error_naming_layer_and_step(scheme):
    m = wrapped(nn.Linear(16, 12), scheme, name="decoder.fc1").train()
    m(torch.randn(2, 16))
    with torch.no_grad():
        m.weight[3, 5] = float("inf")
    m.qn_step = 2000  # a check step (the next after the first forward; pq: a codebook refresh)
    with pytest.raises(FloatingPointError, match=r"layer 'decoder.fc1' .*1 NaN/inf .* at step 2000"):
        m(torch.randn(2, 16))


def test_quantizing_non_finite_weights_names_the_layer():
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    for rule in (ipq.LayerRule(scheme="scalar"), ipq.LayerRule(scheme="pq", n_centroids=4)):
        with pytest.raises(ValueError, match="layer 'dec.fc'.*NaN or inf"):
            ipq.compress_module(lin, rule, "dec.fc")


# ---------------------------------------------------------------------------------- .qnz export
def test_qnz_export_refuses_values_beyond_fp16_instead_of_storing_inf(tmp_path):
    from quantnoise.export import ExportOptions, load_qnz, save_qnz

    lin = nn.Linear(16, 8)
    state = {f"fc.{k}": v for k, v in ipq.compress_module(lin, ipq.LayerRule(n_centroids=4, block_size=4), "fc")
             .state_dict().items()}
    state["norm.weight"] = torch.tensor([1.0, 7e4])
    with pytest.raises(ValueError, match=r"norm.weight: values up to 70000 exceed fp16's range .*--rest float32"):
        save_qnz(tmp_path / "m.qnz", state, {}, ExportOptions())
    assert not (tmp_path / "m.qnz").exists()
    save_qnz(tmp_path / "m.qnz", state, {}, ExportOptions(rest_dtype="float32"))
    model_state, _ = load_qnz(tmp_path / "m.qnz")
    assert torch.equal(model_state["norm.weight"], state["norm.weight"])
    state["norm.weight"] = torch.tensor([1.0, 2.0]).half()  # an fp16 checkpoint exports as it is
    save_qnz(tmp_path / "h.qnz", state, {}, ExportOptions())
    assert load_qnz(tmp_path / "h.qnz")[0]["norm.weight"].dtype == torch.float16


@pytest.mark.parametrize("scheme", SCHEMES + [dict(scheme="scalar", granularity="tensor", observer="ema")],
                         ids=lambda s: "-".join(map(str, s.values())))
def test_layer_cast_to_half_between_steps_keeps_working(scheme):
    """Observer / codebook / mask state made in fp32, then model.half() (fairseq casts after building)."""
    m = wrapped(nn.Linear(16, 12), scheme).train()
    x = torch.randn(3, 16)
    m(x)
    m.half()
    out = m(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    if scheme.get("observer") == "ema":
        assert m.qn_lo.dtype == torch.float32
