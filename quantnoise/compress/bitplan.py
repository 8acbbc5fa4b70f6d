"""Mixed-precision bit plans: bits per layer from sensitivity scores under a size budget (Q-BERT,
Shen et al. 2020, sec. 3.1: more bits to layers with a sharper loss surface).

Noise model: rounding W_i to b bits with a per-row scale adds an error of variance ~ 4^-b per
weight, and a second-order expansion of the loss weights it by the layer's curvature, so the loss
increase of a plan is modelled as

    D(b) = sum_i  s_i * n_i * 4^(-b_i)      (s_i: sensitivity, n_i: weights of layer i)

That model ("model" cost) describes a min-max quantizer on a fixed range; it ignores each layer's weight
scale and how the quantizer actually used (e.g. MSE-clipped scales, group-wise scales) errs at each width.
The "measured" cost (``quant_errors``, ``allocate_bits(errors=...)``) is Q-BERT / HAWQ-V2's
Omega_i(b) = s_i * ||W_i - Q_b(W_i)||^2: the layer's per-weight curvature times the squared perturbation
the real quantizer (``layers.scalar_quantize`` with the layer's rows_per_scale and clip) makes at b bits.

Method: ``allocate_bits`` minimises D exactly under  sum_i n_i * c(b_i) <= budget  (c(b) = stored
bits per weight, b by default) as a multiple-choice knapsack, by dynamic programming over the
budget in integer units of u = gcd of all the costs n_i * c(b) (exact).  When the budget spans
more than ``max_states`` units of that gcd, the unit is coarsened and every cost is rounded *up*
to whole units while the budget is rounded *down*: the plan still never exceeds the budget, and
it is optimal among the plans that fit the rounded problem (the rounding is logged).

A plan serves both quantizers: ``to_ipq_plan()`` / ``save_yaml()`` give the stage format of
``quantnoise quantize --config`` and ``quantize_state_dict`` (one scalar rule per layer, anchored
name regexes); ``configs(base)`` gives one ``QuantNoiseConfig`` per bit width for ``quantize_``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..config import QuantNoiseConfig, is_int, is_real

logger = logging.getLogger(__name__)


def noise_cost(score: float, numel: int, bits: int) -> float:
    """The modelled loss increase of one layer at ``bits``: score * numel * 4^-bits."""
    return score * numel * 4.0 ** (-bits)


def quant_errors(weight, bits: Sequence[int] = (2, 3, 4, 8), rows_per_scale: int = 1,
                 clip: str = "minmax") -> Dict[int, float]:
    """{b: ||W - Q_b(W)||^2} of the quantizer a plan is exported with (``layers.scalar_quantize``: symmetric,
    one scale per ``rows_per_scale`` rows, ``clip`` minmax | mse), summed over the weights in fp64: the measured
    perturbation of the "measured" plan cost (Q-BERT / HAWQ-V2), where the 4^-b model assumes a min-max grid and
    ignores the layer's weight scale.  Deterministic (no randomness); ValueError as ``scalar_quantize``."""
    from .layers import scalar_decode, scalar_quantize

    w = weight.detach().float()
    out: Dict[int, float] = {}
    for b in sorted(set(bits)):
        if not is_int(b) or not 2 <= b <= 8:
            raise ValueError(f"quant_errors: bits={list(bits)!r} is invalid; use integers from 2 to 8, e.g. 2,3,4,8")
        q, scale = scalar_quantize(w, b, rows_per_scale=rows_per_scale, clip=clip)
        out[int(b)] = float((scalar_decode(q, scale, w.shape) - w).double().square().sum())
    return out


