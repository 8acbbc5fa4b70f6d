"""iPQ inside fairseq: staged centroid fine-tuning in ``fairseq-train``, and ``--path MODEL.qnz``.

Staged iPQ (Stock et al. 2020, sec. 3.3).  ``--ipq-plan plan.yaml`` (quantnoise.ipq_plan) lists
stages; stage i is quantized at the first training forward once ``num_updates`` reaches the sum
of the ``updates`` of the stages before it.  Its layers become PQ layers (codes + trainable
centroids, mean-gradient rule); already quantized layers train only their centroids; layers of
later stages keep training in full precision.

How the pieces hook into fairseq, without patching its trainer:
  - ``attach_ipq(model, args)`` (one call in each plugin ``build_model``) adds a child module
    ``model.ipq``, which has no parameters or buffers (state dicts are unchanged).  fairseq calls its
    ``set_num_updates`` (the update counter) and its ``upgrade_state_dict_named`` before every
    ``load_state_dict``: there it swaps in PQ layers wherever the incoming state holds ``codes``.
    The layer structure thus follows the checkpoint: resuming mid-plan, ``--restore-file`` of a
    ``quantnoise quantize`` output and ``fairseq-eval-lm`` of it all work, and fairseq builds its
    optimizer after loading, from the right parameters.
  - A swap during training replaces a weight Parameter by a centroids Parameter.  A global
    optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) puts the
    new parameters into the optimizer in place of the old ones, in model order (the order fairseq
    uses when it rebuilds the optimizer on resume, so saved optimizer states line up), and drops the
    old ones' state.  On that first step the new centroids' gradient is discarded: it has not been
    through fairseq's gradient normalisation and clipping, which ran before the hook.
  - ``.qnz`` files: the plugin wraps ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (the one
    function every fairseq loader goes through) so that a path ending in ``.qnz`` is read with
    quantnoise.export (safetensors + JSON, never unpickled) and decoded to the same stock-arch
    checkpoint ``quantnoise decompress`` writes.  Other paths go to fairseq's function unchanged.
"""

import logging
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from quantnoise.checkpoint import stock_checkpoint
from quantnoise.export import load_qnz
from quantnoise.ipq import CompressedMixin, adopt_state_structure_, compress_module, compressed_class, set_submodule
from quantnoise.ipq_plan import IPQPlan, load_plan

logger = logging.getLogger(__name__)

class IPQState(nn.Module):
    """The plan and the update counter of one model; no parameters, no buffers."""

    def __init__(self, model: nn.Module, plan: Optional[IPQPlan]):
        super().__init__()
        self._root = weakref.ref(model)  # not a submodule: no cycle in the module tree
        self.plan = plan
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def upgrade_state_dict_named(self, state_dict: Dict[str, torch.Tensor], name: str) -> None:
        prefix = name[: -len("ipq")]
        swapped = adopt_state_structure_(self._root(), state_dict, prefix)
        if swapped:
            logger.info("ipq: %d compressed layers in the loaded state: %s", len(swapped), ", ".join(swapped))

    def extra_repr(self) -> str:
        return "no plan" if self.plan is None else f"{len(self.plan.stages)} stages starting at {self.plan.stage_starts()}"

    # ------------------------------------------------------------------------------ stages
    def pending_layers(self, stage: int) -> List[Tuple[str, nn.Module]]:
        model = self._root()
        return [(n, m) for n, m in model.named_modules()
                if n and self.plan.rule_for(n)[0] == stage and compressed_class(m, self.plan.stages[stage].scheme)
                and not isinstance(m, CompressedMixin) and _owns_weight(m)]

    def advance(self) -> None:
        """Quantize every stage whose start update has been reached and is not quantized yet."""
        for i, start in enumerate(self.plan.stage_starts()):
            if self.num_updates < start:
                break
            todo = self.pending_layers(i)
            if not todo:
                continue
            rule, model = self.plan.stages[i], self._root()
            logger.info("ipq: stage %d (pattern %r) at update %d: quantizing %d layers", i, rule.pattern,
                        self.num_updates, len(todo))
            for name, module in todo:
                new = compress_module(module, rule, name, seed=self.plan.layer_seed(name))
                set_submodule(model, name, new)
                _PENDING.append(_Swap(module.weight, new, weakref.ref(model)))


def _owns_weight(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), nn.Parameter)


def attach_ipq(model: nn.Module, args) -> nn.Module:
    """Give ``model`` its ``ipq`` child (state-dict adoption, update counter) and, with
    ``--ipq-plan``, the staged quantization.  Returns the model."""
    path = getattr(args, "ipq_plan", None)
    try:
        plan = load_plan(path) if path else None
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --ipq-plan: {e}") from None
    model.ipq = IPQState(model, plan)
    if plan is not None:
        if not any(model.ipq.pending_layers(i) for i in range(len(plan.stages))):
            raise SystemExit(f"error: --ipq-plan {path}: no stage pattern matches a Linear/Embedding/Conv layer; "
                             f"fix the patterns (regexes searched in module names)")
        model.register_forward_pre_hook(lambda module, inputs: module.ipq.advance() if module.training else None)
        logger.info("ipq plan %s: %s", path, model.ipq.extra_repr())
    return model


# --------------------------------------------------------------------------- the optimizer
@dataclass
class _Swap:
    old: nn.Parameter  # the replaced weight
    new: nn.Module  # the compressed layer now in its place
    model: weakref.ref


_PENDING: List[_Swap] = []  # swaps not yet seen by an optimizer step


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook: in every param group holding a replaced weight, put the new layer's
    parameters in its place (model order) and drop the old weight and its state."""
    if not _PENDING:
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    mine = [s for s in _PENDING if id(s.old) in held]
    if not mine or mine[0].model() is None:
        return
    order: Dict[int, int] = {}
    for p in mine[0].model().parameters():  # fairseq builds its optimizer in this order
        order.setdefault(id(p), len(order))
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        here = [s for s in mine if id(s.old) in ids]
        if not here:
            continue
        fresh = [p for s in here for p in s.new.parameters(recurse=False) if p.requires_grad and id(p) not in held]
        olds = {id(s.old) for s in here if id(s.old) not in order}  # a weight still used elsewhere (tied) stays
        kept = [p for p in group["params"] if id(p) not in olds]
        group["params"] = sorted(kept + fresh, key=lambda p: order.get(id(p), len(order)))
        for p in fresh:
            p.grad = None  # see the module docstring: not normalised / clipped on this step
    for s in mine:
        if id(s.old) not in order:
            optimizer.state.pop(s.old, None)
    _PENDING[:] = [s for s in _PENDING if all(s is not m for m in mine)]


register_optimizer_step_pre_hook(_swap_in_optimizer)


# ------------------------------------------------------------------------------ .qnz paths
def _install_qnz_loader() -> None:
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "quantnoise_qnz", False):
        return

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        if not str(path).endswith(".qnz"):
            return original(path, arg_overrides, load_on_all_ranks)
        from omegaconf import OmegaConf
        from fairseq.dataclass.utils import overwrite_args_by_name

        try:
            model_state, meta = load_qnz(path)
            state = stock_checkpoint(model_state, meta)
        except (ValueError, OSError) as e:  # a bad, forged or missing .qnz: one line, no traceback
            raise SystemExit(f"error: {e}") from None
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
        return checkpoint_utils._upgrade_state_dict(state)

    load_checkpoint_to_cpu.quantnoise_qnz = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


_install_qnz_loader()
