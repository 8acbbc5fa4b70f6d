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

dtypes: centroids follow the model (fp16 under fairseq's ``--fp16``); int scales stay fp32 whatever
``.half()`` / ``.to(dtype)`` does (an fp16 scale of a row of small weights would underflow), and the
decoded weight has the model's dtype.  Layers built from a state dict take the device and dtype of
the layer they replace.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .. import functional as QF
from .. import grids
from ..config import CLIPS, GRID_BITS, MAX_BLOCK_SIZE, grid_error, is_int, regex_error
from ..kmeans import kmeans
from ..nn import set_submodule  # noqa: F401  (the verbs import it from here too)

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
    ``k`` is capped at the number of blocks.  Blocks that are exactly zero (fairseq's padding row of an
    embedding) all get one extra centroid that is exactly zero, taken from the ``k`` (k-means clusters the
    other blocks into k-1); PQ fine-tuning keeps it zero while only such blocks use it, as the
    padding row's gradient is zero.  Raises ValueError when block_size does not divide a row."""
    row = w[0].numel()
    if row % block_size:
        raise ValueError(f"{name} (shape {tuple(w.shape)}): block_size={block_size} does not divide its row "
                         f"length {row}; use a block size that divides {row}, or exclude the layer")
    x = QF.blocks(w.detach().float(), block_size).reshape(-1, block_size)  # (n_blocks, bs)
    k = min(n_centroids, x.shape[0])
    zero = (x == 0).all(1)  # (n_blocks,) all-zero blocks, e.g. fairseq's padding row: they stay exactly zero
    if not zero.any() or k < 2:
        centroids, codes = kmeans(x, k, niter=niter, seed=seed, name=name)
        return codes.to(codes_dtype(k)), centroids
    live = x[~zero]  # k-means of the other blocks, with k-1 centroids; the last centroid is exactly 0
    k_live = min(k - 1, live.shape[0])
    centroids, codes = (kmeans(live, k_live, niter=niter, seed=seed, name=name) if k_live
                        else (x.new_zeros(0, block_size), torch.zeros(0, dtype=torch.long)))
    centroids = torch.cat([centroids, x.new_zeros(1, block_size)])  # (k_live + 1, bs)
    all_codes = torch.full((x.shape[0],), k_live, dtype=torch.long, device=codes.device)
    all_codes[~zero] = codes
    return all_codes.to(codes_dtype(k_live + 1)), centroids


def scalar_quantize(w: Tensor, bits: int, name: str = "weight", rows_per_scale: int = 1,
                    clip: str = "minmax") -> Tuple[Tensor, Tensor]:
    """Symmetric integer weights with one scale per group of ``rows_per_scale`` consecutive output rows
    (1: per row; head_dim on a q/k/v projection: one per attention head, Q-BERT's group-wise
    quantization; 0 or the row count: per tensor): (q (out, row) int8 in [-(2^(b-1)-1), 2^(b-1)-1],
    scale (out / rows_per_scale, 1) fp32); w_hat = q * the scale of its row's group.  ``clip``: the group's
    range is max|w| (``minmax``) or the MSE-optimal clip of it (``mse``, ``functional.mse_clip``: what a
    ``clip="mse"`` fake quantizer uses, so the integers are the same).  Raises ValueError
    for NaN/inf weights or a ``rows_per_scale`` that does not divide the row count, naming ``name``."""
    rows = w.detach().float().reshape(w.shape[0], -1)
    bad = int((~torch.isfinite(rows)).sum())
    if bad:
        raise ValueError(f"{name} (shape {tuple(w.shape)}): the weights contain {bad} NaN or inf values; "
                         f"fix the checkpoint before quantizing")
    if is_int(rows_per_scale) and rows_per_scale == 0:
        rows_per_scale = w.shape[0]  # one scale for the whole tensor
    if not is_int(rows_per_scale) or rows_per_scale < 1 or w.shape[0] % rows_per_scale:
        raise ValueError(f"{name} (shape {tuple(w.shape)}): rows_per_scale={rows_per_scale!r} does not divide its "
                         f"{w.shape[0]} output rows; use a divisor of {w.shape[0]} (1 = one scale per row, 0 = per tensor)")
    groups = rows.reshape(w.shape[0] // rows_per_scale, -1)  # (G, rows_per_scale * row)
    if clip == "mse":
        hi = QF.mse_clip(groups, bits).unsqueeze(-1)  # (G, 1, 1)
        lo = -hi
    elif clip == "minmax":
        lo, hi = QF.minmax(groups, "channel", 1)
    else:
        raise ValueError(f"{name}: clip={clip!r} is invalid: choose minmax or mse")
    scale, _ = QF.scalar_qparams(lo, hi, bits, symmetric=True)  # (G, 1, 1)
    qmax = 2 ** (bits - 1) - 1
    q = torch.round(groups / scale[:, 0]).clamp_(-qmax, qmax)
    return q.reshape(rows.shape).to(torch.int8), scale[:, 0]


def scalar_decode(q: Tensor, scale: Tensor, shape, dtype: torch.dtype = torch.float32) -> Tensor:
    """q * scale of ``shape`` (scale (G, 1): one per group of out / G consecutive rows), computed in
    fp32 and cast to ``dtype`` (saturating)."""
    w = q.float().reshape(scale.shape[0], -1) * scale.float()  # (G, rows_per_scale * row)
    return QF.saturate(w, dtype).reshape(shape)


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
        acc = QF.compute_dtype(grad.dtype)  # fp32 sums for fp16 / bf16: counts and sums exceed 65504
        g = grad.new_zeros(ctx.k, grad.shape[1], dtype=acc).index_add_(0, codes, grad.to(acc))  # (k, bs) sums
        return (g / counts.clamp_min(1).unsqueeze(1).to(acc)).to(grad.dtype), None, None


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
    """The pq/scalar class replacing ``module`` (a Linear/Embedding/Conv, or a quant-noise wrapper).
    A subclass of those (fairseq's ``LearnedPositionalEmbedding``, whose forward looks up positions
    and which has ``max_positions``) gets a compressed subclass of its own type: its forward and its
    attributes are kept, only ``weight`` becomes the decoded one."""
    if isinstance(module, CompressedMixin):
        return None
    kind = getattr(module, "qn_orig_class", type(module))  # a quant-noise wrapper compresses as what it wraps
    for (base, s), cls in COMPRESSED.items():
        if s == scheme and issubclass(kind, base):
            return cls if kind is base else _compressed_subclass(cls, kind)
    return None


_MIXED: Dict[Tuple[type, type], type] = {}


def mixed_class(mixin: type, kind: type, name: str, namespace: dict) -> type:
    """The class ``name(mixin, kind)`` (MRO: mixin, then ``kind``'s), made once per pair and put in
    ``namespace``, a module's globals whose ``__name__`` it takes, so that a pickled model loads.  For a
    module whose class is swapped in place to add behaviour (compressed subclasses, tied views, fairseq
    layers' lean step)."""
    if (mixin, kind) not in _MIXED:
        _MIXED[mixin, kind] = type(name, (mixin, kind), {"__module__": namespace["__name__"], "__qualname__": name})
        namespace.setdefault(name, _MIXED[mixin, kind])
    return _MIXED[mixin, kind]


def _compressed_subclass(cls: Type[nn.Module], kind: Type[nn.Module]) -> Type[nn.Module]:
    """``PQLearnedPositionalEmbedding(PQEmbedding, LearnedPositionalEmbedding)``: the mixin's ``weight``
    and construction, ``kind``'s forward and methods (MRO: mixin, kind, base)."""
    return mixed_class(cls, kind, f"{cls.__name__[: -len(cls.base_class.__name__)]}{kind.__name__}", globals())


class CompressedMixin:
    """Common construction: copy the plain layer's hyper-parameters and bias, no ``weight`` Parameter."""

    base_class: Type[nn.Module]
    scheme: str
    weight_transposed = False  # True: the layer holds its weight as (in, out) (GPT-2's Conv1D); codes are of W.T (out, in)

    def _init_from(self, like: nn.Module) -> None:
        nn.Module.__init__(self)
        for name in BASE_ATTRS[self.base_class]:
            setattr(self, name, getattr(like, name))
        if type(self) is not COMPRESSED[self.base_class, self.scheme]:  # a subclass's own attributes
            for name, value in vars(like).items():  # (max_positions, onnx_trace, ...), not the wrapper's qn_*
                if not name.startswith(("_", "qn_")) and name not in ("training", "weight_shape"):
                    self.__dict__.setdefault(name, value)
        self.weight_shape = tuple(like.weight.shape)[::-1 if self.weight_transposed else 1]  # of the coded (out, ...) matrix
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
        w = pq_weight(self.centroids, self.codes, self.weight_shape, self.counts)
        return w.t() if self.weight_transposed else w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pq(block={self.block_size}, centroids={self.centroids.shape[0]})"


class ScalarMixin(CompressedMixin):
    def __init__(self, like: nn.Module, qweight: Tensor, qscale: Tensor, bits: int):
        self._init_from(like)
        self.register_buffer("qweight", qweight)  # (out, row) int8
        self.register_buffer("qscale", qscale.float())  # (groups, 1) fp32, groups = out normally; also in fp16 (see _apply)
        self.register_buffer("qbits", torch.tensor(bits))  # 0-d; kept so a state dict rebuilds the layer
        self.compute_dtype = like.weight.dtype  # dtype of the decoded weight: follows .half() / .to()
        self._set_bias(like)

    def _apply(self, fn, recurse=True):
        """``.half()`` / ``.to(dtype)`` set the decoded weight's dtype; ``qscale`` only changes device."""
        scale = self.qscale
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=scale.device))
        super()._apply(fn, recurse)
        self.compute_dtype = probe.dtype
        self._buffers["qscale"] = scale.to(probe.device)
        return self

    @property
    def weight(self) -> Tensor:
        w = scalar_decode(self.qweight, self.qscale, self.weight_shape, self.compute_dtype)
        return w.t() if self.weight_transposed else w

    @property
    def grid(self) -> Optional[str]:
        """"q4_0" | "q8_0" when the layer is on llama.cpp's grid (``LayerRule(grid=...)``: one fp16-valued scale
        per 32 weights, Q4_0's signed), else None; read from its tensors, so a layer rebuilt from a state dict
        knows it too.  quantnoise's own grids have at most one scale per row, always positive and fp32."""
        n, groups = self.qweight.numel(), self.qscale.numel()
        grid = {bits: name for name, bits in GRID_BITS.items()}.get(int(self.qbits))
        if grid is None or groups * grids.BLOCK != n:
            return None
        s = self.qscale
        if s.is_meta:  # a layer built on meta before its state is loaded: only the count tells
            return grid if groups > self.weight_shape[0] else None
        if groups > self.weight_shape[0] or bool((s <= 0).any()) or torch.equal(s.half().float(), s):
            return grid
        return None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.grid or f'int{int(self.qbits)}'}"


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
    rows_per_scale: int = field(default=1, metadata={"help": "scalar: consecutive output rows sharing one scale (1 = per "
                                                             "row; head_dim = per attention head; must divide the rows; 0 = one per tensor)"})
    clip: str = field(default="minmax", metadata={"help": "scalar: range max|w| per scale group (minmax) | mse: the "
                                                           "MSE-optimal clip of it (for int2-4; functional.mse_clip)"})
    grid: Optional[str] = field(default=None, metadata={"help": "scalar: None | q4_0 | q8_0: llama.cpp's grid (one fp16 "
                                                               "scale per 32 inputs; bits follow it), for save_gguf"})

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
        if not is_int(self.block_size) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise bad("block_size", f"use an integer from 1 to {MAX_BLOCK_SIZE} that divides the layer's row length")
        if not is_int(self.n_centroids) or not 2 <= self.n_centroids <= 2**15:
            raise bad("n_centroids", "use an integer in [2, 32768] (256 fits codes in one byte)")
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise bad("bits", "use an integer from 2 to 8")
        if not is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise bad("kmeans_iters", "use a positive integer")
        if not is_int(self.rows_per_scale) or self.rows_per_scale < 0:
            raise bad("rows_per_scale", "use a positive integer that divides the layer's output rows (1 = per row), "
                                        "or 0 for one scale per tensor")
        if not isinstance(self.clip, str) or self.clip not in CLIPS:
            raise bad("clip", f"choose one of {', '.join(CLIPS)}")
        if not is_int(self.updates) or self.updates < 0:
            raise bad("updates", "use a non-negative integer")
        if self.grid is not None:
            error = grid_error(self.grid, self.scheme, self.bits, self.clip, self.rows_per_scale)
            if error:
                raise bad("grid", error)
            self.bits = GRID_BITS[self.grid]

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None and not (self.exclude and re.search(self.exclude, name))


