"""Per-layer Hessian sensitivity (Q-BERT: Shen et al. 2020, "Q-BERT: Hessian Based Ultra Low
Precision Quantization of BERT", sec. 3.1).

For layer i with weights W_i, the sensitivity is the dominant eigenvalue of the diagonal Hessian
block H_i = d^2 L / dW_i^2 of the loss on a batch, found by power iteration with Hessian-vector
products (Pearlmutter's trick: H_i v = d(g_i . v)/dW_i with g_i = dL/dW_i kept in the autograd graph,
one double backward per product, the Hessian never formed):

    v <- v / |v|,   lambda <- v . H_i v,   v <- H_i v      (until lambda changes by < tol relatively)

Q-BERT's score over batches b = 1..B is  Omega_i = mean_b |lambda_i,b| + std_b |lambda_i,b|  (their
eq. (2) on the top eigenvalue; the magnitude is taken here because away from a minimum the dominant
eigenvalue may be negative; the signed values are kept in ``SensitivityScore.eigs``).  More
sensitive layers get more bits (quantnoise.compress.bitplan).

Pure torch: works on any ``nn.Module`` given ``loss_fn(model, batch) -> scalar`` and batches.  Cost:
per batch one forward + backward with ``create_graph=True``, then up to ``iters`` double backwards
per layer.  For reproducible scores put the model in eval mode (dropout off): each batch's graph is
built once, but a training-mode forward draws dropout masks from the global RNG.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import is_int, is_real, regex_error

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class SensitivityScore:
    """Sensitivity of one layer: the dominant Hessian eigenvalue on each batch (signed) and its size."""

    name: str
    numel: int  # weights in the layer
    eigs: Tuple[float, ...]  # dominant eigenvalue of H_i on each batch, in batch order

    @property
    def mean(self) -> float:
        return sum(abs(e) for e in self.eigs) / len(self.eigs)

    @property
    def std(self) -> float:
        """Population standard deviation of |lambda| over batches (0 for one batch)."""
        m = self.mean
        return math.sqrt(sum((abs(e) - m) ** 2 for e in self.eigs) / len(self.eigs))

    @property
    def score(self) -> float:
        """Q-BERT's Omega = mean + std of |lambda| over batches."""
        return self.mean + self.std


