"""iPQ inside fairseq: staged centroid fine-tuning in ``fairseq-train``, and ``--path MODEL.qnz``.

Staged iPQ (Stock et al. 2020, sec. 3.3).  ``--ipq-plan plan.yaml`` (quantnoise.compress.plan) lists
stages; stage i is quantized at the first training forward once ``num_updates`` reaches the sum
of the ``updates`` of the stages before it.  Its layers become PQ layers (codes + trainable
centroids, mean-gradient rule); already quantized layers train only their centroids; layers of
later stages keep training in full precision.  A weight held by several layers (tied embedding and
output projection) is quantized once, at the first stage matching any of their names, into one
codebook they share; a holder that is no Linear / Embedding / Conv (RoBERTa's LM head) then reads the
decoded weight (``compress.layers.tie_weight_view_``), so the tie holds and it keeps no fp32 copy.

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
    through fairseq's gradient normalisation and clipping, which ran before the hook.  The hook
    looks only at models with a plan and holds replaced weights weakly (no leak when no optimizer
    holds them).  fairseq's ``FP16Optimizer`` (``--fp16``/``--bf16``) trains fp32 copies it makes at
    build time and would never see swapped-in centroids: its ``build_optimizer`` is wrapped to
    refuse it while a plan has stages left (fp32, ``--amp`` and ``--memory-efficient-*`` work).
  - Distributed: fairseq wraps the model before loading checkpoints, and ``legacy_ddp`` lists the
    parameters to all-reduce at wrap time.  ``models.DistributedFairseqModel`` is wrapped to remember
    the wrapper; after every swap ``IPQState.sync_distributed`` gives ``legacy_ddp`` the current
    parameters (PyTorch's DDP cannot take new ones: refused with one line).
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
from quantnoise.compress.layers import adopt_state_structure_, compress_tied, compressed_class, set_submodule, tied_layers
from quantnoise.compress.plan import IPQPlan, load_plan

logger = logging.getLogger(__name__)

class IPQState(nn.Module):
    """The plan, the update counter and the pending optimizer swaps of one model; no parameters,
    no buffers."""

    def __init__(self, model: nn.Module, plan: Optional[IPQPlan]):
        super().__init__()
        self._root = weakref.ref(model)  # not a submodule: no cycle in the module tree
        self.plan = plan
        self.num_updates = 0
        self.pending: List[_Swap] = []  # stage swaps not yet seen by this model's optimizer
        self.wrapper: Optional[weakref.ref] = None  # fairseq's distributed wrapper of the model, once built
        if plan is not None:
            _PLANNED.add(self)

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def upgrade_state_dict_named(self, state_dict: Dict[str, torch.Tensor], name: str) -> None:
        prefix = name[: -len("ipq")]
        swapped = adopt_state_structure_(self._root(), state_dict, prefix)
        if swapped:
            logger.info("ipq: %d compressed layers in the loaded state: %s", len(swapped), ", ".join(swapped))
            self.sync_distributed()

    def extra_repr(self) -> str:
        return "no plan" if self.plan is None else f"{len(self.plan.stages)} stages starting at {self.plan.stage_starts()}"

    # ------------------------------------------------------------------------------ stages
    def pending_groups(self, stage: int) -> List[List[Tuple[str, nn.Module]]]:
        """Groups of tied layers (``tied_layers``: one weight Parameter, every name holding it) still in
        full precision whose stage is ``stage``: the first stage matching any of their Linear / Embedding
        / Conv names.  A tied weight is quantized once, into one codebook its layers share."""
        todo = []
        for members in tied_layers(self._root()):
            stages = [i for i in (self.plan.rule_for(n)[0] for n, m in members if compressed_class(m, "pq")) if i >= 0]
            if stages and min(stages) == stage:
                todo.append(members)
        return todo

    def stages_left(self) -> bool:
        return self.plan is not None and any(self.pending_groups(i) for i in range(len(self.plan.stages)))

    def advance(self) -> None:
        """Quantize every stage whose start update has been reached and is not quantized yet."""
        swapped = False
        for i, start in enumerate(self.plan.stage_starts()):
            if self.num_updates < start:
                break
            todo = self.pending_groups(i)
            if not todo:
                continue
            rule, model = self.plan.stages[i], self._root()
            logger.info("ipq: stage %d (pattern %r) at update %d: quantizing %d weights", i, rule.pattern,
                        self.num_updates, len(todo))
            for members in todo:
                old = members[0][1].weight
                lead = next(n for n, m in members if compressed_class(m, rule.scheme))
                new = compress_tied(members, rule, seed=self.plan.layer_seed(lead))
                for name, layer in new:
                    set_submodule(model, name, layer)
                kept = [n for n, _ in members if n not in dict(new)]
                if len(new) > 1 or kept:
                    logger.info("ipq: tied weight of %s: one shared codebook%s", ", ".join(n for n, _ in new),
                                f"; {', '.join(kept)} read(s) its decoded weight (not a Linear/Embedding/Conv)"
                                if kept else "")
                self.pending.append(_Swap(weakref.ref(old), [layer for _, layer in new]))
                swapped = True
        if swapped:
            self.sync_distributed()

    # ------------------------------------------------------------------------------ distributed
    def sync_distributed(self) -> None:
        """After a swap, make fairseq's distributed wrapper all-reduce the model's current parameters:
        ``legacy_ddp`` lists them at wrap time (before checkpoints load, before any stage), so new
        centroids would never be averaged and ranks would drift.  PyTorch's DDP (``c10d``) fixes its
        parameters at wrap time too and cannot be told: refused with one line."""
        wrapper = self.wrapper() if self.wrapper is not None else None
        if wrapper is None:
            return
        from fairseq.distributed import LegacyDistributedDataParallel

        inner = wrapper
        while not isinstance(inner, LegacyDistributedDataParallel) and isinstance(getattr(inner, "module", None), nn.Module) \
                and inner.module is not self._root():
            inner = inner.module
        if not isinstance(inner, LegacyDistributedDataParallel):
            raise SystemExit(f"error: ipq: layers were quantized after fairseq wrapped the model in {type(inner).__name__}, "
                             f"which cannot take new parameters (the centroids would not be averaged across ranks); "
                             f"use --ddp-backend legacy_ddp for --ipq-plan and quantized checkpoints")
        per_device: Dict[torch.device, List[nn.Parameter]] = {}
        for p in inner.module.parameters():
            per_device.setdefault(p.device, []).append(p)
        inner.per_device_params = list(per_device.values())


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
        if not model.ipq.stages_left():
            raise SystemExit(f"error: --ipq-plan {path}: no stage pattern matches a Linear/Embedding/Conv layer; "
                             f"fix the patterns (regexes searched in module names)")
        model.register_forward_pre_hook(lambda module, inputs: module.ipq.advance() if module.training else None)
        logger.info("ipq plan %s: %s", path, model.ipq.extra_repr())
    return model


# --------------------------------------------------------------------------- the optimizer
@dataclass
class _Swap:
    old: weakref.ref  # the replaced weight: dead once nothing (no optimizer) holds it any more
    new: List[nn.Module]  # the compressed layers now in its place (several when the weight was tied)


_PLANNED: "weakref.WeakSet[IPQState]" = weakref.WeakSet()  # models with a plan: the only ones the hook looks at


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook: in every param group holding a replaced weight of a planned model, put the
    new layers' parameters in its place (model order) and drop the old weight and its state.
    Optimizers holding no replaced weight are not touched."""
    states = [s for s in list(_PLANNED) if s.pending]
    if not states:
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for state in states:
        state.pending = [s for s in state.pending if s.old() is not None]  # nothing holds it: nothing to swap
        mine = [s for s in state.pending if id(s.old()) in held]
        if mine and state._root() is not None:
            _swap(optimizer, mine, state._root(), held)
            state.pending = [s for s in state.pending if all(s is not m for m in mine)]


