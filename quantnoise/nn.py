"""Quant-Noise wrappers: subclasses of the layers they wrap, with the same ``weight``/``bias``.

What a block is, per layer (always ``block_size`` contiguous entries of a row of
``weight.reshape(out, -1)``, the layout iPQ uses):
  - ``Linear`` (out, in): ``block_size`` contiguous input features of one output row;
  - ``Embedding`` (num, dim): ``block_size`` contiguous entries of one embedding row;
  - ``Conv1d`` (out, in/g, k) and ``Conv2d`` (out, in/g, kh, kw): ``block_size`` contiguous entries
    of one filter flattened in (in, kh, kw) order; with ``block_size = kh*kw`` a block is one k x k
    kernel (fairseq's choice for k > 1), with ``block_size`` dividing ``in`` on a 1x1 conv it is a run
    of input channels.

Noise never writes the parameter: each forward builds a new weight tensor (fairseq's hook
overwrites ``weight.data``).  Observer and codebook state are non-persistent buffers: state dicts
have exactly the plain layer's keys, except the activation ranges of ``act_bits`` (Q8BERT's EMA ranges,
``qn_act_lo`` / ``qn_act_hi``), which a trained model is evaluated with and so are saved once set (a state
dict without them, written before they were saved, loads with one warning; a ``.qnz`` leaves them out).

Masks are a function of (cfg.seed, layer name, update, call) only, never of the rank, the batch
or the global RNG: ``update`` is the last number given to ``set_num_updates`` (fairseq calls it
before every micro-batch and after loading a checkpoint; 0 when nobody calls it) and ``call``
counts the training forwards since that number changed.  So a resumed fairseq run replays its
masks whatever ``--update-freq``, and without ``set_num_updates`` every training forward gets a
new mask.  A forward that activation checkpointing re-runs inside backward replays the keys of the
forwards since the previous backward, in order, so it sees the masks of the original forward.
Embedding masks are hashed per (key, row, block) (``functional.hashed_block_mask``), so a
vocabulary row gets the same mask whichever batch looks it up.

dtypes: the noised weight has the parameter's dtype (fp32, fp16, bf16); the arithmetic behind it
(scales, drop factors, k-means) runs in fp32 and is cast back saturating (quantnoise.functional).
Non-finite weights: on its first training forward (also after a resume), then every
``FINITE_CHECK_EVERY`` training forwards and at each pq codebook refresh, the layer checks its
weight and raises ``FloatingPointError`` naming the layer and the step; in between nothing is
checked (that would be a host sync on every forward).  Finite weights never give non-finite noise.
"""
from __future__ import annotations

import logging
import warnings
import zlib
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as QF
from .config import QuantNoiseConfig
from .grids import BLOCK as GRID_BLOCK, grid_noise
from .kmeans import kmeans

ACT_RANGES = ("qn_act_lo", "qn_act_hi")  # the EMA input ranges of act_bits, saved in state dicts

logger = logging.getLogger(__name__)

WRAPPERS: Dict[Type[nn.Module], Type["QuantNoiseMixin"]] = {}
FINITE_CHECK_EVERY = 1000  # training forwards between two checks that a noised weight is finite


def register_wrapper(base: Type[nn.Module]):
    """Class decorator: ``@register_wrapper(nn.Linear) class QNLinear(QuantNoiseMixin, nn.Linear)``."""

    def deco(cls):
        WRAPPERS[base] = cls
        cls.base_class = base
        return cls

    return deco


