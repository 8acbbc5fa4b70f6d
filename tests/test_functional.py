"""The pure algorithms against small hand-written references (exact where the math is exact)."""
import pytest
import torch

from quantnoise import functional as QF


def ref_symmetric_per_channel(w, bits):
    qmax = 2 ** (bits - 1) - 1
    s = w.abs().amax(dim=1, keepdim=True) / qmax
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


def ref_asymmetric_per_tensor(w, bits):
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    qmax = 2**bits - 1
    s = torch.tensor((hi - lo) / qmax, dtype=w.dtype)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(w / s) + z, 0, qmax) - z) * s


def test_fake_quantize_symmetric_channel_matches_reference():
    w = torch.randn(16, 32)
    lo, hi = QF.minmax(w, "channel", 0)
    s, z = QF.scalar_qparams(lo, hi, 8, True)
    got = QF.fake_quantize(w, s, z, -127, 127, "channel", 0)
    assert torch.equal(got, ref_symmetric_per_channel(w, 8))


def test_fake_quantize_asymmetric_tensor_matches_reference():
    w = torch.randn(8, 24) + 0.3
    lo, hi = QF.minmax(w, "tensor", 0)
    s, z = QF.scalar_qparams(lo, hi, 4, False)
    got = QF.fake_quantize(w, s, z, 0, 15, "tensor", 0)
    torch.testing.assert_close(got, ref_asymmetric_per_tensor(w, 4), rtol=0, atol=1e-6)
    assert got.unique().numel() <= 16


def test_group_granularity_has_one_scale_per_group():
    w = torch.randn(4, 64)
    w[:, :32] *= 100  # a large first group must not coarsen the second group's grid
    lo, hi = QF.minmax(w, "group", 32)
    assert lo.shape == (4, 2, 1)
    s, z = QF.scalar_qparams(lo, hi, 8, True)
    got = QF.fake_quantize(w, s, z, -127, 127, "group", 32)
    assert torch.equal(got[:, 32:], ref_symmetric_per_channel(w[:, 32:], 8))


def test_zero_is_exact_on_every_grid():
    w = torch.tensor([[0.0, 0.3, 0.9, 1.7]])
    for sym in (True, False):
        lo, hi = QF.minmax(w, "tensor", 0)
        s, z = QF.scalar_qparams(lo, hi, 4, sym)
        q = QF.fake_quantize(w, s, z, -7 if sym else 0, 7 if sym else 15, "tensor", 0)
        assert q[0, 0] == 0


