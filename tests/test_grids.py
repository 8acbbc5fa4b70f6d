"""llama.cpp's Q4_0 / Q8_0 grids (quantnoise.grids), compared bit for bit with gguf-py's reference quantizers,
and the grid as a Quant-Noise scalar scheme (noise, QAT) and as a compression rule."""
import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quants  # noqa: E402

from quantnoise import LayerRule, QuantNoiseConfig, compress_, quantize_, save_qnz  # noqa: E402
from quantnoise import grids as G  # noqa: E402

QTYPE = {"q4_0": GGMLQuantizationType.Q4_0, "q8_0": GGMLQuantizationType.Q8_0}
FAKE = {"q4_0": G.q4_0_fake, "q8_0": G.q8_0_fake}


def reference(w: torch.Tensor, grid: str):
    """gguf-py's (bytes, dequantized fp32) of w."""
    packed = quants.quantize(w.numpy(), QTYPE[grid])
    return packed, torch.from_numpy(quants.dequantize(packed, QTYPE[grid]))


def hard_weights(out: int, n_in: int, seed: int) -> torch.Tensor:
    """Random rows over 9 decades of scale, plus the cases a rounding rule gets wrong: an all-zero block, an
    outlier, rows on the Q4_0 grid (ties of |w| with both signs) and rows of exact Q8_0 halves."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.logspace(-6, 3, out).unsqueeze(1)
    w[0, :32] = 0.0
    w[1, 5] = 1e4
    w[2::7] = torch.randint(-8, 8, w[2::7].shape, generator=g).float() * 0.25
    w[3::11] = torch.randint(-127, 128, w[3::11].shape, generator=g).float() * (0.5 / 127)
    return w


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
@pytest.mark.parametrize("shape", [(4, 32), (5, 96), (64, 256), (300, 64)])
def test_fake_and_bytes_equal_gguf_bitwise(grid, shape):
    w = hard_weights(*shape, seed=shape[0])
    packed, deq = reference(w, grid)
    assert torch.equal(FAKE[grid](w), deq)
    assert torch.equal(G.grid_fake(w, grid), deq)
    assert np.array_equal(G.grid_pack(w, grid).numpy(), packed)
    assert FAKE[grid](w).dtype == torch.float32


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_all_zero_blocks_stay_zero_and_grid_points_are_fixed(grid):
    w = torch.zeros(3, 64)
    assert torch.equal(FAKE[grid](w), w)
    once = FAKE[grid](hard_weights(16, 64, seed=1))
    assert torch.equal(FAKE[grid](once), once)  # the grid's values are on the grid


def test_q4_0_maps_the_signed_max_to_minus_8():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 3.0, -3.0  # a tie in |w|: the first entry decides the sign of d
    d, q = G.q4_0_quantize(w)
    assert float(d[0, 0]) == pytest.approx(-3.0 / 8) and int(q[0, 0]) == 0  # 3.0 -> code 0 = -8 * d
    assert torch.equal(G.q4_0_fake(w)[0, :2], torch.tensor([3.0, -2.625]))  # -3.0 clamps to code 15 = 7 * d


def test_fp16_input_equals_gguf_on_its_fp32_value():
    w = hard_weights(8, 64, seed=2).clamp(-60000, 60000).half()
    for grid in QTYPE:
        assert torch.equal(G.grid_fake(w, grid), reference(w.float(), grid)[1])


def test_real_weights_of_a_transformers_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
            for grid in QTYPE:
                packed, deq = reference(w, grid)
                assert torch.equal(G.grid_fake(w, grid), deq), (name, grid)
                assert np.array_equal(G.grid_pack(w, grid).numpy(), packed), (name, grid)


@pytest.mark.parametrize("shape", [(4, 48), (32,), (2, 3, 32)])
def test_shape_off_the_grid_is_one_line_error(shape):
    with pytest.raises(ValueError, match=r"multiple of 32") as e:
        G.q4_0_fake(torch.zeros(shape))
    assert "\n" not in str(e.value) and str(tuple(shape)) in str(e.value)


def test_codes_round_trip_and_reject_off_grid_values():
    w = hard_weights(6, 64, seed=3)
    for grid in QTYPE:
        q, scale = G.grid_codes(w, grid)
        assert scale.shape == (6 * 2, 1)
        assert torch.equal((q.float().reshape(-1, 32) * scale).reshape(w.shape), G.grid_fake(w, grid))
        d, codes = G.grid_from_codes(q, scale, grid)
        assert torch.equal(G.PACK[grid](d, codes), G.grid_pack(w, grid))
    with pytest.raises(ValueError, match="not fp16 values"):
        G.grid_from_codes(q, scale + 1e-7, "q8_0")
    with pytest.raises(ValueError, match=r"not q4_0 codes"):
        G.grid_from_codes(torch.full((1, 32), 9, dtype=torch.int8), torch.ones(1, 1), "q4_0")


# ------------------------------------------------------------------------------------------ config
def test_config_grid_sets_bits_and_rejects_what_contradicts_it():
    assert QuantNoiseConfig(scheme="scalar", grid="q4_0").bits == 4
    assert QuantNoiseConfig(scheme="scalar", grid="q8_0", bits=8).bits == 8
    assert QuantNoiseConfig(scheme="scalar").grid is None
    for kwargs, match in [(dict(scheme="scalar", grid="q5_0"), "choose one of q4_0, q8_0"),
                          (dict(scheme="pq", grid="q4_0"), "use scheme=scalar"),
                          (dict(scheme="scalar", grid="q4_0", bits=3), "use bits=4"),
                          (dict(scheme="scalar", grid="q8_0", bits=4), "use bits=8"),
                          (dict(scheme="scalar", grid="q4_0", clip="mse"), "clip=minmax"),
                          (dict(scheme="scalar", grid="q4_0", observer="ema"), "observer=minmax"),
                          (dict(scheme="scalar", grid="q4_0", granularity="tensor"), "granularity")]:
        with pytest.raises(ValueError, match=match) as e:
            QuantNoiseConfig(**kwargs)
        assert "grid=" in str(e.value) and "\n" not in str(e.value)


def test_layer_rule_grid():
    assert LayerRule(scheme="scalar", grid="q4_0").bits == 4
    for kwargs, match in [(dict(scheme="scalar", grid="int4"), "choose one"), (dict(scheme="pq", grid="q8_0"),
                          "scheme=scalar"), (dict(scheme="scalar", grid="q4_0", bits=2), "bits=4"),
                          (dict(scheme="scalar", grid="q4_0", rows_per_scale=4), "rows_per_scale=1")]:
        with pytest.raises(ValueError, match=match):
            LayerRule(**kwargs)


# -------------------------------------------------------------------------------------- noise / QAT
def model_of(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_p1_effective_weight_is_the_grid_and_gradients_pass_straight_through(grid):
    model, plain = model_of(), model_of()
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid=grid, p=1.0, block_size=8))
    x = torch.randn(5, 64)
    y = model(x)
    h = torch.relu(nn.functional.linear(x, FAKE[grid](plain[0].weight), plain[0].bias))
    ref = nn.functional.linear(h, FAKE[grid](plain[2].weight), plain[2].bias)
    assert torch.equal(y, ref)
    y.square().sum().backward()
    w0 = plain[0].weight.detach().clone().requires_grad_(True)
    w2 = plain[2].weight.detach().clone().requires_grad_(True)
    h = torch.relu(nn.functional.linear(x, w0 + (FAKE[grid](w0) - w0).detach(), plain[0].bias))
    nn.functional.linear(h, w2 + (FAKE[grid](w2) - w2).detach(), plain[2].bias).square().sum().backward()
    assert torch.equal(model[0].weight.grad, w0.grad) and model[0].weight.grad.abs().sum() > 0
    assert torch.equal(model[2].weight.grad, w2.grad)
    assert "grid=" + grid in repr(model)


def test_partial_noise_puts_the_selected_blocks_on_the_grid_and_keeps_the_rest():
    model = model_of()
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", p=0.5, block_size=4, seed=3))
    layer = model[0]
    w = layer.weight.detach()
    noisy = layer.noisy(layer.weight, 0.5).detach()
    on = layer.qn_mask.repeat_interleave(4, 1)  # (out, in): the selected blocks
    assert 0 < int(on.sum()) < on.numel()
    assert torch.equal(noisy[on], G.q4_0_fake(w)[on]) and torch.equal(noisy[~on], w[~on])


def effective_weight(model: nn.Module, n_in: int) -> torch.Tensor:
    """The weight a bias-free Linear computed with on this forward: eye @ W^T is W^T exactly."""
    return model(torch.eye(n_in)).t().detach()


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_training_forwards_put_only_a_fraction_p_of_the_blocks_on_the_grid(grid):
    """p < 1: each training forward puts a fresh Bernoulli(p) subset of the blocks on the grid (each whole
    block exactly on it), the rest exactly as trained; not the whole weight, as p = 1 (QAT) does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64, bias=False))
    w = model[0].weight.detach().clone()
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid=grid, p=0.25, block_size=8, seed=1))
    on_grid = G.grid_fake(w, grid).reshape(64, -1, 8)
    masks = []
    for _ in range(4):
        eff = effective_weight(model, 256).reshape(64, -1, 8)
        noised = (eff == on_grid).all(-1) & (eff != w.reshape(64, -1, 8)).any(-1)  # (64, 32) blocks
        kept = (eff == w.reshape(64, -1, 8)).all(-1)
        assert bool((noised | kept).all())  # every block whole: on the grid or untouched
        assert 0.2 < noised.float().mean().item() < 0.3  # 2048 blocks, p = 0.25 (4 sigma: +-0.04)
        masks.append(noised)
    assert not torch.equal(masks[0], masks[1])  # a new mask every forward
    model.eval()
    assert torch.equal(effective_weight(model, 256), w)  # eval without eval_quantized: the fp32 weight