def compress_module(module: nn.Module, rule: LayerRule, name: str, seed: int = 0) -> nn.Module:
    """The pq / scalar replacement of ``module`` (same bias Parameter), by ``rule``."""
    cls = compressed_class(module, rule.scheme)
    if cls is None:
        raise ValueError(f"layer '{name}' ({type(module).__name__}) cannot be compressed: only Linear, Embedding, "
                         f"Conv1d and Conv2d can; exclude it")
    w = module.weight.detach()
    w = w.t() if cls.weight_transposed else w  # GPT-2's Conv1D (in, out): blocks along input features, as for a Linear
    if rule.scheme == "pq":
        codes, centroids = pq_quantize(w, rule.block_size, rule.n_centroids, rule.kmeans_iters,
                                       seed=seed, name=f"layer '{name}'")
        return cls(module, codes, centroids.to(w.dtype), rule.block_size)
    q, scale = scalar_codes(w, rule, name=f"layer '{name}'")
    return cls(module, q, scale, rule.bits)


def scalar_codes(w: Tensor, rule: LayerRule, name: str = "weight") -> Tuple[Tensor, Tensor]:
    """A scalar layer's (q int8, scale (groups, 1) fp32) of ``w`` (out, ...) by ``rule``: quantnoise's grid
    (``scalar_quantize``), or llama.cpp's (``rule.grid``: one fp16-valued scale per 32 weights, groups = out * in / 32)."""
    if rule.grid is None:
        return scalar_quantize(w, rule.bits, name=name, rows_per_scale=rule.rows_per_scale, clip=rule.clip)
    rows = w.detach().reshape(w.shape[0], -1)
    bad = int((~torch.isfinite(rows)).sum())
    if bad:
        raise ValueError(f"{name} (shape {tuple(w.shape)}): the weights contain {bad} NaN or inf values; "
                         f"fix the checkpoint before quantizing")
    q, scale = grids.grid_codes(rows, rule.grid, name)
    return q.reshape(w.shape[0], -1), scale


