"""Post-training quantization baselines (no training), the rows Q8BERT compares against.

  - ``dynamic_int8(model)``: PyTorch's own dynamic quantization (``torch.ao.quantization.quantize_dynamic``):
    every ``nn.Linear`` becomes a real int8 kernel (int8 per-tensor weights, activations quantized
    per batch at run time), CPU only.  This is Q8BERT's "DQ" baseline.
  - ``calibrate`` + ``static_int8(model, batches)``: static calibration.  The input range of every
    Linear is measured on N batches of the float model, by ``minmax`` (the smallest min and largest
    max seen) or ``percentile`` (the mean over batches of the q-th percentile of |x|, or of x's two
    tails on the affine grid), then frozen in the quantized model: weights and activations on an int8
    grid (``q8bert()``'s layers by default).  One range per tensor (Q8BERT), or per input feature with
    ``act_granularity="channel"``; with ``"token"`` nothing is calibrated (each row's scale is its own).
    This is *fake* quantization (values on the int grid, float kernels): right for measuring accuracy,
    not for speed.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as QF
from .api import quantize_, selects
from .config import QuantNoiseConfig
from .nn import QNLinear

logger = logging.getLogger(__name__)
METHODS = ("minmax", "percentile")


def _require_linear(model: nn.Module, what: str) -> None:
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{what}: {type(model).__name__} has no nn.Linear layer to quantize; "
                         f"use a model with Linear layers (this baseline quantizes Linear layers only)")


def dynamic_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """PyTorch dynamic int8 quantization of every nn.Linear (real int8 GEMMs on CPU); returns the model."""
    _require_linear(model, "dynamic_int8")
    return torch.ao.quantization.quantize_dynamic(model if inplace else copy.deepcopy(model), {nn.Linear},
                                                  dtype=torch.qint8, inplace=inplace)


def _batch_range(x: Tensor, method: str, percentile: float, symmetric: bool, granularity: str) -> Tuple[Tensor, Tensor]:
    """This batch's input range, 0-d (tensor) or per input feature (channel), in fp32."""
    x = x.detach().float()
    if method == "minmax":
        return QF.activation_range(x, symmetric, granularity)
    x = x.reshape(-1, x.shape[-1]) if granularity == "channel" else x.reshape(-1, 1)  # (n, in | 1)
    shape = x.shape[1:] if granularity == "channel" else ()

    def kth(v: Tensor, q: float) -> Tensor:  # the q-th percentile of each column, exactly (kthvalue has no size limit)
        return v.kthvalue(max(1, min(v.shape[0], round(q / 100 * v.shape[0]))), dim=0).values.reshape(shape)

    if symmetric:
        a = kth(x.abs(), percentile)
        return -a, a
    return kth(x, 100 - percentile), kth(x, percentile)


def calibrate(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object],
              cfg: QuantNoiseConfig, method: str = "minmax", percentile: float = 99.99) -> Dict[str, Tuple[Tensor, Tensor]]:
    """{Linear name: (lo, hi)} input ranges of the Linear layers ``cfg`` selects, over ``batches``
    (``run(model, batch)`` does one forward; the model is put in eval mode and left unchanged): 0-d
    with ``cfg.act_granularity`` tensor, (in,) with channel, none with token (dynamic scales)."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is invalid: choose one of {', '.join(METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"calibration percentile {percentile!r} is invalid: use a value in (0, 100]")
    _require_linear(model, "static calibration")
    gran = cfg.act_granularity
    if gran == "token":
        logger.info("act_granularity=token: per-token scales come from each input at run time, nothing to calibrate")
        return {}
    stats: Dict[str, list] = {}

    def hook(name):
        def pre(module, args):
            stats.setdefault(name, []).append(_batch_range(args[0], method, percentile, cfg.act_symmetric, gran))
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if n and isinstance(m, nn.Linear) and selects(cfg, n)]
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("static calibration got no batch: pass at least one calibration batch")
    out = {}
    for name, rs in stats.items():
        lo, hi = torch.stack([r[0] for r in rs]), torch.stack([r[1] for r in rs])
        out[name] = (lo.amin(0), hi.amax(0)) if method == "minmax" else (lo.mean(0), hi.mean(0))  # per channel
    logger.info("calibrated %d Linear inputs on %d batches (%s)", len(out), n_batches, method)
    return out


def static_int8(model: nn.Module, batches: Iterable, run: Callable[[nn.Module, object], object],
                cfg: Optional[QuantNoiseConfig] = None, method: str = "minmax", percentile: float = 99.99,
                inplace: bool = False) -> nn.Module:
    """Static PTQ: calibrate the float model's Linear inputs, then wrap it with ``cfg`` (default
    ``presets.q8bert()``: int8 weights + int8 activations) and freeze the calibrated ranges; eval mode."""
    from .presets import q8bert

    cfg = cfg or q8bert()
    if cfg.act_bits is None:
        raise ValueError("static_int8 needs a config with act_bits set (it calibrates activation ranges)")
    model = model if inplace else copy.deepcopy(model)
    ranges = calibrate(model, batches, run, cfg, method, percentile)
    quantize_(model, cfg)
    for name, m in model.named_modules():
        if isinstance(m, QNLinear) and name in ranges:
            m.qn_act_lo, m.qn_act_hi = (t.clone() for t in ranges[name])
    return model.eval()
