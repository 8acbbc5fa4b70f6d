"""Mixed-precision bit plans: exact knapsack vs brute force, budgets, and both quantizers' formats."""
import itertools
import random

import pytest
import torch
from torch import nn

from quantnoise import quantize_, wrapped_layers
from quantnoise.compress.bitplan import allocate_bits, quant_errors
from quantnoise.compress.layers import scalar_decode, scalar_quantize
from quantnoise.export import legacy_pack_width, pack_width
from quantnoise.compress.plan import load_plan, quantize_state_dict

WIDTHS = (2, 3, 4, 8)


def brute_force(scores, sizes, budget, widths=WIDTHS, cost=lambda b: b):
    names = list(sizes)
    return min(sum(scores[n] * sizes[n] * 4.0 ** -b for n, b in zip(names, combo))
               for combo in itertools.product(widths, repeat=len(names))
               if sum(sizes[n] * cost(b) for n, b in zip(names, combo)) <= budget)


def test_optimal_and_within_budget_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        names = [f"l{i}" for i in range(rng.randint(1, 5))]
        sizes = {n: rng.choice([3, 6, 10, 64, 100]) for n in names}
        scores = {n: rng.choice([0.0, rng.random(), 100 * rng.random()]) for n in names}
        avg = rng.uniform(2, 8)
        plan = allocate_bits(scores, sizes, bits=WIDTHS, avg_bits=avg)
        assert plan.method == "exact" and set(plan.bits.values()) <= set(WIDTHS)
        assert plan.used_bits == sum(sizes[n] * plan.bits[n] for n in names) <= avg * sum(sizes.values())
        assert plan.objective == pytest.approx(brute_force(scores, sizes, avg * sum(sizes.values())), rel=1e-12)


def test_bytes_budget_packed_cost_and_rounded_units():
    sizes = {"emb": 3000, "a": 600, "b": 600, "c": 90}
    scores = {"emb": 5.0, "a": 1.0, "b": 0.1, "c": 2.0}
    plan = allocate_bits(scores, sizes, budget_bytes=2000, bit_cost=legacy_pack_width)  # int3 costing 4 bits
    assert plan.used_bits <= 16000 and 3 not in plan.bits.values()
    assert plan.objective == pytest.approx(brute_force(scores, sizes, 16000, cost=legacy_pack_width))
    # at 1700 bytes, .qnz v2's real cost (int3 in 3 bits) lets the embedding take 3 bits, not 2
    old, real = (allocate_bits(scores, sizes, budget_bytes=1700, bit_cost=c) for c in (legacy_pack_width, pack_width))
    assert all(pack_width(b) == b for b in range(2, 9)) and real.objective < old.objective / 3
    assert real.objective == pytest.approx(brute_force(scores, sizes, 13600)) and real.bits["emb"] == 3
    assert plan.bits["emb"] >= plan.bits["b"]  # more sensitive, more bits
    coarse = allocate_bits(scores, sizes, avg_bits=3.3, max_states=50)  # units coarser than the gcd
    assert coarse.method == "rounded" and coarse.used_bits <= 3.3 * sum(sizes.values())
    assert coarse.objective >= brute_force(scores, sizes, 3.3 * sum(sizes.values())) - 1e-12
    # a budget exactly at the largest width: every layer gets it
    assert set(allocate_bits(scores, sizes, avg_bits=8).bits.values()) == {8}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def test_plan_feeds_quantize_config_and_quantize_(tmp_path):
    m = model()
    sizes = {n: mod.weight.numel() for n, mod in m.named_modules() if n and hasattr(mod, "weight")}
    scores = {"0": 9.0, "1": 1.0, "3": 0.01}
    plan = allocate_bits(scores, sizes, avg_bits=3.5)
    assert plan.bits == {"0": 4, "1": 4, "3": 2}  # 160*4 + 128*4 + 128*2 = 1408 <= 3.5 * 416 = 1456
    # quantnoise quantize --config: the YAML is an ipq plan of one scalar rule per layer
    plan.save_yaml(tmp_path / "plan.yaml", scores, rows_per_scale={"1": 4})  # layer 1: 4 "heads" of 4 rows
    ipq = load_plan(tmp_path / "plan.yaml")
    assert [r.bits for r in ipq.stages] == [4, 4, 2] and all(r.scheme == "scalar" for r in ipq.stages)
    assert ipq == plan.to_ipq_plan(rows_per_scale={"1": 4})
    state, names = quantize_state_dict(m.state_dict(), ipq)
    assert names == ["0", "1", "3"] and [tuple(state[f"{n}.qscale"].shape) for n in names] == [(20, 1), (4, 1), (8, 1)]
    assert {n: int(state[f"{n}.qbits"]) for n in names} == plan.bits
    for n in names:  # q within the int-N range of its planned width
        assert int(state[f"{n}.qweight"].abs().max()) <= 2 ** (plan.bits[n] - 1) - 1
    # quantize_: one config per width, exact names (no layer "1" matched by a pattern for "10")
    cfgs = plan.configs()
    assert [c.bits for c in cfgs] == [2, 4]
    for cfg in cfgs:
        quantize_(m, cfg)
    assert wrapped_layers(m) == ["0", "1", "3"]
    assert {n: mod.qn_cfg.bits for n, mod in m.named_modules() if n in plan.bits} == plan.bits