def _swap(optimizer: torch.optim.Optimizer, mine: List[_Swap], model: nn.Module, held: set) -> None:
    order: Dict[int, int] = {}
    for p in model.parameters():  # fairseq builds its optimizer in this order
        order.setdefault(id(p), len(order))
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        here = [s for s in mine if id(s.old()) in ids]
        if not here:
            continue
        fresh = {id(p): p for s in here for layer in s.new for p in layer.parameters(recurse=False)
                 if p.requires_grad and id(p) not in held}  # a shared codebook once
        held.update(fresh)
        olds = {id(s.old()) for s in here if id(s.old()) not in order}  # a weight still used elsewhere (tied) stays
        kept = [p for p in group["params"] if id(p) not in olds]
        group["params"] = sorted(kept + list(fresh.values()), key=lambda p: order.get(id(p), len(order)))
        for p in fresh.values():
            p.grad = None  # see the module docstring: not normalised / clipped on this step
    for s in mine:
        if id(s.old()) not in order:
            optimizer.state.pop(s.old(), None)


register_optimizer_step_pre_hook(_swap_in_optimizer)


def _refuse_fp32_copies(params) -> None:
    """fairseq's FP16Optimizer (``--fp16`` / ``--bf16`` without ``--memory-efficient-*``) steps fp32
    copies of the parameters it was built with: a stage quantized later would swap in centroids it
    never sees (they would silently not train).  Stop before training when a planned model has
    stages left."""
    ids = {id(p) for p in params if isinstance(p, torch.Tensor)}
    for state in list(_PLANNED):
        model = state._root()
        if model is not None and state.stages_left() and any(id(p) in ids for p in model.parameters()):
            raise SystemExit("error: --ipq-plan cannot run under fairseq's --fp16/--bf16 optimizer (it trains fp32 "
                             "copies, so layers quantized mid-run would never train); use fp32, --amp, or "
                             "--memory-efficient-fp16 / --memory-efficient-bf16")