@dataclass
class BitPlan:
    """Bits per layer (model order) and how the plan sits in its budget."""

    bits: Dict[str, int]
    sizes: Dict[str, int]
    budget_bits: int  # the budget, in stored bits
    used_bits: int  # sum_i n_i * c(b_i) <= budget_bits
    objective: float  # sum_i s_i * n_i * 4^-b_i ("model" cost) or sum_i s_i * err_i(b_i) ("measured")
    method: str = "exact"  # "exact" (gcd units) | "rounded" (coarse units, costs rounded up)
    cost: str = "model"  # "model": s * n * 4^-b | "measured": s * ||W - Q_b(W)||^2 (``allocate_bits(errors=)``)

    @property
    def avg_bits(self) -> float:
        """Stored bits per weight of the planned layers."""
        return self.used_bits / sum(self.sizes.values())

    def to_ipq_plan(self, seed: int = 0, rows_per_scale: Optional[Mapping[str, int]] = None, clip: str = "minmax"):
        """The plan as an ``IPQPlan``: one scalar ``LayerRule`` per layer, pattern ``^name$``;
        ``rows_per_scale``: {layer: rows sharing a scale} (group-wise scales, e.g. head_dim on the q/k/v
        projections), 1 for the layers it does not name; ``clip``: every layer's range (minmax | mse)."""
        from .layers import LayerRule
        from .plan import IPQPlan

        rps = rows_per_scale or {}
        return IPQPlan(stages=[LayerRule(pattern=f"^{re.escape(n)}$", scheme="scalar", bits=b,
                                         rows_per_scale=rps.get(n, 1), clip=clip) for n, b in self.bits.items()],
                       seed=seed)

    def yaml_text(self, scores: Optional[Mapping[str, float]] = None,
                  rows_per_scale: Optional[Mapping[str, int]] = None, clip: str = "minmax") -> str:
        """The plan in the stage YAML of ``quantnoise quantize --config`` (``compress.plan.load_plan``);
        ``scores`` go into comments, ``rows_per_scale`` as in ``to_ipq_plan``."""
        rps = rows_per_scale or {}
        what = "s*n*4^-b" if self.cost == "model" else "s*||W-Q_b(W)||^2 (measured)"
        lines = [f"# bit plan ({self.method} multiple-choice knapsack, objective sum {what} = {self.objective:.6g})",
                 f"# {len(self.bits)} layers, {self.avg_bits:.4f} stored bits per weight, "
                 f"{self.used_bits} of {self.budget_bits} budget bits", "seed: 0", "stages:"]
        for n, b in self.bits.items():
            note = f"  # {self.sizes[n]} weights" + (f", score {scores[n]:.4g}" if scores and n in scores else "")
            group = f", rows_per_scale: {rps[n]}" if rps.get(n, 1) != 1 else ""
            group += f", clip: {clip}" if clip != "minmax" else ""
            lines.append(f"  - {{pattern: '{_yaml_quote(f'^{re.escape(n)}$')}', scheme: scalar, bits: {b}{group}}}{note}")
        return "\n".join(lines) + "\n"

    def save_yaml(self, path, scores: Optional[Mapping[str, float]] = None,
                  rows_per_scale: Optional[Mapping[str, int]] = None, clip: str = "minmax") -> None:
        """Write ``yaml_text`` atomically (temp file + rename)."""
        import pathlib

        from ..checkpoint import atomic_write

        text = self.yaml_text(scores, rows_per_scale, clip)
        atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))

    def configs(self, base: Optional[QuantNoiseConfig] = None) -> List[QuantNoiseConfig]:
        """One config per bit width, ``base`` with that ``bits`` and ``include`` = the exact names of its
        layers (``exclude`` cleared): ``for cfg in plan.configs(): quantize_(model, cfg)``.  ``base``
        defaults to scalar fake quantization of every block (p=1, ``eval_quantized``): QAT."""
        base = base or QuantNoiseConfig(scheme="scalar", p=1.0, eval_quantized=True)
        by_bits: Dict[int, List[str]] = {}
        for n, b in self.bits.items():
            by_bits.setdefault(b, []).append(n)
        return [dataclasses.replace(base, bits=b, exclude=None,
                                    include="^(?:" + "|".join(re.escape(n) for n in names) + ")$")
                for b, names in sorted(by_bits.items())]