def empty_like_state(module: nn.Module, state: Dict[str, Tensor], prefix: str) -> Optional[nn.Module]:
    """A compressed layer shaped like the entries ``prefix + codes/centroids`` (or ``qweight`` ...) of a
    state dict, to be filled by ``load_state_dict``; None when the state holds a plain weight.  It is
    built on ``module``'s device with its float dtype (fairseq moves the model to CUDA / fp16 before
    loading a checkpoint)."""
    ref = getattr(module, "weight", None)
    device = ref.device if isinstance(ref, Tensor) else torch.device("cpu")
    fdtype = ref.dtype if isinstance(ref, Tensor) and ref.is_floating_point() else None
    if prefix + "codes" in state:
        codes, cents = state[prefix + "codes"], state[prefix + "centroids"]
        cls = compressed_class(module, "pq")
        if cls is None:
            raise ValueError(f"state has pq codes for '{prefix[:-1]}' but the model's layer there is a "
                             f"{type(module).__name__}; load it into the architecture it was quantized from")
        return cls(module, torch.empty_like(codes, device=device),
                   torch.empty_like(cents, device=device, dtype=fdtype or cents.dtype), cents.shape[1])
    if prefix + "qweight" in state:
        cls = compressed_class(module, "scalar")
        if cls is None:
            raise ValueError(f"state has int weights for '{prefix[:-1]}' but the model's layer there is a "
                             f"{type(module).__name__}; load it into the architecture it was quantized from")
        return cls(module, torch.empty_like(state[prefix + "qweight"], device=device),
                   torch.empty_like(state[prefix + "qscale"], device=device, dtype=torch.float32),
                   int(state[prefix + "qbits"]))
    return None


