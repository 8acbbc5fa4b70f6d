"""Iterative product quantization, iPQ (Stock et al. 2020, "And the Bit Goes Down"), as used by
Quant-Noise (Fan et al. 2020, sec. 4): layers that *are* codes + a codebook.

A weight W (out, ...) is cut into blocks b_i of ``block_size`` contiguous entries of a row of
``W.reshape(out, -1)`` (the layout of quantnoise.nn); k-means gives a codebook C (k, block_size)
and codes c (n_blocks,); the layer computes with W_hat = C[c].  Fine-tuning trains C only, with
the update of Stock et al. eq. (6): the gradient of a centroid is the *mean* of the gradients of
the blocks assigned to it,  dL/dC_j = 1/|{i: c_i=j}| * sum_{i: c_i=j} dL/db_i.

Scalar layers (int ``bits``, one scale per output row, Jacob et al. 2018) are the other compressed
kind; they are frozen (no trainable weight).  Both kinds subclass the layer they replace and expose
``weight`` as a property (the decoded tensor), so the base ``forward`` and any code reading
``module.weight`` (fairseq's attention fast path) keep working; their state dicts hold
``codes``/``centroids`` (pq) or ``qweight``/``qscale``/``qbits`` (scalar), plus ``weight_size``, instead
of ``weight``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from . import functional as QF
from .config import is_int, regex_error
from .kmeans import kmeans

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- pure functions
def codes_dtype(k: int) -> torch.dtype:
    """Fewest bytes that hold a code in [0, k)."""
    if k <= 256:
        return torch.uint8
    if k <= 2**15:
        return torch.int16
    return torch.int32


def pq_quantize(w: Tensor, block_size: int, n_centroids: int, niter: int = 20, seed: int = 0,
                name: str = "weight") -> Tuple[Tensor, Tensor]:
    """k-means codebook of w's blocks: (codes (n_blocks,) uint8|int16, centroids (k, block_size) fp32).
    ``k`` is capped at the number of blocks.  Raises ValueError when block_size does not divide a row."""
    row = w[0].numel()
    if row % block_size:
        raise ValueError(f"{name} (shape {tuple(w.shape)}): block_size={block_size} does not divide its row "
                         f"length {row}; use a block size that divides {row}, or exclude the layer")
    x = QF.blocks(w.detach().float(), block_size).reshape(-1, block_size)  # (n_blocks, bs)
    k = min(n_centroids, x.shape[0])
    centroids, codes = kmeans(x, k, niter=niter, seed=seed, name=name)
    return codes.to(codes_dtype(k)), centroids


def scalar_quantize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Symmetric per-row integer weights: (q (out, row) int8 in [-(2^(b-1)-1), 2^(b-1)-1],
    scale (out, 1) fp32); w_hat = q * scale."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    lo, hi = QF.minmax(rows, "channel", 1)
    scale, _ = QF.scalar_qparams(lo, hi, bits, symmetric=True)  # (out, 1, 1)
    qmax = 2 ** (bits - 1) - 1
    q = torch.round(rows / scale[:, 0]).clamp_(-qmax, qmax)
    return q.to(torch.int8), scale[:, 0]


def scalar_decode(q: Tensor, scale: Tensor, shape) -> Tensor:
    return (q.float() * scale).reshape(shape)


class _PQDecode(torch.autograd.Function):
    """centroids[codes] forward; backward gives each centroid the mean gradient of its blocks."""

    @staticmethod
    def forward(ctx, centroids: Tensor, codes: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(codes, counts)
        ctx.k = centroids.shape[0]
        return centroids[codes]  # (n_blocks, bs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        codes, counts = ctx.saved_tensors
        g = grad.new_zeros(ctx.k, grad.shape[1]).index_add_(0, codes, grad)  # (k, bs) sums
        return g / counts.clamp_min(1).unsqueeze(1).to(g.dtype), None, None


def pq_weight(centroids: Tensor, codes: Tensor, shape, counts: Optional[Tensor] = None) -> Tensor:
    """Decoded weight of ``shape``; differentiable w.r.t. ``centroids`` with the mean-gradient rule."""
    idx = codes.long()
    if counts is None:
        counts = torch.bincount(idx, minlength=centroids.shape[0])
    return _PQDecode.apply(centroids, idx, counts).reshape(shape)


# ---------------------------------------------------------------------------------- layers
COMPRESSED: Dict[Tuple[Type[nn.Module], str], Type[nn.Module]] = {}
BASE_ATTRS = {
    nn.Linear: ("in_features", "out_features"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse"),
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"),
}
BASE_ATTRS[nn.Conv2d] = BASE_ATTRS[nn.Conv1d]


def register_compressed(base: Type[nn.Module], scheme: str):
    def deco(cls):
        COMPRESSED[(base, scheme)] = cls
        cls.base_class, cls.scheme = base, scheme
        return cls

    return deco


def compressed_class(module: nn.Module, scheme: str) -> Optional[Type[nn.Module]]:
    """The pq/scalar class replacing ``module`` (a Linear/Embedding/Conv, or a quant-noise wrapper)."""
    for (base, s), cls in COMPRESSED.items():
        if s == scheme and isinstance(module, base) and not isinstance(module, CompressedMixin):
            return cls
    return None


class CompressedMixin:
    """Common construction: copy the plain layer's hyper-parameters and bias, no ``weight`` Parameter."""

    base_class: Type[nn.Module]
    scheme: str

    def _init_from(self, like: nn.Module) -> None:
        nn.Module.__init__(self)
        for name in BASE_ATTRS[self.base_class]:
            setattr(self, name, getattr(like, name))
        self.weight_shape = tuple(like.weight.shape)
        self.register_buffer("weight_size", torch.tensor(self.weight_shape))  # lets tools rebuild W from a state dict
        self.train(like.training)

    def _set_bias(self, like: nn.Module) -> None:
        """Registered after the weight's replacement: parameter order (weight-like, bias) is the plain
        layer's, so an optimizer's param list keeps its order when a layer is swapped mid-training."""
        bias = getattr(like, "bias", None)
        if self.base_class is not nn.Embedding:
            self.register_parameter("bias", bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias))

    def to_float(self) -> nn.Module:
        """The plain layer holding the decoded weight (a new Parameter) and the same bias."""
        plain = self.base_class(**_ctor_kwargs(self), device="meta")
        plain.weight = nn.Parameter(self.weight.detach().clone())
        if getattr(self, "bias", None) is not None:
            plain.bias = self.bias
        return plain.train(self.training)


