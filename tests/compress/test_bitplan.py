"""Mixed-precision bit plans: exact knapsack vs brute force, budgets, and both quantizers' formats."""
import itertools
import random

import pytest
import torch
from torch import nn

from quantnoise import quantize_, wrapped_layers
from quantnoise.compress.bitplan import allocate_bits
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
])
def test_bad_input_one_line_error(kwargs, message):
    args = dict(scores={"a": 1.0, "b": 2.0}, sizes={"a": 10, "b": 20})
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as e:
        allocate_bits(args.pop("scores"), args.pop("sizes"), **args)
    assert "\n" not in str(e.value)