def _install_fairseq_guards() -> None:
    """Wrap ``fairseq.optim.FP16Optimizer.build_optimizer`` (refuse it for a plan) and
    ``fairseq.models.DistributedFairseqModel`` (remember the wrapper, for ``sync_distributed``)."""
    from fairseq import models, optim

    build = optim.FP16Optimizer.build_optimizer
    if not getattr(build, "quantnoise", False):
        def build_optimizer(cls, cfg, params, **kwargs):
            params = list(params)
            _refuse_fp32_copies(params)
            return build.__func__(cls, cfg, params, **kwargs)

        build_optimizer.quantnoise = True
        optim.FP16Optimizer.build_optimizer = classmethod(build_optimizer)

    wrap = models.DistributedFairseqModel
    if not getattr(wrap, "quantnoise", False):
        def DistributedFairseqModel(args, model, process_group, device):
            wrapped = wrap(args, model, process_group, device)
            if isinstance(getattr(model, "ipq", None), IPQState):
                model.ipq.wrapper = weakref.ref(wrapped)
            return wrapped

        DistributedFairseqModel.quantnoise = True
        models.DistributedFairseqModel = DistributedFairseqModel


_install_fairseq_guards()


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
        except (ValueError, OSError, MemoryError) as e:  # a bad, forged, missing or too large .qnz: one line
            raise SystemExit(f"error: {e}") from None
        try:
            state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
            if arg_overrides is not None:
                overwrite_args_by_name(state["cfg"], arg_overrides)
            return checkpoint_utils._upgrade_state_dict(state)
        except Exception as e:  # the file's config, which omegaconf / fairseq reject their own ways  # noqa: BLE001
            first = (str(e).strip().splitlines() or [""])[0]
            raise SystemExit(f"error: {path}: its fairseq config is not one this fairseq loads ({type(e).__name__}: "
                             f"{first}); re-export it from a checkpoint this fairseq loads") from None

    load_checkpoint_to_cpu.quantnoise_qnz = True
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


_install_qnz_loader()