def tied_layers(model: nn.Module) -> List[List[Tuple[str, nn.Module]]]:
    """Every (name, layer) of ``model`` whose layer owns a ``weight`` Parameter, grouped by that
    Parameter, in model order.  A group of several names is a tied weight: one module under two
    names (fairseq's shared encoder/decoder embeddings) or two layers holding one Parameter (an
    embedding and its output projection)."""
    groups: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if name else None
        if isinstance(w, nn.Parameter):
            groups.setdefault(id(w), []).append((name, module))
    return list(groups.values())


def share_codebook(src: nn.Module, like: nn.Module) -> nn.Module:
    """The compressed layer for ``like``, a layer tied to the one ``src`` replaced, holding ``src``'s
    own codebook tensors (the same centroids Parameter and codes, or int weights): one codebook, so
    the layers stay tied while the centroids train."""
    cls = compressed_class(like, src.scheme)
    if src.scheme == "scalar":
        return cls(like, src.qweight, src.qscale, int(src.qbits))
    new = cls(like, src.codes, src.centroids.detach(), src.block_size)
    new.centroids = src.centroids
    return new


class TiedWeightView:
    """Mixin of a module that held a tied ``weight`` Parameter but has no compressed class (RoBERTa's LM
    head, which calls ``F.linear(x, self.weight)``), once its group is compressed: ``weight`` is the
    compressed layer's decoded weight, so the tie is kept, the head's gradient reaches the shared
    centroids and no full-precision copy is left to train apart.  The layer is held in ``__dict__``, not
    as a submodule, so its codebook is in the state dict once.  The state dict still has ``weight``, as
    the decoded tensor: stock loaders read it, and ``quantnoise export`` stores a tensor equal to a
    compressed layer's weight as an alias (no dense copy).  ``load_state_dict`` drops it: it is derived."""

    @property
    def weight(self) -> Tensor:
        return self.__dict__["qn_weight_of"].weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return f"{own + ', ' if own else ''}weight: the decoded weight of the tied {type(self.qn_weight_of).__name__}"


