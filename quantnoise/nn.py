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
overwrites ``weight.data``).  Masks come from a per-layer generator seeded with
(cfg.seed, layer name, step), so runs repeat exactly and successive steps differ.  Observer and
codebook state are non-persistent buffers: state dicts have exactly the plain layer's keys.
"""
from __future__ import annotations

import logging
import zlib
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as QF
from .config import QuantNoiseConfig
from .kmeans import kmeans

logger = logging.getLogger(__name__)

WRAPPERS: Dict[Type[nn.Module], Type["QuantNoiseMixin"]] = {}


def register_wrapper(base: Type[nn.Module]):
    """Class decorator: ``@register_wrapper(nn.Linear) class QNLinear(QuantNoiseMixin, nn.Linear)``."""

    def deco(cls):
        WRAPPERS[base] = cls
        cls.base_class = base
        return cls

    return deco


def wrapper_for(module: nn.Module) -> Optional[Type["QuantNoiseMixin"]]:
    """The wrapper class for ``module``: its own type or a subclass that keeps the base forward."""
    if isinstance(module, QuantNoiseMixin):
        return None
    for base, cls in WRAPPERS.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


class QuantNoiseMixin:
    """Shared noise machinery; the subclass supplies ``forward`` and ``_plain_kwargs``."""

    base_class: Type[nn.Module]
    weight: nn.Parameter

    # ---------------------------------------------------------------- construction
    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        self.qn_cfg = cfg
        self.qn_name = name
        self.qn_step = 0  # training forwards seen; drives masks and codebook refreshes
        self._gen: Optional[torch.Generator] = None
        self.register_buffer("qn_codebook", None, persistent=False)
        self.register_buffer("qn_codes", None, persistent=False)
        self.register_buffer("qn_mask", None, persistent=False)
        self.register_buffer("qn_lo", None, persistent=False)
        self.register_buffer("qn_hi", None, persistent=False)
        row = self.weight[0].numel()
        if row % cfg.block_size:
            raise ValueError(
                f"layer '{name}' ({type(self).base_class.__name__}, weight {tuple(self.weight.shape)}): "
                f"block_size={cfg.block_size} does not divide its row length {row}; "
                f"use a block size that divides {row}, or exclude the layer"
            )
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

    def set_num_updates(self, num_updates: int) -> None:
        """fairseq calls this after every update (and on resume): a resumed run continues the mask
        sequence instead of replaying it from step 0."""
        self.qn_step = max(self.qn_step, int(num_updates))

    # ---------------------------------------------------------------- noise
    def _active_p(self) -> float:
        if self.training:
            return self.qn_cfg.p
        return 1.0 if self.qn_cfg.eval_quantized else 0.0

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
        seed = (self.qn_cfg.seed * 1_000_003 + _stable_hash(self.qn_name)) * 1_000_033 + self.qn_step
        return self._gen.manual_seed(seed % (2**63))

    def noisy(self, w: Tensor, p: float, rows: Optional[Tensor] = None) -> Tensor:
        """``w`` (rows of this layer's weight: all of them, or those indexed by ``rows``) with a
        Bernoulli(p) subset of its blocks noised; gradients pass straight through to ``w``."""
        cfg, bs = self.qn_cfg, self.qn_cfg.block_size
        with torch.no_grad():
            wd = w.detach()
            n_rows, nb, gen = w.shape[0], w[0].numel() // bs, self._generator(w.device)
            if cfg.scheme == "drop":  # the reusable buffer holds per-block factors: 0 or 1/(1-p)
                self.qn_mask = QF.drop_factors(n_rows, nb, p, gen, w.device, w.dtype, out=self.qn_mask)
                out = QF.drop_blocks(wd, self.qn_mask, bs)
            elif cfg.scheme == "scalar":
                self.qn_mask = QF.block_mask(n_rows, nb, p, gen, w.device, out=self.qn_mask)
                scale, zero = self._scalar_qparams(wd)
                out = QF.scalar_blocks(wd, self.qn_mask, scale, zero, cfg.qmin, cfg.qmax, cfg.granularity,
                                       cfg.group_size, bs)
            else:
                self.qn_mask = QF.block_mask(n_rows, nb, p, gen, w.device, out=self.qn_mask)
                centroids, codes = self._codebook()
                if rows is not None:  # codes of the looked-up rows only
                    codes = codes.view(self.weight.shape[0], -1)[rows].reshape(-1)
                out = QF.pq_blocks(wd, self.qn_mask, centroids.to(wd.dtype), codes, bs)
        if self.training:
            self.qn_step += 1
        return QF.straight_through(w, out)

    def _scalar_qparams(self, w: Tensor):
        cfg = self.qn_cfg
        src = self.weight.detach() if cfg.granularity == "tensor" else w  # per-tensor: whole table
        lo, hi = QF.minmax(src, cfg.granularity, cfg.group_size)
        if cfg.observer == "ema":
            lo, hi = self._ema(lo, hi)
        return QF.scalar_qparams(lo, hi, cfg.bits, cfg.symmetric)

    def _ema(self, lo: Tensor, hi: Tensor):
        """Exponential moving average of the range, updated on training forwards only."""
        if self.training:
            if self.qn_lo is None:
                self.qn_lo, self.qn_hi = lo.clone(), hi.clone()
            else:
                self.qn_lo.lerp_(lo, self.qn_cfg.ema_momentum)
                self.qn_hi.lerp_(hi, self.qn_cfg.ema_momentum)
        return (lo, hi) if self.qn_lo is None else (self.qn_lo, self.qn_hi)

    def _codebook(self):
        """(centroids (k, bs), codes (n_blocks,) uint8/int16/int32): k-means of the current weight
        blocks, rebuilt every ``refresh_every`` training forwards; every block keeps the centroid it
        was nearest to at the last refresh (the assignment iPQ fine-tuning also keeps fixed)."""
        cfg = self.qn_cfg
        stale = self.training and self.qn_step % cfg.refresh_every == 0
        if self.qn_codebook is None or stale:
            w = QF.blocks(self.weight.detach(), cfg.block_size).reshape(-1, cfg.block_size)
            k = min(cfg.n_centroids, w.shape[0])
            if k < cfg.n_centroids and self.qn_codebook is None:
                logger.info("layer %s has %d blocks: pq codebook capped at %d centroids", self.qn_name, w.shape[0], k)
            seed = cfg.seed + _stable_hash(self.qn_name) + self.qn_step // cfg.refresh_every
            centroids, codes = kmeans(w, k, niter=cfg.kmeans_iters, seed=seed, name=f"layer '{self.qn_name}'")
            code_dtype = torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32
            self.qn_codebook, self.qn_codes = centroids, codes.to(code_dtype)
        return self.qn_codebook, self.qn_codes

    def extra_repr(self) -> str:
        c = self.qn_cfg
        detail = {"drop": "", "scalar": f", bits={c.bits}, {c.granularity}", "pq": f", centroids={c.n_centroids}"}
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
    """With ``cfg.act_bits`` set, the input is also fake-quantized (Q8BERT, Zafrir et al. 2019): one
    per-tensor scale from an EMA of its range, updated on training forwards and frozen in eval, the
    gradient passed straight through; independent of the weight noise (activations always quantized)."""

    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        super()._init_noise(cfg, name)
        self.register_buffer("qn_act_lo", None, persistent=False)  # 0-d EMA of the input range
        self.register_buffer("qn_act_hi", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        p = self._active_p()
        w = self.weight if p == 0.0 else self.noisy(self.weight, p)
        if self.qn_cfg.act_bits is not None:
            x = self.quantize_input(x)
        return F.linear(x, w, self.bias)

    def quantize_input(self, x: Tensor) -> Tensor:
        """x on the act_bits grid.  Training: the EMA range is updated by this batch first (the first
        batch sets it), then used; eval: the frozen range (this batch's own if none was ever set)."""
        cfg = self.qn_cfg
        with torch.no_grad():
            if self.training or self.qn_act_lo is None:
                lo, hi = QF.activation_range(x, cfg.act_symmetric)
            if self.training:
                if self.qn_act_lo is None:
                    self.qn_act_lo, self.qn_act_hi = lo.float(), hi.float()
                else:
                    self.qn_act_lo.lerp_(lo.float(), cfg.act_ema_momentum)
                    self.qn_act_hi.lerp_(hi.float(), cfg.act_ema_momentum)
            if self.qn_act_lo is not None:
                lo, hi = self.qn_act_lo, self.qn_act_hi
            scale, zero = QF.scalar_qparams(lo.float(), hi.float(), cfg.act_bits, cfg.act_symmetric)
            q = QF.fake_quantize_values(x.detach(), scale.to(x.dtype), zero.to(x.dtype), cfg.act_qmin, cfg.act_qmax)
        return QF.straight_through(x, q)


@register_wrapper(nn.Embedding)
class QNEmbedding(QuantNoiseMixin, nn.Embedding):
    """Noises only the rows the batch looks up (each distinct row once, so a repeated id sees the
    same noise); per-tensor scalar scales still come from the whole table."""

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
    same size (kdim = vdim = embed_dim), the packed layout."""

    @property
    def weight(self) -> nn.Parameter:  # the mixin's "weight": the packed input projection
        return self.in_proj_weight

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, cfg: QuantNoiseConfig, name: str = ""):
        if not module._qkv_same_embed_dim:
            raise ValueError(f"layer '{name}' (MultiheadAttention with kdim/vdim != embed_dim): separate q/k/v "
                             f"weights are not supported; exclude it (its out_proj can still be noised)")
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout, bias=module.in_proj_bias is not None,
                  batch_first=module.batch_first, device="meta")
        for pname, param in module._parameters.items():
            new.register_parameter(pname, param)
        for mname, child in module._modules.items():
            setattr(new, mname, child)
        new.add_zero_attn = module.add_zero_attn
        new.train(module.training)
        new._init_noise(cfg, name)
        return new

    def to_float(self) -> nn.MultiheadAttention:
        plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, batch_first=self.batch_first,
                                      bias=self.in_proj_bias is not None, device="meta")
        for pname, param in self._parameters.items():
            plain.register_parameter(pname, param)
        for mname, child in self._modules.items():
            setattr(plain, mname, child)
        plain.add_zero_attn = self.add_zero_attn
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
        in_w = self.noisy(self.in_proj_weight, p) if p > 0.0 else self.in_proj_weight
        out_w = out_proj.noisy(out_proj.weight, out_p) if out_p > 0.0 else out_proj.weight
        if self.batch_first:  # (B, T, E) -> (T, B, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_w, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, out_w, out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if self.batch_first else out), weights