@pytest.mark.parametrize("kwargs, message", [
    (dict(avg_bits=1.5), "avg_bits=1.5 is below the smallest width"),
    (dict(avg_bits=8.5), "avg_bits=8.5 is above the largest width"),
    (dict(budget_bytes=5), "budget_bytes=5 is below the smallest width"),
    (dict(avg_bits=4, budget_bytes=100), "give exactly one budget"),
    (dict(avg_bits=4, bits=(1, 4)), "bits=\\[1, 4\\] is invalid"),
    (dict(avg_bits=4, scores={"a": -1.0, "b": 1.0}), "score of 'a' is -1.0"),
    (dict(avg_bits=4, scores={"a": 1.0}), "scores and sizes must name the same"),
    (dict(avg_bits=4, sizes={"a": 0, "b": 10}), "size of 'a' is 0"),
    (dict(avg_bits=4, bits=(2, 4), errors={"a": {2: 1.0, 4: 0.1}, "b": {2: 1.0}}), "layer 'b' has \\[2\\]"),
    (dict(avg_bits=4, bits=(2, 4), errors={"a": {2: 1.0, 4: 0.1}}), "layer 'b' has None"),
    (dict(avg_bits=4, bits=(2, 4), errors={"a": {2: 1.0, 4: 0.1}, "b": {2: float("nan"), 4: 0.0}}),
     "error of 'b' at 2 bits is nan"),
])
def test_bad_input_one_line_error(kwargs, message):
    args = dict(scores={"a": 1.0, "b": 2.0}, sizes={"a": 10, "b": 20})
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as e:
        allocate_bits(args.pop("scores"), args.pop("sizes"), **args)
    assert "\n" not in str(e.value)


def toy_layers():
    """Two equal-size layers: 'sharp' (high score) holds exactly ternary weights, which int2 (min-max scale
    max|w|, levels -s, 0, s) represents with no error; 'flat' (low score) holds Gaussian weights."""
    g = torch.Generator().manual_seed(0)
    sharp = torch.randint(-1, 2, (16, 32), generator=g).float() * 0.05
    flat = torch.randn(16, 32, generator=g) * 0.05
    return {"sharp": sharp, "flat": flat}, {"sharp": 10.0, "flat": 1.0}