def tie_weight_view_(module: nn.Module, src: nn.Module) -> nn.Module:
    """Make ``module``, a holder of ``src``'s tied weight that cannot be compressed itself, read its weight
    from ``src`` (a compressed layer), in place: its ``weight`` Parameter is dropped and its class becomes
    ``Tied<Kind>`` (``TiedWeightView`` + its own class: its forward is kept).  Returns ``module``."""
    shape = tuple(src.weight_shape)[::-1 if src.weight_transposed else 1]  # not src.weight: codes may be unfilled yet
    if tuple(module.weight.shape) != shape:
        raise ValueError(f"{type(module).__name__}'s weight {tuple(module.weight.shape)} cannot read the weight "
                         f"{shape} of {type(src).__name__}")
    del module._parameters["weight"]
    module.__dict__["qn_weight_of"] = src  # not setattr: a submodule would store the codebook twice
    module.__class__ = mixed_class(TiedWeightView, type(module), f"Tied{type(module).__name__}", globals())
    return module


def compress_tied(members: List[Tuple[str, nn.Module]], rule: LayerRule, seed: int = 0) -> List[Tuple[str, nn.Module]]:
    """(name, compressed layer) for one group of ``tied_layers``: the first layer is quantized by
    ``rule``, the others share its codebook (``share_codebook``), as post-hoc quantization of the
    shared weight gives one codebook.  Layers that cannot be compressed are left out of the list;
    they are made to read the first's decoded weight, in place (``tie_weight_view_``)."""
    made: Dict[int, nn.Module] = {}
    first = None
    for name, module in members:
        if id(module) in made or compressed_class(module, rule.scheme) is None:
            continue
        made[id(module)] = compress_module(module, rule, name, seed) if first is None else share_codebook(first, module)
        first = first if first is not None else made[id(module)]
    for name, module in members:
        if first is not None and id(module) not in made and "weight" in module._parameters:
            tie_weight_view_(module, first)
    return [(name, made[id(m)]) for name, m in members if id(m) in made]


_STATE_KEYS = {"pq": ("codes", "centroids", "weight_size"), "scalar": ("qweight", "qscale", "qbits", "weight_size")}


def adopt_state_structure_(model: nn.Module, state: Dict[str, Tensor], prefix: str = "") -> list:
    """Swap in empty compressed layers wherever ``state`` holds codes or int weights, so that
    ``model.load_state_dict(state)`` then fills them.  Returns the swapped names.

    Layers of the model that share a weight (``tied_layers``) get one shared codebook.  Where the
    state holds a tied layer's weight as plain (``quantnoise quantize`` writes the decoded copy under
    the other name), ``state`` is rewritten in place: that name gets the codebook entries too.  A tied
    holder with no compressed class (RoBERTa's LM head) reads the layer's weight (``tie_weight_view_``)."""
    swapped = []
    for members in tied_layers(model):
        new = src = None
        for name, module in members:
            new = empty_like_state(module, state, f"{prefix}{name}.")
            if new is not None:
                src, src_key = module, f"{prefix}{name}."
                break
        if new is None:
            continue
        made = {id(src): new}
        for name, module in members:
            key = f"{prefix}{name}."
            if id(module) not in made:
                if compressed_class(module, new.scheme) is None:  # not a Linear/Embedding/Conv: reads new's weight
                    if "weight" in module._parameters:  # (its decoded copy in state is dropped on load)
                        tie_weight_view_(module, new)
                    continue
                made[id(module)] = share_codebook(new, module)
            if key + "weight" in state and key != src_key:  # the decoded tied copy -> the codebook itself
                del state[key + "weight"]
                state.update({key + k: state[src_key + k] for k in _STATE_KEYS[new.scheme]})
            set_submodule(model, name, made[id(module)])
            swapped.append(name)
    return swapped
