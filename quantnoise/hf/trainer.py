"""``QuantNoiseCallback``: Quant-Noise and staged iPQ inside a ``transformers.Trainer``, the user's loop unchanged.

    quantize_(model, QuantNoiseConfig(scheme="pq", p=0.1, block_size=8))
    Trainer(model, args, train_dataset=data, callbacks=[QuantNoiseCallback(plan=plan, start=1000)]).train()

Each update step it calls ``set_num_updates(global_step)`` on the quant-noise wrappers, so a layer's masks are a
function of (seed, layer, step, forward within the step) and a run resumed with ``resume_from_checkpoint`` draws
the masks the uninterrupted run drew (drop and scalar noise; pq noise's codebook is rebuilt from the resumed
weights at the first forward, so it matches when ``refresh_every`` divides the resume step).

With ``plan`` (an ``IPQPlan``), from step ``start`` it runs the plan's stages (Stock et al. 2020, sec. 3.3):
at step ``start + stage_starts[i]`` the layers of stage i are compressed (``quantnoise.compress_``, a noise
wrapper as the layer it wraps), then trained ``updates`` steps with the rest of the model before the next stage.
The Trainer's optimizer is told in place: the compressed weights' Parameters (and their optimizer state) leave it,
the new ``centroids`` Parameters join it in a group with the hyper-parameters of its no-decay group, and the
learning-rate schedule covers that group too (the same schedule).  Checkpoints save a codebook shared by tied
layers once.  Resuming inside the stages is not supported (the checkpoint holds codes, the fresh model weights).
"""
from __future__ import annotations

import logging
from typing import List, Optional

from torch import nn
from transformers import TrainerCallback

from ..api import compress_
from ..compress.layers import CompressedMixin
from ..compress.plan import IPQPlan
from ..config import is_int
from ..nn import QuantNoiseMixin

logger = logging.getLogger(__name__)


class QuantNoiseCallback(TrainerCallback):
    """Quant-Noise and staged iPQ in a ``transformers.Trainer``: pass it in ``callbacks=[...]``, the loop unchanged.

    ``plan=None``: each step, the quant-noise wrappers (``quantize_``) are told the Trainer's global step, so a
    layer's masks depend on (seed, layer, step) and a resumed run draws the uninterrupted run's masks.
    ``plan`` (an ``IPQPlan``) and ``start``: from step ``start`` the plan's stages are compressed one at a time
    (``compress_``), each trained ``rule.updates`` steps before the next; the Trainer's optimizer and learning-rate
    schedule are told in place (the compressed weights leave them, the new centroids join them).  The model the
    Trainer saves at the end (``save_model``) is a quantnoise folder that ``from_pretrained`` loads compressed.
    Resuming inside the stages raises ValueError (resume before ``start``)."""

    def __init__(self, plan: Optional[IPQPlan] = None, start: int = 0):
        if plan is not None and not isinstance(plan, IPQPlan):
            raise ValueError(f"QuantNoiseCallback plan must be an IPQPlan (or None), not a {type(plan).__name__}; "
                             f"build one: IPQPlan(stages=[LayerRule(pattern=..., updates=N), ...])")
        if not is_int(start) or start < 0:
            raise ValueError(f"QuantNoiseCallback start={start!r} is invalid: use the step (>= 0) at which iPQ begins")
        self.plan, self.start = plan, start
        self.done: List[int] = []  # stages compressed so far

    def stage_steps(self) -> List[int]:
        """The global step at which each stage of the plan is compressed."""
        return [] if self.plan is None else [self.start + s for s in self.plan.stage_starts()]

    def on_train_begin(self, args, state, control, **kwargs):
        if self.plan is not None and state.global_step > self.start and not self.done:
            raise ValueError(f"resuming at step {state.global_step}, inside the iPQ stages (from step {self.start}), is "
                             f"not supported: resume from a checkpoint before step {self.start}, or rerun the stages")

    def on_step_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        for i, step in enumerate(self.stage_steps()):
            if step <= state.global_step and i not in self.done:
                self._compress_stage(i, model, optimizer, lr_scheduler, state.global_step)
        for m in model.modules():
            if isinstance(m, QuantNoiseMixin):
                m.set_num_updates(state.global_step)

    def _compress_stage(self, i: int, model: nn.Module, optimizer, lr_scheduler, step: int) -> None:
        rule = self.plan.stages[i]
        before = {id(p): p for p in model.parameters()}
        names = compress_(model, IPQPlan(stages=[rule], seed=self.plan.seed),
                          filter_fn=lambda m, n: self.plan.rule_for(n)[0] == i)
        self.done.append(i)
        _mark_shared_codebooks(model)
        after = {id(p): p for p in model.parameters()}
        gone = [p for k, p in before.items() if k not in after]
        new = [p for k, p in after.items() if k not in before]
        if optimizer is not None:
            _swap_params(optimizer, lr_scheduler, gone, new)
        logger.info("step %d: iPQ stage %d (%r) compressed %d layers; centroids trained %d steps", step, i,
                    rule.pattern, len(names), rule.updates)


def _mark_shared_codebooks(model: nn.Module) -> None:
    """Tell transformers' checkpoint saving that a layer sharing another's codebook (tied embeddings) holds copies
    (``_dynamic_tied_weights_keys``), as ``lm_head.weight`` is declared for the plain model: saved once."""
    first = {}
    for _, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, CompressedMixin):
            key = id(m.codes if m.scheme == "pq" else m.qweight)
            if first.setdefault(key, m) is not m:
                m._dynamic_tied_weights_keys = ["centroids", "codes"] if m.scheme == "pq" else ["qweight", "qscale"]


def _swap_params(optimizer, lr_scheduler, gone: List[nn.Parameter], new: List[nn.Parameter]) -> None:
    """Remove ``gone`` (and their state) from the optimizer, add ``new`` as a group like its no-decay group, and
    extend the learning-rate schedule to it."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    dead = {id(p) for p in gone}
    for group in opt.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in dead]
    for p in gone:
        opt.state.pop(p, None)
    if not new:
        return
    index = min(range(len(opt.param_groups)), key=lambda g: opt.param_groups[g].get("weight_decay", 0.0))
    like = {k: v for k, v in opt.param_groups[index].items() if k != "params"}
    opt.add_param_group({**like, "params": new})
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler
    if sched is not None and hasattr(sched, "base_lrs"):
        sched.base_lrs.append(sched.base_lrs[index])
        if hasattr(sched, "lr_lambdas"):  # LambdaLR (the Trainer's linear / cosine schedules)
            sched.lr_lambdas.append(sched.lr_lambdas[index])