class PQMixin(CompressedMixin):
    def __init__(self, like: nn.Module, codes: Tensor, centroids: Tensor, block_size: int):
        self._init_from(like)
        self.centroids = nn.Parameter(centroids)  # (k, bs), trained by the mean-gradient rule
        self.register_buffer("codes", codes)  # (n_blocks,) uint8|int16, fixed
        self.register_buffer("counts", None, persistent=False)
        self.block_size = block_size
        self._set_bias(like)

    @property
    def weight(self) -> Tensor:
        if self.counts is None or self.counts.device != self.codes.device:
            self.counts = torch.bincount(self.codes.long(), minlength=self.centroids.shape[0])
        return pq_weight(self.centroids, self.codes, self.weight_shape, self.counts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pq(block={self.block_size}, centroids={self.centroids.shape[0]})"


class ScalarMixin(CompressedMixin):
    def __init__(self, like: nn.Module, qweight: Tensor, qscale: Tensor, bits: int):
        self._init_from(like)
        self.register_buffer("qweight", qweight)  # (out, row) int8
        self.register_buffer("qscale", qscale)  # (out, 1) fp32
        self.register_buffer("qbits", torch.tensor(bits))  # 0-d; kept so a state dict rebuilds the layer
        self._set_bias(like)

    @property
    def weight(self) -> Tensor:
        return scalar_decode(self.qweight, self.qscale, self.weight_shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{int(self.qbits)}"


def _ctor_kwargs(m) -> dict:
    if m.base_class is nn.Linear:
        return dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    if m.base_class is nn.Embedding:
        return {k: getattr(m, k) for k in BASE_ATTRS[nn.Embedding]}
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode)


for _base in (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d):  # PQLinear, ScalarLinear, ...
    for _mixin, _scheme, _prefix in ((PQMixin, "pq", "PQ"), (ScalarMixin, "scalar", "Scalar")):
        _cls = type(f"{_prefix}{_base.__name__}", (_mixin, _base), {"__module__": __name__})
        register_compressed(_base, _scheme)(_cls)
        globals()[_cls.__name__] = _cls
PQLinear, PQEmbedding = COMPRESSED[(nn.Linear, "pq")], COMPRESSED[(nn.Embedding, "pq")]
PQConv1d, PQConv2d = COMPRESSED[(nn.Conv1d, "pq")], COMPRESSED[(nn.Conv2d, "pq")]
ScalarLinear, ScalarEmbedding = COMPRESSED[(nn.Linear, "scalar")], COMPRESSED[(nn.Embedding, "scalar")]


# ------------------------------------------------------------------------------- settings
@dataclass
class LayerRule:
    """How to compress the layers whose qualified name matches ``pattern`` (regex, re.search)."""

    pattern: str = field(default=".", metadata={"help": "regex searched in module names"})
    scheme: str = field(default="pq", metadata={"help": "pq | scalar"})
    block_size: int = field(default=8, metadata={"help": "pq: weights per block (8 for FFN/embeddings, 4 for attention)"})
    n_centroids: int = field(default=256, metadata={"help": "pq: codebook size (<= 256 keeps codes in one byte)"})
    bits: int = field(default=8, metadata={"help": "scalar: integer bits, 2..8 (<= 4 packs two per byte on export)"})
    kmeans_iters: int = field(default=20, metadata={"help": "pq: k-means iterations"})
    exclude: Optional[str] = field(default=None, metadata={"help": "regex of names this rule leaves alone"})
    updates: int = field(default=0, metadata={"help": "stage plans: updates of centroid fine-tuning after this stage"})

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"ipq {name}={getattr(self, name)!r} (rule {self.pattern!r}) is invalid: {allowed}")

        if not isinstance(self.scheme, str) or self.scheme not in ("pq", "scalar"):
            raise bad("scheme", "choose pq or scalar")
        if not isinstance(self.pattern, str):
            raise bad("pattern", f"use a regular expression as a string, not a {type(self.pattern).__name__}")
        for name in ("pattern", "exclude"):
            error = regex_error(getattr(self, name))
            if error:
                raise bad(name, error)
        if not is_int(self.block_size) or self.block_size < 1:
            raise bad("block_size", "use a positive integer that divides the layer's row length")
        if not is_int(self.n_centroids) or not 2 <= self.n_centroids <= 2**15:
            raise bad("n_centroids", "use an integer in [2, 32768] (256 fits codes in one byte)")
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise bad("bits", "use an integer from 2 to 8")
        if not is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise bad("kmeans_iters", "use a positive integer")
        if not is_int(self.updates) or self.updates < 0:
            raise bad("updates", "use a non-negative integer")

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None and not (self.exclude and re.search(self.exclude, name))