def test_block_mask_rate_and_seed():
    g = torch.Generator().manual_seed(3)
    m = QF.block_mask(1000, 100, 0.2, g, "cpu")
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.2) < 0.01
    m2 = QF.block_mask(1000, 100, 0.2, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(m, m2)


def test_hashed_block_mask_rate_seed_and_row_independence():
    rows = torch.arange(4000)
    m = QF.hashed_block_mask(2**40 + 12345, rows, 64, 0.2)
    assert m.shape == (4000, 64) and m.dtype == torch.bool
    assert abs(m.float().mean().item() - 0.2) < 0.005
    assert abs(m.float().mean(0) - 0.2).max() < 0.03  # no block position is favoured
    assert abs(m.float().mean(1).std().item() / (0.2 * 0.8 / 64) ** 0.5 - 1) < 0.1  # rows vary as binomials do
    some = torch.tensor([3999, 7, 7, 1234])  # any subset, any order, repeats: the same rows' masks
    assert torch.equal(QF.hashed_block_mask(2**40 + 12345, some, 64, 0.2), m[some])
    other = QF.hashed_block_mask(2**40 + 12346, rows, 64, 0.2)  # a neighbouring seed: an unrelated mask
    assert abs((m & other).float().mean().item() - 0.04) < 0.005
    hi = QF.hashed_block_mask(12345, rows, 64, 0.2)  # seeds differing only in the high 32 bits differ too
    assert abs((m & hi).float().mean().item() - 0.04) < 0.005
    assert QF.hashed_block_mask(5, rows, 64, 1.0).all() and not QF.hashed_block_mask(5, rows, 64, 0.0).any()


def test_hashed_block_mask_is_splitmix64_of_seed_row_and_block():
    """Against SplitMix64 written with Python ints (pins the wrapping int64 arithmetic)."""
    u64 = (1 << 64) - 1

    def selected(seed, i, p):
        z = (seed + i * 0x9E3779B97F4A7C15) & u64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & u64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & u64
        z ^= z >> 31
        return (z + (1 << 63)) & u64 < round(p * 2.0**64)  # z read as a signed int64, below the p-quantile

    seed, rows, nb = 2**62 + 987654321, torch.tensor([0, 5, 31999, 2**40]), 8
    for p in (0.1, 0.5, 0.9):
        got = QF.hashed_block_mask(seed, rows, nb, p)
        want = [[selected(seed, r * nb + b, p) for b in range(nb)] for r in rows.tolist()]
        assert got.tolist() == want


def test_drop_blocks_zeroes_selected_and_rescales_rest():
    w = torch.randn(6, 8)
    mask = torch.tensor([[True, False]] * 3 + [[False, True]] * 3)
    out = QF.drop_blocks(w, (~mask).float() * (1 / 0.75), 4)
    b, wb = QF.blocks(out, 4), QF.blocks(w, 4)
    assert (b[mask] == 0).all()
    assert torch.equal(b[~mask], wb[~mask] * (1 / 0.75))


def test_nearest_centroid_matches_brute_force():
    x, c = torch.randn(5000, 8), torch.randn(64, 8)
    want = torch.cdist(x, c).argmin(1)
    got = QF.nearest_centroid(x, c, chunk=777)
    # ties aside, the chosen centroid is at the minimal distance
    d = torch.cdist(x, c)
    assert torch.allclose(d.gather(1, got[:, None]), d.gather(1, want[:, None]), atol=1e-5)


def test_pq_blocks_replace_only_selected_with_centroids():
    w, c = torch.randn(10, 16), torch.randn(32, 4)
    mask = torch.rand(10, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    codes = QF.nearest_centroid(QF.blocks(w, 4).reshape(-1, 4), c).to(torch.uint8)
    out = QF.blocks(QF.pq_blocks(w, mask, c, codes, 4), 4)
    assert torch.equal(out[mask], c[codes.view(10, 4)[mask].long()])
    assert torch.equal(out[~mask], QF.blocks(w, 4)[~mask])
    sel = out[mask]
    assert (sel[:, None, :] == c[None]).all(-1).any(-1).all()  # every selected block is a centroid


def test_straight_through_forward_exact_backward_identity():
    w = torch.randn(3, 4, requires_grad=True)
    noisy = torch.round(w.detach() * 3) / 3
    out = QF.straight_through(w, noisy)
    assert torch.equal(out, noisy)
    (out * torch.arange(12.0).view(3, 4)).sum().backward()
    assert torch.equal(w.grad, torch.arange(12.0).view(3, 4))


def test_scalar_blocks_equal_whole_tensor_fake_quantization_on_selected_blocks():
    w = torch.randn(6, 48)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    for gran, gs in [("tensor", 0), ("channel", 0), ("group", 12)]:  # groups of 12 straddle blocks of 8
        lo, hi = QF.minmax(w, gran, gs)
        s, z = QF.scalar_qparams(lo, hi, 4, False)
        full = QF.fake_quantize(w, s, z, 0, 15, gran, gs)
        out = QF.blocks(QF.scalar_blocks(w, mask, s, z, 0, 15, gran, gs, 8), 8)
        assert torch.equal(out[mask], QF.blocks(full, 8)[mask]), gran
        assert torch.equal(out[~mask], QF.blocks(w, 8)[~mask]), gran


def test_drop_factors_rate_values_and_seed():
    f = QF.drop_factors(500, 64, 0.25, torch.Generator().manual_seed(2), "cpu", torch.float32)
    assert set(f.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((f == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(f, QF.drop_factors(500, 64, 0.25, torch.Generator().manual_seed(2), "cpu", torch.float32))


def _mse(w, bits, clip):
    from quantnoise.compress.layers import scalar_decode, scalar_quantize

    q, s = scalar_quantize(w, bits, clip=clip)
    return float((scalar_decode(q, s, w.shape) - w).pow(2).mean())


@pytest.mark.parametrize("bits,factor", [(2, 0.5), (3, 0.7)])
def test_mse_clip_cuts_the_error_of_min_max_on_gaussian_weights(bits, factor):
    """The clipped scale beats min-max by far at 2 bits (min-max int2 is ternary at max|w|) and clearly at 3."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    assert _mse(w, bits, "mse") < factor * _mse(w, bits, "minmax")


def test_mse_clip_is_the_best_ratio_of_the_grid_and_deterministic():
    """Per row: the a = r * max|w| of the 20 ratios with the least squared error (a brute-force reference);
    the same weights give the same bits every call; a row's result does not depend on the other rows."""
    w = torch.randn(12, 300, generator=torch.Generator().manual_seed(1))
    a = QF.mse_clip(w, 2)
    assert a.shape == (12, 1) and torch.equal(a, QF.mse_clip(w.clone(), 2))
    assert torch.equal(QF.mse_clip(w[5:9], 2), a[5:9])
    assert torch.equal(QF.mse_clip(w, 2, chunk=300 * 5), a)  # row chunks change nothing
    for i in range(12):
        errs = []
        for r in QF.CLIP_RATIOS:
            s = w[i].abs().max() * r
            errs.append(float(((w[i] / s).round().clamp(-1, 1) * s - w[i]).pow(2).sum()))
        best = min(range(len(errs)), key=lambda j: (errs[j], -j))  # ties: the larger ratio
        assert abs(float(a[i, 0]) - float(w[i].abs().max() * QF.CLIP_RATIOS[best])) <= 1e-6
    assert float(a.max()) <= float(w.abs().amax(1).max())
    assert torch.equal(QF.mse_clip(torch.zeros(3, 8), 3), torch.zeros(3, 1))  # all-zero rows stay 0 (no NaN)


def test_mse_clip_qnz_round_trip_is_exact(tmp_path):
    """compress_ with clip=mse, written to a .qnz and read back, decodes to the fake quantizer's weights exactly."""
    from quantnoise import MixedPrecisionConfig, compress_, quantize_, save_qnz
    from quantnoise.export import decode, read_qnz

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 8))
    cfg = MixedPrecisionConfig.from_plan({"0": {"bits": 2, "rows_per_scale": 4}, "1": 3}, clip="mse")
    quantize_(m, cfg)
    m.eval()
    with torch.no_grad():
        fake = {n: m.get_submodule(n).noisy(m.get_submodule(n).weight, 1.0) for n in ("0", "1")}
    compress_(m, cfg.to_ipq_plan())
    save_qnz(m, tmp_path / "m.qnz")
    state = decode(*read_qnz(tmp_path / "m.qnz"))
    for n in ("0", "1"):
        torch.testing.assert_close(state[f"{n}.weight"], fake[n], atol=0, rtol=0)


def test_clip_config_is_checked():
    from quantnoise import QuantNoiseConfig
    from quantnoise.compress.layers import LayerRule

    assert QuantNoiseConfig(scheme="scalar", bits=2, clip="mse").clip == "mse"
    with pytest.raises(ValueError, match="clip"):
        QuantNoiseConfig(scheme="scalar", clip="l2")
    with pytest.raises(ValueError, match="clip"):
        QuantNoiseConfig(scheme="scalar", clip="mse", observer="ema")
    with pytest.raises(ValueError, match="clip"):
        QuantNoiseConfig(scheme="scalar", clip="mse", symmetric=False)
    with pytest.raises(ValueError, match="clip"):
        LayerRule(scheme="scalar", clip="max")