def default_layers(model: nn.Module) -> List[str]:
    """Names of every Linear and Embedding module (subclasses included) that owns a ``weight``."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m, (nn.Linear, nn.Embedding)) and isinstance(m._parameters.get("weight"), Tensor)]


def select_layers(model: nn.Module, layers: Union[None, str, Sequence[str]] = None) -> Dict[str, nn.Parameter]:
    """{layer name: its weight Parameter}.  ``layers``: None = every Linear and Embedding; a string =
    a regex searched (``re.search``) in those names; a list = exact module names (any module with a
    ``weight``).  A Parameter shared by several layers (tied weights) is listed once, under its
    first name.  ValueError when nothing is selected or a listed name has no weight."""
    candidates = default_layers(model)
    if isinstance(layers, str) and regex_error(layers):
        raise ValueError(f"sensitivity: layers={layers!r} is {regex_error(layers)}; pass a valid regex or module names")
    if layers is None or isinstance(layers, str):
        names = candidates if layers is None else [n for n in candidates if re.search(layers, n)]
        if not names:
            sample = ", ".join(candidates[:6]) or "none"
            what = "has no Linear or Embedding layer" if layers is None else \
                f"has no Linear/Embedding layer matching layers={layers!r} (first candidates: {sample})"
            raise ValueError(f"sensitivity: {type(model).__name__} {what}; pass layers=[module names] "
                             f"of the modules whose .weight to score")
    else:
        names = list(layers)
        if not names:
            raise ValueError("sensitivity: layers=[] selects nothing; pass None (every Linear/Embedding), "
                             "a regex, or module names")
    modules = dict(model.named_modules())
    out: Dict[str, nn.Parameter] = {}
    seen = set()
    for n in names:
        w = modules[n]._parameters.get("weight") if n in modules else None
        if not isinstance(w, Tensor):
            raise ValueError(f"sensitivity: layer {n!r} is not a module of {type(model).__name__} with a weight "
                             f"Parameter; pass names from model.named_modules() (e.g. {', '.join(candidates[:3])})")
        if id(w) not in seen:
            seen.add(id(w))
            out[n] = w
    return out


def layer_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of ``name``'s start vectors: a function of (seed, name) only, so a layer's
    scores do not depend on which other layers are scored."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def top_eigenvalue(hvp: Callable[[Tensor], Tensor], v: Tensor, iters: int = 20, tol: float = 1e-3) -> Tuple[float, int]:
    """(dominant eigenvalue, products used) of the symmetric operator ``hvp`` by power iteration from
    ``v``; stops when the Rayleigh quotient changes by <= ``tol`` relatively, or after ``iters``
    products.  An operator that maps v to 0 has eigenvalue 0."""
    v = v / v.norm()
    eig = None
    for k in range(1, iters + 1):
        hv = hvp(v)
        new = float(torch.dot(v.reshape(-1).double(), hv.reshape(-1).double()))  # v . Hv, |v| = 1
        norm = hv.norm()
        if not torch.isfinite(norm):
            raise ValueError("sensitivity: a Hessian-vector product is NaN/inf; check the loss and the weights "
                             "(a model in fp16 may overflow: score it in fp32)")
        if norm == 0:
            return 0.0, k
        v = hv / norm
        if eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-30):
            return new, k
        eig = new
    return eig, iters


@contextlib.contextmanager
def _double_backward_ready(params: Sequence[Tensor]):
    """Grad enabled, the scored weights requiring grad, and scaled_dot_product_attention on its math
    kernel (the fused CPU / flash kernels have no double backward); restored on exit."""
    before = [p.requires_grad for p in params]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa = sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # older torch: its default math path is differentiable twice
        sdpa = contextlib.nullcontext()
    try:
        with torch.enable_grad(), sdpa:
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)


def hessian_sensitivity(model: nn.Module, loss_fn: LossFn, batches: Iterable, *,
                        layers: Union[None, str, Sequence[str]] = None, iters: int = 20, tol: float = 1e-3,
                        seed: int = 0) -> Dict[str, SensitivityScore]:
    """Q-BERT sensitivity of each selected layer: {name: SensitivityScore}, in model order.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch; ``batches`` is any iterable (each
    batch costs one graph, ``iters`` Hessian-vector products per layer at most).  ``layers``: None =
    every Linear and Embedding weight, a regex, or module names (``select_layers``).  Start vectors are
    Gaussian from a generator seeded by (``seed``, layer name): same seed, same scores.

    ValueError (one line each): no batch, no layer selected, a non-finite or non-scalar loss, a
    selected layer the loss does not depend on, ``iters`` / ``tol`` out of range.
    """
    if not is_int(iters) or iters < 1:
        raise ValueError(f"sensitivity: iters={iters!r} is invalid; use a positive integer (20 is plenty)")
    if not is_real(tol) or not 0 <= tol < 1:
        raise ValueError(f"sensitivity: tol={tol!r} is invalid; use a relative tolerance in [0, 1), e.g. 1e-3")
    chosen = select_layers(model, layers)
    names, params = list(chosen), list(chosen.values())
    gens = {n: layer_generator(seed, n) for n in names}
    eigs: Dict[str, List[float]] = {n: [] for n in names}
    t0, b = time.perf_counter(), -1
    with _double_backward_ready(params):
        for b, batch in enumerate(batches):
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"sensitivity: loss_fn returned {type(loss).__name__}"
                                 f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}; "
                                 f"it must return the scalar loss tensor of the batch")
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"sensitivity: the loss of batch {b} is {float(loss.detach()):g}; the Hessian of a "
                                 f"non-finite loss is meaningless: fix the model, the data or loss_fn")
            grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    raise ValueError(f"sensitivity: the loss does not depend on layer {n!r} (its weight gets no "
                                     f"gradient); leave it out with layers=[...] or a regex")
            for n, w, g in zip(names, params, grads):
                if g.grad_fn is None:  # the gradient is constant in every weight: H_i = 0
                    eigs[n].append(0.0)
                    continue

                def hvp(v: Tensor, g=g, w=w) -> Tensor:  # H_i v = d(g_i . v) / dW_i, reusing the batch's graph
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
                    return torch.zeros_like(w) if hv is None else hv.detach()

                v0 = torch.randn(w.shape, generator=gens[n], dtype=torch.float32).to(w.device, w.dtype)
                eig, k = top_eigenvalue(hvp, v0, iters, tol)
                eigs[n].append(eig)
                logger.debug("batch %d layer %s: lambda %.4g after %d products", b, n, eig, k)
            del grads, loss
            logger.info("sensitivity: batch %d done (%d layers, %.1f s so far)", b + 1, len(names),
                        time.perf_counter() - t0)
    if b < 0:
        raise ValueError("sensitivity: batches is empty; pass at least one batch (Q-BERT's std needs several)")
    return {n: SensitivityScore(n, chosen[n].numel(), tuple(eigs[n])) for n in names}


def format_table(scores: Dict[str, SensitivityScore], bits: Optional[Dict[str, int]] = None) -> str:
    """A plain-text table, most sensitive first: name, #weights, mean, std, score (, bits)."""
    rows = sorted(scores.values(), key=lambda s: -s.score)
    width = max([len("layer")] + [len(s.name) for s in rows])
    head = f"{'layer':<{width}}  {'weights':>10}  {'mean':>10}  {'std':>10}  {'score':>10}" + ("  bits" if bits else "")
    lines = [head]
    for s in rows:
        line = f"{s.name:<{width}}  {s.numel:>10}  {s.mean:>10.4g}  {s.std:>10.4g}  {s.score:>10.4g}"
        lines.append(line + (f"  {bits[s.name]:>4}" if bits and s.name in bits else ""))
    return "\n".join(lines)


__all__ = ["SensitivityScore", "hessian_sensitivity", "select_layers", "default_layers", "top_eigenvalue",
           "format_table"]