def compress_module(module: nn.Module, rule: LayerRule, name: str, seed: int = 0) -> nn.Module:
    """The pq / scalar replacement of ``module`` (same bias Parameter), by ``rule``."""
    cls = compressed_class(module, rule.scheme)
    if cls is None:
        raise ValueError(f"layer '{name}' ({type(module).__name__}) cannot be compressed: only Linear, Embedding, "
                         f"Conv1d and Conv2d can; exclude it")
    w = module.weight.detach()
    if rule.scheme == "pq":
        codes, centroids = pq_quantize(w, rule.block_size, rule.n_centroids, rule.kmeans_iters,
                                       seed=seed, name=f"layer '{name}'")
        return cls(module, codes, centroids.to(w.dtype), rule.block_size)
    q, scale = scalar_quantize(w, rule.bits)
    return cls(module, q, scale, rule.bits)


def empty_like_state(module: nn.Module, state: Dict[str, Tensor], prefix: str) -> Optional[nn.Module]:
    """A compressed layer shaped like the entries ``prefix + codes/centroids`` (or ``qweight`` ...) of a
    state dict, to be filled by ``load_state_dict``; None when the state holds a plain weight."""
    if prefix + "codes" in state:
        codes, cents = state[prefix + "codes"], state[prefix + "centroids"]
        cls = compressed_class(module, "pq")
        if cls is None:
            raise ValueError(f"state has pq codes for '{prefix[:-1]}' but the model's layer there is a "
                             f"{type(module).__name__}; load it into the architecture it was quantized from")
        return cls(module, torch.empty_like(codes, device="cpu"), torch.empty_like(cents, device="cpu"),
                   cents.shape[1])
    if prefix + "qweight" in state:
        cls = compressed_class(module, "scalar")
        if cls is None:
            raise ValueError(f"state has int weights for '{prefix[:-1]}' but the model's layer there is a "
                             f"{type(module).__name__}; load it into the architecture it was quantized from")
        return cls(module, torch.empty_like(state[prefix + "qweight"], device="cpu"),
                   torch.empty_like(state[prefix + "qscale"], device="cpu"), int(state[prefix + "qbits"]))
    return None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def adopt_state_structure_(model: nn.Module, state: Dict[str, Tensor], prefix: str = "") -> list:
    """Swap in empty compressed layers wherever ``state`` holds codes or int weights, so that
    ``model.load_state_dict(state)`` then fills them.  Returns the swapped names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, CompressedMixin):
            continue
        new = empty_like_state(module, state, f"{prefix}{name}.")
        if new is not None:
            set_submodule(model, name, new)
            swapped.append(name)
    return swapped