def wrapper_for(module: nn.Module) -> Optional[Type["QuantNoiseMixin"]]:
    """The wrapper class for ``module``: its own type or a subclass that keeps the base forward."""
    if isinstance(module, QuantNoiseMixin) or weight_is_computed(module):
        return None
    for base, cls in WRAPPERS.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def weight_is_computed(module: nn.Module) -> bool:
    """Whether the layer's weight is computed on each call (``torch.nn.utils.weight_norm``'s hook, or a
    parametrization such as ``parametrizations.weight_norm``), not a Parameter a wrapper could share."""
    from torch.nn.utils import parametrize
    w = getattr(module, "weight", None)
    return parametrize.is_parametrized(module) or (isinstance(w, torch.Tensor) and "weight" not in module._parameters)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` is in ``model`` (the layer swap of every verb)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _mix(*values: int) -> int:
    """A 63-bit seed from non-negative ints (splitmix64 chained over the values)."""
    h = 0
    for v in values:
        h = (h ^ v) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


def _in_backward() -> bool:
    """Whether we run inside autograd's backward (where activation checkpointing re-runs forwards)."""
    return torch._C._current_graph_task_id() != -1


def _keeps_fused_paths_off(module, args) -> None:
    """A no-op forward pre-hook on wrappers that quantize in eval: torch's fused encoder kernels
    (nn.TransformerEncoderLayer / TransformerEncoder in eval under no_grad) read the raw weights,
    and torch takes the module path instead whenever a submodule has a hook."""
    return None


class QuantNoiseMixin:
    """Shared noise machinery; the subclass supplies ``forward`` and ``_plain_kwargs``."""

    base_class: Type[nn.Module]
    weight: nn.Parameter

    # ---------------------------------------------------------------- construction
    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        self.qn_cfg = cfg
        self.qn_name = name
        self.qn_step = 0  # training forwards seen; drives pq codebook refreshes
        self.qn_update = 0  # last set_num_updates value: with qn_calls, the key of the masks
        self.qn_calls = 0  # training forwards since qn_update changed
        self._qn_phase = 0  # qn_calls at the first forward after the last backward that re-ran this layer
        self._qn_replay: Optional[list] = None  # [graph task, next call] while a backward re-runs forwards
        self._qn_codebook_of = None  # (weight storage, version, qn_step) the training codebook was built on
        self._qn_eval_of = None  # the same for the eval codebook
        self.qn_next_check = 0  # qn_step of the next non-finite weight check
        self._gen: Optional[torch.Generator] = None
        self.register_buffer("qn_codebook", None, persistent=False)
        self.register_buffer("qn_codes", None, persistent=False)
        self.register_buffer("qn_mask", None, persistent=False)
        self.register_buffer("qn_lo", None, persistent=False)
        self.register_buffer("qn_hi", None, persistent=False)
        self.register_buffer("qn_eval_codebook", None, persistent=False)
        self.register_buffer("qn_eval_codes", None, persistent=False)
        if cfg.eval_quantized:
            self.register_forward_pre_hook(_keeps_fused_paths_off)
        row = self._blocked_weight()[0].numel()
        if row % cfg.block_size:
            raise ValueError(
                f"layer '{name}' ({type(self).base_class.__name__}, weight {tuple(self.weight.shape)}): "
                f"block_size={cfg.block_size} does not divide its row length {row}; "
                f"use a block size that divides {row}, or exclude the layer"
            )
        out = self._blocked_weight().shape[0]
        if out % cfg.rows_per_scale:
            raise ValueError(
                f"layer '{name}' (weight {tuple(self.weight.shape)}): rows_per_scale={cfg.rows_per_scale} does not "
                f"divide its {out} output rows; use a divisor of {out}")
        if cfg.grid is not None and row % GRID_BLOCK:
            raise ValueError(
                f"layer '{name}' (weight {tuple(self.weight.shape)}): its row length {row} is not a multiple of "
                f"{GRID_BLOCK}, so it has no {cfg.grid} grid; exclude the layer or use grid=None")
        if cfg.scheme == "scalar" and cfg.granularity == "group" and row % cfg.group_size:
            raise ValueError(
                f"layer '{name}' (weight {tuple(self.weight.shape)}): group_size={cfg.group_size} does not "
                f"divide its row length {row}; use a group size that divides {row}, or exclude the layer"
            )

    @classmethod
    def from_float(cls, module: nn.Module, cfg: QuantNoiseConfig, name: str = ""):
        """Wrap ``module``: the wrapper shares its Parameter objects (optimizers keep working)."""
        if any(nn.parameter.is_lazy(t) for t in module.parameters(recurse=False)):
            raise ValueError(f"layer '{name}' ({type(module).__name__}) has uninitialized lazy parameters; "
                             f"run one forward pass before quantize_")
        new = cls(**module_kwargs(module), device="meta")
        new.weight = module.weight
        if getattr(module, "bias", None) is not None:
            new.bias = module.bias
        new.train(module.training)
        new._init_noise(cfg, name)
        new.qn_orig_class = type(module)
        return new

    def to_float(self) -> nn.Module:
        """The plain layer (its original class) with the same Parameter objects."""
        plain = getattr(self, "qn_orig_class", self.base_class)(**module_kwargs(self), device="meta")
        plain.weight = self.weight
        if getattr(self, "bias", None) is not None:
            plain.bias = self.bias
        return plain.train(self.training)

    def _blocked_weight(self) -> Tensor:
        """The weight as the (out, ...) rows whose blocks are noised (GPT-2's Conv1D: its (in, out) weight's .T)."""
        return self.weight

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this before every micro-batch with the update number (and after loading a
        checkpoint): masks are keyed on (update, forward within the update), so a resumed run
        draws the masks the uninterrupted run drew, whatever its number of micro-batches."""
        num_updates = int(num_updates)
        if num_updates != self.qn_update:
            self.qn_update, self.qn_calls = num_updates, 0
        self._qn_phase, self._qn_replay = self.qn_calls, None  # a new micro-batch starts here
        self.qn_step = max(self.qn_step, num_updates)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        old = False
        for name in ACT_RANGES:  # saved once set (None: not in a state dict): make room for the loaded ones
            if name not in self._buffers or name in self._non_persistent_buffers_set:
                continue
            value = state_dict.get(prefix + name)
            if value is not None:
                if self._buffers[name] is None or self._buffers[name].shape != value.shape:
                    self._buffers[name] = torch.empty(value.shape, dtype=torch.float32, device=self.weight.device)
            elif self._buffers[name] is not None:  # a state dict from before the ranges were saved
                self._buffers[name], old = None, True
        if old:
            warnings.warn("quant-noise: the state dict holds no activation ranges (qn_act_lo / qn_act_hi: written "
                          "before quantnoise saved them); the layers evaluate with each batch's range until trained")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # codebooks and observed ranges describe the old weights: rebuild them from the new ones
        self.qn_codebook = self.qn_codes = self.qn_lo = self.qn_hi = self.qn_eval_codebook = self.qn_eval_codes = None

    # ---------------------------------------------------------------- noise
    def _active_p(self) -> float:
        if self.training:
            return self.qn_cfg.p
        return 1.0 if self.qn_cfg.eval_quantized else 0.0

    def _next_key(self) -> int:
        """The mask seed of this training forward, from (cfg.seed, layer, update, call).  A forward
        run inside backward is activation checkpointing recomputing: it replays, in order, the
        calls made since the previous backward, instead of drawing new ones."""
        if not _in_backward():
            if self._qn_replay is not None:  # first forward after a backward that re-ran this layer
                self._qn_replay, self._qn_phase = None, self.qn_calls
            call = self.qn_calls
            self.qn_calls += 1
            self.qn_step += 1
        else:
            task = torch._C._current_graph_task_id()
            if self._qn_replay is None or self._qn_replay[0] != task:
                self._qn_replay = [task, self._qn_phase]
            call = min(self._qn_replay[1], max(self.qn_calls - 1, 0))
            self._qn_replay[1] += 1
        return _mix(self.qn_cfg.seed, _stable_hash(self.qn_name), self.qn_update, call)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        return self._gen.manual_seed(seed)

    def _block_mask(self, seed: int, n_rows: int, nb: int, p: float, device, rows: Optional[Tensor]) -> Tensor:
        """(n_rows, nb) bool, True = noise this block."""
        return QF.block_mask(n_rows, nb, p, self._generator(device, seed), device, out=self.qn_mask)

    def _drop_factors(self, seed: int, n_rows: int, nb: int, p: float, w: Tensor, rows: Optional[Tensor]) -> Tensor:
        """(n_rows, nb) factors of drop noise: 0 (dropped) or 1/(1-p)."""
        return QF.drop_factors(n_rows, nb, p, self._generator(w.device, seed), w.device, QF.compute_dtype(w.dtype),
                               out=self.qn_mask)

    def noisy(self, w: Tensor, p: float, rows: Optional[Tensor] = None) -> Tensor:
        """``w`` (rows of this layer's weight: all of them, or those indexed by ``rows``) with a
        Bernoulli(p) subset of its blocks noised; gradients pass straight through to ``w``."""
        cfg, bs = self.qn_cfg, self.qn_cfg.block_size
        with torch.no_grad():
            wd = w.detach()
            n_rows, nb = w.shape[0], w[0].numel() // bs
            original = self.training and not _in_backward()  # not a checkpointing recompute
            refresh = original and self.qn_step % cfg.refresh_every == 0
            if original and self.qn_step >= self.qn_next_check:
                self._check_finite()  # pq also checks before each k-means
                self.qn_next_check = self.qn_step + FINITE_CHECK_EVERY
            seed = self._next_key() if self.training else _mix(cfg.seed, _stable_hash(self.qn_name), self.qn_update,
                                                               self.qn_calls)
            if cfg.scheme == "drop":  # the reusable buffer holds per-block factors: 0 or 1/(1-p), fp32
                self.qn_mask = self._drop_factors(seed, n_rows, nb, p, w, rows)
                out = QF.drop_blocks(wd, self.qn_mask, bs)
            elif cfg.scheme == "scalar" and cfg.grid is not None:  # llama.cpp's grid: blocks of 32, fp16 scales
                self.qn_mask = self._block_mask(seed, n_rows, nb, p, w.device, rows)
                out = grid_noise(wd, self.qn_mask, cfg.grid, bs)
            elif cfg.scheme == "scalar":
                self.qn_mask = self._block_mask(seed, n_rows, nb, p, w.device, rows)
                scale, zero = self._scalar_qparams(wd, observe=original, rows=rows)
                out = QF.scalar_blocks(wd, self.qn_mask, scale, zero, cfg.qmin, cfg.qmax, cfg.granularity,
                                       cfg.group_size, bs)
            else:
                self.qn_mask = self._block_mask(seed, n_rows, nb, p, w.device, rows)
                centroids, codes = self._codebook(refresh)
                if rows is not None:  # codes of the looked-up rows only
                    codes = codes.view(self.weight.shape[0], -1)[rows].reshape(-1)
                out = QF.pq_blocks(wd, self.qn_mask, centroids.to(wd.dtype), codes, bs)
                out = self._keep_padding_row(out, wd, rows)
        return QF.straight_through(w, out)

    def _check_finite(self) -> None:
        """Raise FloatingPointError when the weight holds NaN/inf (one host sync)."""
        w = self.weight.detach()
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            big = f"; fp16 holds |w| <= {torch.finfo(w.dtype).max:g}" if w.dtype == torch.float16 else ""
            raise FloatingPointError(
                f"layer '{self.qn_name}' ({type(self).base_class.__name__}, weight {tuple(w.shape)} {w.dtype}) has "
                f"{bad} NaN/inf weights at step {self.qn_step}{big}: training diverged; lower the learning rate, "
                f"clip gradients, or train with bf16/fp32 weights (--bf16, --amp), then resume from a good checkpoint")

    def _keep_padding_row(self, out: Tensor, w: Tensor, rows: Optional[Tensor]) -> Tensor:
        """An embedding's ``padding_idx`` row (all zero in fairseq, never trained) stays as it is:
        a centroid would make it non-zero."""
        pad = getattr(self, "padding_idx", None)
        if pad is None:
            return out
        ids = rows if rows is not None else torch.arange(out.shape[0], device=out.device)
        return torch.where((ids == pad).view(-1, *[1] * (out.dim() - 1)), w, out)

    def _scalar_qparams(self, w: Tensor, observe: bool, rows: Optional[Tensor] = None):
        cfg = self.qn_cfg
        if cfg.clip == "mse":  # searched on the current weights every forward, as compress_ does on the final ones
            a = self._mse_range(w, rows)
            return QF.scalar_qparams(-a, a, cfg.bits, cfg.symmetric)
        if cfg.rows_per_scale > 1:  # group-wise: a group's range over all its rows (an embedding's whole table)
            lo, hi = QF.row_group_minmax(w if rows is None else self._blocked_weight().detach(), cfg.rows_per_scale)
            if rows is not None:
                lo, hi = lo[rows], hi[rows]
        else:
            src = self.weight.detach() if cfg.granularity == "tensor" else w  # per-tensor: whole table
            lo, hi = QF.minmax(src, cfg.granularity, cfg.group_size)
        lo, hi = lo.to(QF.compute_dtype(lo.dtype)), hi.to(QF.compute_dtype(hi.dtype))  # fp32 range and EMA state
        if cfg.observer == "ema":
            lo, hi = self._ema(lo, hi, observe)
        return QF.scalar_qparams(lo, hi, cfg.bits, cfg.symmetric)

    def _mse_range(self, w: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """MSE-clipped max|w| per scale group (``QF.mse_clip``), shaped like ``QF.minmax``'s output."""
        cfg = self.qn_cfg
        if cfg.rows_per_scale > 1:  # a group's search over all its rows, as scalar_quantize's
            full = w if rows is None else self._blocked_weight().detach()
            a = QF.mse_clip(full.reshape(full.shape[0] // cfg.rows_per_scale, -1), cfg.bits)  # (G, 1)
            a = a.repeat_interleave(cfg.rows_per_scale, 0).unsqueeze(-1)  # (out, 1, 1)
            return a if rows is None else a[rows]
        src = self.weight.detach() if cfg.granularity == "tensor" else w  # per-tensor: whole table
        return QF.mse_clip(QF.group_view(src, cfg.granularity, cfg.group_size), cfg.bits)

    def _ema(self, lo: Tensor, hi: Tensor, observe: bool):
        """Exponential moving average of the range, updated on training forwards only (not when
        activation checkpointing re-runs one: that forward must see the range the original saw)."""
        if observe:
            if self.qn_lo is None:
                self.qn_lo, self.qn_hi = lo.clone(), hi.clone()
            else:
                if self.qn_lo.dtype != lo.dtype:  # the model was cast (.half()): the state stays fp32
                    self.qn_lo, self.qn_hi = self.qn_lo.to(lo.dtype), self.qn_hi.to(hi.dtype)
                self.qn_lo.lerp_(lo, self.qn_cfg.ema_momentum)
                self.qn_hi.lerp_(hi, self.qn_cfg.ema_momentum)
        return (lo, hi) if self.qn_lo is None else (self.qn_lo, self.qn_hi)

    def _codebook(self, refresh: bool = False):
        """(centroids (k, bs), codes (n_blocks,) uint8/int16/int32): k-means of the weight blocks.

        Training: rebuilt every ``refresh_every`` training forwards (``refresh``); in between every
        block keeps the centroid it was nearest to at the last refresh (the assignment iPQ
        fine-tuning also keeps fixed).  Eval (``eval_quantized``): a codebook of the current
        weights, rebuilt when they changed since the last one, i.e. when the weight's storage or
        version counter (bumped by in-place writes to the Parameter: torch optimizers,
        load_state_dict) or the training forward count (fairseq's optimizers write ``p.data``,
        after a training forward) moved; it is kept apart, so evaluating never changes training."""
        stamp = (self.weight.data_ptr(), self.weight._version, self.qn_step)
        if self.training or self.qn_codebook is not None and stamp == self._qn_codebook_of:
            if self.qn_codebook is None or (self.training and refresh):
                self.qn_codebook, self.qn_codes = self._kmeans()
                self._qn_codebook_of = stamp
            return self.qn_codebook, self.qn_codes
        if self.qn_eval_codebook is None or stamp != self._qn_eval_of:
            self.qn_eval_codebook, self.qn_eval_codes = self._kmeans()
            self._qn_eval_of = stamp
        return self.qn_eval_codebook, self.qn_eval_codes

    def _kmeans(self):
        cfg = self.qn_cfg
        if self.training:
            self._check_finite()
        w = QF.blocks(self._blocked_weight().detach(), cfg.block_size).reshape(-1, cfg.block_size)
        k = min(cfg.n_centroids, w.shape[0])
        if k < cfg.n_centroids and self.qn_codebook is None and self.qn_eval_codebook is None:
            logger.info("layer %s has %d blocks: pq codebook capped at %d centroids", self.qn_name, w.shape[0], k)
        seed = cfg.seed + _stable_hash(self.qn_name) + self.qn_step // cfg.refresh_every
        centroids, codes = kmeans(w, k, niter=cfg.kmeans_iters, seed=seed, name=f"layer '{self.qn_name}'")
        code_dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32
        return centroids, codes.to(code_dtype)

    def extra_repr(self) -> str:
        c = self.qn_cfg
        detail = {"drop": "", "scalar": f", grid={c.grid}" if c.grid else f", bits={c.bits}, {c.granularity}" + (f"/{c.rows_per_scale} rows" if c.rows_per_scale > 1 else ""), "pq": f", centroids={c.n_centroids}"}
        return f"{super().extra_repr()}, quant_noise={c.scheme}(p={c.p}, block={c.block_size}{detail[c.scheme]})"


def module_kwargs(m: nn.Module) -> dict:
    """Constructor arguments that rebuild ``m``'s layer type (weights excluded)."""
    if isinstance(m, nn.Linear):
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                    dtype=m.weight.dtype)
    if isinstance(m, nn.Embedding):
        return dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx,
                    max_norm=m.max_norm, norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq,
                    sparse=m.sparse, dtype=m.weight.dtype)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None, padding_mode=m.padding_mode, dtype=m.weight.dtype)
    raise TypeError(f"no quant-noise wrapper for {type(m).__name__}")


@register_wrapper(nn.Linear)
class QNLinear(QuantNoiseMixin, nn.Linear):
    """With ``cfg.act_bits`` set, the input is also fake-quantized (Q8BERT, Zafrir et al. 2019), the
    gradient passed straight through, independent of the weight noise (activations always quantized).
    ``cfg.act_granularity``: ``tensor`` (Q8BERT) one scale, ``channel`` one per input feature, both from
    an EMA of the range updated on training forwards and frozen in eval; ``token`` one per row, from
    the row itself on every forward (dynamic, no state)."""

    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        super()._init_noise(cfg, name)
        self.register_buffer("qn_act_lo", None)  # EMA of the input range: 0-d or (in,); saved once set
        self.register_buffer("qn_act_hi", None)

    def forward(self, x: Tensor) -> Tensor:
        p = self._active_p()
        w = self.weight if p == 0.0 else self.noisy(self.weight, p)
        if self.qn_cfg.act_bits is not None:
            x = self.quantize_input(x)
        return F.linear(x, w, self.bias)

    def quantize_input(self, x: Tensor) -> Tensor:
        """x on the act_bits grid.  tensor / channel: in training the EMA range is updated by this batch
        first (the first batch sets it), then used; in eval the frozen range (this batch's own if none
        was ever set).  token: this batch's rows' own ranges, always."""
        cfg = self.qn_cfg
        dynamic = cfg.act_granularity == "token"
        with torch.no_grad():
            if dynamic or self.training or self.qn_act_lo is None:
                lo, hi = QF.activation_range(x, cfg.act_symmetric, cfg.act_granularity)
            if not dynamic and self.training and not _in_backward():  # not an activation-checkpointing recompute
                if self.qn_act_lo is None:
                    self.qn_act_lo, self.qn_act_hi = lo.float(), hi.float()
                else:
                    self.qn_act_lo.lerp_(lo.float(), cfg.act_ema_momentum)
                    self.qn_act_hi.lerp_(hi.float(), cfg.act_ema_momentum)
            if not dynamic and self.qn_act_lo is not None:
                lo, hi = self.qn_act_lo, self.qn_act_hi
        return QF.fake_quantize_activation(x, lo, hi, cfg.act_bits, cfg.act_symmetric)


@register_wrapper(nn.Embedding)
class QNEmbedding(QuantNoiseMixin, nn.Embedding):
    """Noises only the rows the batch looks up (each distinct row once, so a repeated id sees the
    same noise); per-tensor scalar scales still come from the whole table.  A row's mask is hashed
    from (seed, layer, update, call, row), so it does not depend on the batch: every rank (and
    every batch) noises a vocabulary row the same way at the same step."""

    def _block_mask(self, seed: int, n_rows: int, nb: int, p: float, device, rows: Optional[Tensor]) -> Tensor:
        rows = torch.arange(n_rows, device=device) if rows is None else rows
        return QF.hashed_block_mask(seed, rows, nb, p)

    def _drop_factors(self, seed: int, n_rows: int, nb: int, p: float, w: Tensor, rows: Optional[Tensor]) -> Tensor:
        keep = ~self._block_mask(seed, n_rows, nb, p, w.device, rows)
        return keep.to(QF.compute_dtype(w.dtype)).mul_(1.0 / (1.0 - p))

    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        super()._init_noise(cfg, name)
        if cfg.scheme == "scalar" and cfg.observer == "ema" and cfg.granularity != "tensor":
            raise ValueError(
                f"layer '{name}' (Embedding): observer=ema needs granularity=tensor here (only the looked-up "
                f"rows are seen per step); use granularity=tensor or observer=minmax"
            )

    def forward(self, ids: Tensor) -> Tensor:
        p = self._active_p()
        if p == 0.0:
            return super().forward(ids)
        if self.scale_grad_by_freq:  # frequencies are lost by the unique() below: noise the table
            return F.embedding(ids, self.noisy(self.weight, p), self.padding_idx, self.max_norm,
                               self.norm_type, True, self.sparse)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = F.embedding(uniq, self.weight, self.padding_idx, self.max_norm, self.norm_type, False, self.sparse)
        return F.embedding(inverse, self.noisy(rows, p, uniq))  # (..., dim)


@register_wrapper(nn.Conv1d)
class QNConv1d(QuantNoiseMixin, nn.Conv1d):
    def forward(self, x: Tensor) -> Tensor:
        p = self._active_p()
        return self._conv_forward(x, self.weight if p == 0.0 else self.noisy(self.weight, p), self.bias)


@register_wrapper(nn.Conv2d)
class QNConv2d(QuantNoiseMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        p = self._active_p()
        return self._conv_forward(x, self.weight if p == 0.0 else self.noisy(self.weight, p), self.bias)


@register_wrapper(nn.MultiheadAttention)
class QNMultiheadAttention(QuantNoiseMixin, nn.MultiheadAttention):
    """PyTorch's attention keeps q/k/v packed in the parameter ``in_proj_weight`` (3E, E) and reads
    ``out_proj.weight`` directly, so no Linear wrapper would ever run there.  This wrapper noises
    ``in_proj_weight`` (blocks along E) and, when ``out_proj`` is itself wrapped, asks it for its
    noisy weight, then calls ``F.multi_head_attention_forward`` with both.  Needs q/k/v of the
    same size (kdim = vdim = embed_dim), the packed layout; ``bias_k``/``bias_v`` (add_bias_kv)
    and ``add_zero_attn`` are carried over.  With ``eval_quantized``, torch's fused encoder path
    is kept off (see ``_keeps_fused_paths_off``) and the nested tensors nn.TransformerEncoder
    then hands its layers (eval, padding mask) are run padded."""

    @property
    def weight(self) -> nn.Parameter:  # the mixin's "weight": the packed input projection
        return self.in_proj_weight

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, cfg: QuantNoiseConfig, name: str = ""):
        if not module._qkv_same_embed_dim:
            raise ValueError(f"layer '{name}' (MultiheadAttention with kdim/vdim != embed_dim): separate q/k/v "
                             f"weights are not supported; exclude it (its out_proj can still be noised)")
        new = cls(**_mha_kwargs(module), device="meta")
        for pname, param in module._parameters.items():
            new.register_parameter(pname, param)
        for mname, child in module._modules.items():
            setattr(new, mname, child)
        new.train(module.training)
        new._init_noise(cfg, name)
        return new

    def to_float(self) -> nn.MultiheadAttention:
        plain = nn.MultiheadAttention(**_mha_kwargs(self), device="meta")
        for pname, param in self._parameters.items():
            plain.register_parameter(pname, param)
        for mname, child in self._modules.items():
            setattr(plain, mname, child)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + super().extra_repr().lstrip(", ")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        p = self._active_p()
        out_proj = self.out_proj
        out_p = out_proj._active_p() if isinstance(out_proj, QuantNoiseMixin) else 0.0
        if p == 0.0 and out_p == 0.0:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if query.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        in_w = self.noisy(self.in_proj_weight, p) if p > 0.0 else self.in_proj_weight
        out_w = out_proj.noisy(out_proj.weight, out_p) if out_p > 0.0 else out_proj.weight
        swap = self.batch_first and query.dim() == 3
        if swap:  # (B, T, E) -> (T, B, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_w, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, out_w, out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if swap else out), weights

    def _nested_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                        is_causal):
        """Self-attention on a nested (B, T_i, E) tensor, run padded with the matching key padding
        mask; returns a nested tensor like torch's fused path does."""
        if not (query is key is value and key_padding_mask is None and self.batch_first):
            raise ValueError(f"layer '{self.qn_name}': a nested tensor is accepted only as batch_first self-attention "
                             f"without key_padding_mask (what nn.TransformerEncoder passes); pass a padded tensor "
                             f"and key_padding_mask instead")
        lengths = [t.shape[0] for t in query.unbind()]
        x = torch.nested.to_padded_tensor(query, 0.0)  # (B, T, E)
        pad = torch.arange(x.shape[1], device=x.device) >= torch.tensor(lengths, device=x.device).unsqueeze(1)  # (B, T)
        out, weights = self.forward(x, x, x, key_padding_mask=pad, need_weights=need_weights, attn_mask=attn_mask,
                                    average_attn_weights=average_attn_weights, is_causal=is_causal)
        return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)]), weights


def _mha_kwargs(m: nn.MultiheadAttention) -> dict:
    """Constructor arguments that rebuild ``m`` (packed q/k/v layout; weights excluded)."""
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, batch_first=m.batch_first,
                dtype=m.in_proj_weight.dtype)
