import pytest
import torch
from torch import nn

from quantnoise.compress import layers as ipq
from quantnoise.compress.plan import IPQPlan, load_plan, quantize_state_dict


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_codes_dtype_is_the_fewest_bytes():
    assert ipq.codes_dtype(256) == torch.uint8
    assert ipq.codes_dtype(257) == torch.int16
    assert ipq.codes_dtype(2**15) == torch.int16
    assert ipq.codes_dtype(2**15 + 1) == torch.int32


def test_pq_quantize_is_seeded_and_decodes_to_nearest_centroids():
    w = torch.randn(64, 32, generator=gen())
    c1, k1 = ipq.pq_quantize(w, 8, 16, seed=3)
    c2, k2 = ipq.pq_quantize(w, 8, 16, seed=3)
    assert torch.equal(c1, c2) and torch.equal(k1, k2) and c1.dtype == torch.uint8 and k1.shape == (16, 8)
    blocks = w.reshape(-1, 8)
    d = torch.cdist(blocks, k1)
    assert torch.allclose(d.gather(1, c1.long()[:, None]).squeeze(1), d.min(1).values, atol=1e-5)
    with pytest.raises(ValueError, match="block_size=5 does not divide its row length 32"):
        ipq.pq_quantize(w, 5, 16)


def test_centroid_gradient_is_the_mean_over_assigned_blocks():
    centroids = torch.randn(3, 2, generator=gen(), requires_grad=True)
    codes = torch.tensor([0, 2, 0, 0, 1, 2], dtype=torch.uint8)
    w = ipq.pq_weight(centroids, codes, (3, 4))  # 3 rows x 2 blocks of 2
    assert torch.equal(w.detach(), centroids.detach()[codes.long()].reshape(3, 4))
    g = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w.backward(g)
    blocks = g.reshape(6, 2)
    expected = torch.stack([blocks[[0, 2, 3]].mean(0), blocks[[4]].mean(0), blocks[[1, 5]].mean(0)])
    assert torch.equal(centroids.grad, expected)


def hand_decode(codes, centroids, shape, block_size):
    """W (shape) with W.reshape(out, -1)[r, j*bs:(j+1)*bs] = centroids[codes[r * blocks_per_row + j]]:
    written out block by block, independent of quantnoise's vectorised decode."""
    out = shape[0]
    row = 1
    for d in shape[1:]:
        row *= d
    w = torch.full((out, row), float("nan"))
    per_row = row // block_size
    for i, c in enumerate(codes.tolist()):
        r, j = divmod(i, per_row)
        w[r, j * block_size:(j + 1) * block_size] = centroids[c]
    assert not w.isnan().any()  # every entry written once
    return w.reshape(shape)


@pytest.mark.parametrize("make, x", [
    (lambda: nn.Linear(32, 16), torch.randn(4, 32)),
    (lambda: nn.Embedding(50, 16, padding_idx=1), torch.tensor([[1, 4, 9]])),
    (lambda: nn.Conv1d(8, 4, 3), torch.randn(2, 8, 10)),
    (lambda: nn.Conv2d(4, 8, 3, padding=1), torch.randn(1, 4, 6, 6)),
])
def test_pq_layers_compute_with_the_decoded_weight_and_round_trip_their_state(make, x):
    torch.manual_seed(0)
    plain = make()
    block = 8 if not isinstance(plain, nn.Conv2d) else 9
    layer = ipq.compress_module(plain, ipq.LayerRule(block_size=block if not isinstance(plain, nn.Conv1d) else 4,
                                                     n_centroids=8), "layer")
    assert isinstance(layer, type(plain)) and "weight" not in dict(layer.named_parameters())
    w = hand_decode(layer.codes, layer.centroids.detach(), plain.weight.shape, layer.block_size)
    ref = torch.func.functional_call(plain, {"weight": w, **({"bias": plain.bias} if "bias" in dict(
        plain.named_parameters()) else {})}, (x,))  # the stock layer's forward with the hand-decoded weight
    assert torch.equal(layer(x), ref) and torch.equal(layer.to_float().weight, w)
    # a fresh plain layer adopts the structure of the state and loads it exactly
    holder = nn.Sequential(make())
    ipq.adopt_state_structure_(holder, {f"0.{k}": v for k, v in layer.state_dict().items()})
    holder.load_state_dict({f"0.{k}": v for k, v in layer.state_dict().items()})
    assert torch.equal(holder[0](x), ref)


def test_scalar_layer_is_symmetric_per_row_int():
    plain = nn.Linear(16, 4)
    layer = ipq.compress_module(plain, ipq.LayerRule(scheme="scalar", bits=4), "fc")
    scale = plain.weight.detach().abs().amax(1, keepdim=True) / 7
    q = torch.round(plain.weight.detach() / scale).clamp(-7, 7)
    assert torch.equal(layer.qweight, q.to(torch.int8)) and torch.allclose(layer.qscale, scale)
    assert torch.equal(layer.weight, q * layer.qscale)
    assert not any(p is not plain.bias for p in layer.parameters())


def test_adopt_names_the_mismatch():
    holder = nn.Sequential(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="state has pq codes for '0' but the model's layer there is a LayerNorm"):
        ipq.adopt_state_structure_(holder, {"0.codes": torch.zeros(1), "0.centroids": torch.zeros(2, 2)})


def test_quantize_state_dict_quantizes_once_and_keeps_tied_copies_equal():
    emb = torch.randn(40, 16, generator=gen())
    state = {"emb.weight": emb, "out.weight": emb, "fc.weight": torch.randn(8, 16, generator=gen(1)),
             "fc.bias": torch.zeros(8), "ln.weight": torch.ones(16)}
    plan = IPQPlan(stages=[ipq.LayerRule(pattern="emb|out", n_centroids=8),
                           ipq.LayerRule(pattern="fc", scheme="scalar", bits=8)])
    out, names = quantize_state_dict(state, plan)
    assert names == ["emb", "fc"]
    decoded = out["emb.centroids"][out["emb.codes"].long()].reshape(40, 16)
    assert torch.equal(out["out.weight"], decoded)
    assert out["fc.qweight"].dtype == torch.int8 and out["fc.weight_size"].tolist() == [8, 16]
    assert torch.equal(out["ln.weight"], state["ln.weight"]) and "emb.weight" not in out
    again, _ = quantize_state_dict(state, plan)
    assert torch.equal(again["emb.codes"], out["emb.codes"])
    with pytest.raises(ValueError, match="no layer matches the ipq patterns"):
        quantize_state_dict(state, IPQPlan(stages=[ipq.LayerRule(pattern="nothing")]))


def test_plan_yaml(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("seed: 3\nstages:\n  - {pattern: 'fc[12]', updates: 10}\n  - {pattern: _proj, block_size: 4, updates: 5}\n")
    plan = load_plan(p)
    assert plan.stage_starts() == [0, 10] and plan.stages[1].block_size == 4 and plan.seed == 3
    assert plan.rule_for("decoder.layers.0.fc1")[0] == 0 and plan.rule_for("x.k_proj")[0] == 1
    p.write_text("stages:\n  - {pattern: fc, centroid: 8}\n")
    with pytest.raises(ValueError, match="stage 0 has unknown keys \\['centroid'\\]"):
        load_plan(p)
    p.write_text("stages:\n  - {pattern: fc, bits: 9, scheme: scalar}\n")
    with pytest.raises(ValueError, match="bits=9"):
        load_plan(p)
    p.write_text("layers: []\n")
    with pytest.raises(ValueError, match="needs a top-level 'stages:' list"):
        load_plan(p)