def test_embedding_rows_get_a_fraction_p_of_their_blocks_on_the_grid():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(200, 64))
    table = emb[0].weight.detach().clone()
    quantize_(emb, QuantNoiseConfig(scheme="scalar", grid="q8_0", p=0.3, block_size=8, seed=2))
    out = emb(torch.arange(200)).detach().reshape(200, -1, 8)
    noised = (out == G.q8_0_fake(table).reshape(200, -1, 8)).all(-1) & (out != table.reshape(200, -1, 8)).any(-1)
    assert bool((noised | (out == table.reshape(200, -1, 8)).all(-1)).all())
    assert 0.25 < noised.float().mean().item() < 0.35  # 1600 blocks, p = 0.3


def test_a_layer_whose_rows_are_not_a_multiple_of_32_is_named():
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(ValueError, match=r"layer '0'.*not a multiple of 32"):
        quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", block_size=8))


# -------------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_compress_on_the_grid_decodes_to_the_fake_weight(grid, tmp_path):
    model = model_of()
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid=grid, p=0.5, block_size=8))
    w = model[0].weight.detach().clone()
    names = compress_(model, LayerRule(pattern=r"^0$", scheme="scalar", grid=grid))
    assert names == ["0"]
    assert torch.equal(model[0].weight, G.grid_fake(w, grid))
    assert model[0].qscale.shape == (32 * 2, 1)
    with pytest.raises(ValueError, match="save_gguf"):  # a .qnz stores one positive scale per row group
        save_qnz(model, tmp_path / "m.qnz")


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_a_compressed_layer_names_its_grid(grid):
    """A layer on a llama.cpp grid prints as that grid (not as quantnoise's int4 / int8), also when rebuilt from
    a state dict or tied to a compressed layer; quantnoise's own int layers keep their int<bits> name."""
    from quantnoise.compress.layers import empty_like_state, share_codebook
    model = model_of()
    compress_(model, LayerRule(pattern=r"^0$", scheme="scalar", grid=grid))
    compress_(model, LayerRule(pattern=r"^2$", scheme="scalar", bits=G.GRID_BITS[grid]))
    assert model[0].grid == grid and model[2].grid is None
    assert f", {grid}" in repr(model[0]) and f"int{G.GRID_BITS[grid]}" not in repr(model[0])
    assert f"int{G.GRID_BITS[grid]}" in repr(model[2])
    rebuilt = empty_like_state(nn.Linear(64, 32), model[0].state_dict(prefix="0."), "0.")
    rebuilt.load_state_dict(model[0].state_dict())
    assert rebuilt.grid == grid and f", {grid}" in repr(rebuilt)
    assert share_codebook(model[0], nn.Linear(64, 32)).grid == grid


def test_embedding_rows_on_the_grid_whatever_the_batch():
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(50, 64))
    table = emb[0].weight.detach().clone()
    quantize_(emb, QuantNoiseConfig(scheme="scalar", grid="q8_0", p=1.0, block_size=8))
    ids = torch.tensor([[3, 7, 3], [49, 0, 7]])
    assert torch.equal(emb(ids), G.q8_0_fake(table)[ids])  # only the looked-up rows are quantized, row by row