def _yaml_quote(s: str) -> str:
    return s.replace("'", "''")  # single-quoted YAML scalar


def allocate_bits(scores: Mapping[str, float], sizes: Mapping[str, int], *, bits: Sequence[int] = (2, 3, 4, 8),
                  avg_bits: Optional[float] = None, budget_bytes: Optional[float] = None,
                  bit_cost: Optional[Callable[[int], float]] = None, max_states: int = 1 << 20,
                  errors: Optional[Mapping[str, Mapping[int, float]]] = None) -> BitPlan:
    """Bits per layer minimising sum_i scores[i] * sizes[i] * 4^-b_i (or, with ``errors`` = {layer: {b:
    ||W - Q_b(W)||^2}} from ``quant_errors``, the measured cost sum_i scores[i] * errors[i][b_i]; default
    None: the 4^-b model, as before) with the stored size at most the
    budget: ``avg_bits`` (stored bits per weight over these layers) or ``budget_bytes`` (bytes of
    their weights; scales and other tensors are not counted).  ``bit_cost(b)``: stored bits per weight
    of width b (default b, what a .qnz stores since format version 2, ``quantnoise.export.pack_width``;
    ``legacy_pack_width`` gives version 1's, where int3 took 4 bits).  Exact multiple-choice knapsack by dynamic programming (see the module docstring).

    ValueError (one line): names of ``scores`` and ``sizes`` differ, a negative / non-finite score, a
    size that is not a positive integer, bits outside 2..8, ``errors`` missing a layer or width or holding a
    negative / non-finite error, both or neither budget given, or a budget
    below the smallest width (nothing fits) or above the largest (every layer gets the largest:
    nothing to allocate)."""
    if set(scores) != set(sizes) or not scores:
        diff = sorted(set(scores) ^ set(sizes))[:3]
        raise ValueError(f"bit plan: scores and sizes must name the same, non-empty set of layers "
                         f"(differ in {diff or 'nothing: both empty'}); pass both for every layer")
    for n in sizes:
        s, k = scores[n], sizes[n]
        if not is_real(s) or not math.isfinite(s) or s < 0:
            raise ValueError(f"bit plan: score of {n!r} is {s!r}; use a finite score >= 0 (e.g. SensitivityScore.score)")
        if not is_int(k) or k < 1:
            raise ValueError(f"bit plan: size of {n!r} is {k!r}; use its number of weights (a positive integer)")
    widths = sorted(set(bits))
    if not widths or not all(is_int(b) and 2 <= b <= 8 for b in widths):
        raise ValueError(f"bit plan: bits={list(bits)!r} is invalid; use integers from 2 to 8, e.g. 2,3,4,8")
    if errors is not None:
        for n in sizes:
            e = errors.get(n) if isinstance(errors, Mapping) else None
            if not isinstance(e, Mapping) or any(b not in e for b in widths):
                raise ValueError(f"bit plan: errors must give every layer's squared error at bits {widths} "
                                 f"(layer {n!r} has {sorted(e) if isinstance(e, Mapping) else e!r}); use quant_errors")
            bad = [b for b in widths if not is_real(e[b]) or not math.isfinite(e[b]) or e[b] < 0]
            if bad:
                raise ValueError(f"bit plan: error of {n!r} at {bad[0]} bits is {e[bad[0]]!r}; use a finite "
                                 f"squared error >= 0 (quant_errors)")
    cost = bit_cost or (lambda b: b)
    costs = {b: cost(b) for b in widths}
    if not all(is_real(c) and c > 0 for c in costs.values()):
        raise ValueError(f"bit plan: bit_cost gives {costs}; it must give a positive number of stored bits per weight")
    if (avg_bits is None) == (budget_bytes is None):
        raise ValueError("bit plan: give exactly one budget, avg_bits (e.g. 4) or budget_bytes")
    names = list(sizes)
    total = sum(int(sizes[n]) for n in names)
    lo, hi = min(costs.values()), max(costs.values())
    if avg_bits is not None:
        if not is_real(avg_bits):
            raise ValueError(f"bit plan: avg_bits={avg_bits!r} is invalid; use a number of bits per weight")
        budget, what = float(avg_bits) * total, f"avg_bits={avg_bits!r}"
        fix = f"use {lo:g} <= avg_bits <= {hi:g} for bits {widths}"
    else:
        if not is_real(budget_bytes):
            raise ValueError(f"bit plan: budget_bytes={budget_bytes!r} is invalid; use a number of bytes")
        budget, what = 8.0 * float(budget_bytes), f"budget_bytes={budget_bytes!r}"
        fix = f"use {lo * total / 8:g} <= budget_bytes <= {hi * total / 8:g} for bits {widths} on {total} weights"
    if budget < lo * total:
        raise ValueError(f"bit plan: {what} is below the smallest width (every layer at {lo:g} bits needs "
                         f"{lo * total:g} bits); {fix}")
    if budget > hi * total:
        raise ValueError(f"bit plan: {what} is above the largest width (every layer at {hi:g} bits fits); {fix}")
    # integer costs (stored bits) per (layer, width); exact when bit_cost gives integers
    w = np.array([[sizes[n] * costs[b] for b in widths] for n in names], dtype=np.float64)  # (L, K)
    if errors is None:
        d = np.array([[noise_cost(float(scores[n]), int(sizes[n]), b) for b in widths] for n in names])  # (L, K)
    else:
        d = np.array([[float(scores[n]) * float(errors[n][b]) for b in widths] for n in names])  # (L, K)
    integral = bool(np.all(w == np.round(w)))
    unit = math.gcd(*[int(v) for v in w.reshape(-1)]) if integral else 0
    cap = math.floor(budget + 1e-9)  # stored bits are integers
    method = "exact"
    if not integral or cap // unit > max_states:
        unit = max(1.0, budget / max_states)
        method = "rounded"
    wu = np.ceil(w / unit - 1e-9).astype(np.int64)  # (L, K) costs in units, rounded up
    B = int(math.floor(cap / unit + 1e-9))
    if method == "rounded":
        logger.info("bit plan: budget of %.0f bits in %d units of %.4g bits (costs rounded up)", budget, B, unit)
    # dp[c]: least objective of the layers so far with total cost exactly c units
    dp = np.full(B + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(names), B + 1), dtype=np.int8)
    for i in range(len(names)):
        new = np.full(B + 1, np.inf)
        for k in range(len(widths)):
            c = int(wu[i, k])
            if c > B:
                continue
            cand = np.full(B + 1, np.inf)
            cand[c:] = dp[: B + 1 - c] + d[i, k]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = k
        dp = new
    if not np.isfinite(dp).any():  # only reachable when rounding pushed the all-smallest plan over
        raise ValueError(f"bit plan: {what} leaves no feasible plan after rounding costs to {unit:g}-bit units; "
                         f"raise the budget slightly or max_states")
    c = int(np.argmin(dp))  # least objective; ties: the smallest cost (argmin takes the first)
    picked: Dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        k = int(choice[i, c])
        picked[names[i]] = widths[k]
        c -= int(wu[i, k])
    plan_bits = {n: picked[n] for n in names}
    used = sum(sizes[n] * costs[plan_bits[n]] for n in names)
    used = int(used) if float(used).is_integer() else float(used)
    assert used <= budget + 1e-6, (used, budget)
    return BitPlan(bits=plan_bits, sizes={n: int(sizes[n]) for n in names}, budget_bits=int(cap) if integral else budget,
                   used_bits=used, objective=float(sum(d[i, widths.index(plan_bits[n])] for i, n in enumerate(names))),
                   method=method, cost="model" if errors is None else "measured")


__all__ = ["BitPlan", "allocate_bits", "noise_cost", "quant_errors"]