def test_quant_errors_are_the_quantizers_squared_error_and_deterministic():
    w = torch.randn(8, 24, generator=torch.Generator().manual_seed(1))
    for clip, rps in (("minmax", 1), ("mse", 4), ("mse", 0)):
        e = quant_errors(w, (2, 3, 4, 8), rows_per_scale=rps, clip=clip)
        for b in (2, 3, 4, 8):
            q, s = scalar_quantize(w, b, rows_per_scale=rps, clip=clip)
            assert e[b] == pytest.approx(float((scalar_decode(q, s, w.shape) - w).double().square().sum()), rel=1e-9)
        assert e == quant_errors(w.clone(), (8, 4, 3, 2), rows_per_scale=rps, clip=clip)  # deterministic, any order
        assert e[2] > e[3] > e[4] > e[8] >= 0
    # the clip cuts int2's error much more than the 4^-b model's ratio to int3 assumes
    mm, mse = quant_errors(w, (2, 3)), quant_errors(w, (2, 3), clip="mse")
    assert mse[2] / mse[3] < mm[2] / mm[3] and mse[2] < mm[2] / 2
    with pytest.raises(ValueError, match="bits=\\[1\\] is invalid"):
        quant_errors(w, (1,))
    with pytest.raises(ValueError, match="rows_per_scale=5 does not divide"):
        quant_errors(w, (2,), rows_per_scale=5)


def test_measured_cost_flips_the_plan_where_the_4b_model_is_wrong():
    weights, scores = toy_layers()
    sizes = {n: w.numel() for n, w in weights.items()}
    errors = {n: quant_errors(w, (2, 3, 4), clip="minmax") for n, w in weights.items()}
    assert max(errors["sharp"].values()) < 1e-12 < errors["flat"][4]  # ternary: exact at every width
    model = allocate_bits(scores, sizes, bits=(2, 3, 4), avg_bits=3.0)
    measured = allocate_bits(scores, sizes, bits=(2, 3, 4), avg_bits=3.0, errors=errors)
    # 4^-b model: 10x the score is worth 4 bits, paid for by 2 bits on the flat layer; measured: the sharp
    # layer loses nothing at 2 bits, so its bits go to the flat one
    assert model.bits == {"sharp": 4, "flat": 2} and model.cost == "model"
    assert measured.bits == {"sharp": 2, "flat": 4} and measured.cost == "measured"
    assert measured.objective == pytest.approx(scores["flat"] * errors["flat"][4] + scores["sharp"] * errors["sharp"][2])
    assert "(measured)" in measured.yaml_text() and "s*n*4^-b" in model.yaml_text()
    # errors exactly proportional to n * 4^-b give the model's plan
    prop = {n: {b: sizes[n] * 4.0 ** -b for b in (2, 3, 4)} for n in sizes}
    assert allocate_bits(scores, sizes, bits=(2, 3, 4), avg_bits=3.0, errors=prop).bits == model.bits


def test_measured_cost_optimal_within_budget_and_deterministic():
    rng = random.Random(3)
    for _ in range(40):
        names = [f"l{i}" for i in range(rng.randint(1, 4))]
        sizes = {n: rng.choice([3, 6, 10, 64]) for n in names}
        scores = {n: rng.choice([0.0, rng.random(), 50 * rng.random()]) for n in names}
        errors = {n: {b: rng.random() * 2.0 ** -b for b in WIDTHS} for n in names}
        avg = rng.uniform(2, 8)
        plan = allocate_bits(scores, sizes, bits=WIDTHS, avg_bits=avg, errors=errors)
        assert plan.used_bits == sum(sizes[n] * plan.bits[n] for n in names) <= avg * sum(sizes.values())
        best = min(sum(scores[n] * errors[n][b] for n, b in zip(names, combo))
                   for combo in itertools.product(WIDTHS, repeat=len(names))
                   if sum(sizes[n] * b for n, b in zip(names, combo)) <= avg * sum(sizes.values()))
        assert plan.objective == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert allocate_bits(scores, sizes, bits=WIDTHS, avg_bits=avg, errors=errors) == plan
