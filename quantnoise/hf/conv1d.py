"""GPT-2's ``transformers.pytorch_utils.Conv1D`` everywhere a Linear is handled.

``Conv1D(nf, nx)`` holds ``weight`` (nx, nf) = (in, out) and computes y = x @ W + b: it is the Linear of W.T.
So each handler treats W.T (out, in) as the Linear weight: blocks of ``block_size`` contiguous input features of
one output row, for the noise (``QNConv1D``), the iPQ / int-N layers (``PQConv1D``, ``ScalarConv1D``, whose codes
are those of W.T and whose ``weight`` is the decoded (in, out) tensor) and the runtime layers (``CodesConv1D``,
``IntConv1D``: quantnoise.runtime's Linear kernels on the stored W.T, ``"transposed": true`` in the .qnz map).
Importing this module registers them (quantnoise.extensions imports it when a model holds a Conv1D).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import extensions
from ..compress.layers import BASE_ATTRS, PQMixin, ScalarMixin, register_compressed
from ..config import QuantNoiseConfig
from ..nn import QNLinear, QuantNoiseMixin, register_wrapper
from ..runtime.layers import CodesLinear, IntLinear


def _conv1d(nf: int, nx: int) -> Conv1D:
    with torch.device("meta"):  # no memory, no random init: the Parameters are set by the caller
        return Conv1D(nf, nx)


def _addmm(x: Tensor, w: Tensor, bias: Tensor, nf: int) -> Tensor:
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], nf)  # Conv1D.forward


class QNConv1D(QuantNoiseMixin, Conv1D):
    """Quant-Noise Conv1D: the same ``weight`` (in, out) and ``bias`` Parameters; noise on blocks of W.T, as for
    QNLinear (``act_bits``: the input fake-quantized too)."""

    @classmethod
    def from_float(cls, module: Conv1D, cfg: QuantNoiseConfig, name: str = "") -> "QNConv1D":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx, new.weight, new.bias = module.nf, module.nx, module.weight, module.bias
        new.train(module.training)
        new._init_noise(cfg, name)
        new.qn_orig_class = type(module)
        return new

    def to_float(self) -> Conv1D:
        plain = _conv1d(self.nf, self.nx)
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)

    def _init_noise(self, cfg: QuantNoiseConfig, name: str) -> None:
        super()._init_noise(cfg, name)
        self.register_buffer("qn_act_lo", None)  # saved once set, as QNLinear's
        self.register_buffer("qn_act_hi", None)

    quantize_input = QNLinear.quantize_input

    def _blocked_weight(self) -> Tensor:
        return self.weight.t()  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        p = self._active_p()
        w = self.weight if p == 0.0 else self.noisy(self.weight.t(), p).t()  # (in, out)
        if self.qn_cfg.act_bits is not None:
            x = self.quantize_input(x)
        return _addmm(x, w, self.bias, self.nf)


class _Conv1DCompressed:
    weight_transposed = True

    def to_float(self) -> Conv1D:
        plain = _conv1d(self.nf, self.nx)
        plain.weight, plain.bias = nn.Parameter(self.weight.detach().clone()), self.bias
        return plain.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        return _addmm(x, self.weight, self.bias, self.nf)


class PQConv1D(_Conv1DCompressed, PQMixin, Conv1D):
    """iPQ Conv1D: ``codes`` of W.T's blocks + a trainable ``centroids`` Parameter; ``weight`` = the decoded (in, out)."""


class ScalarConv1D(_Conv1DCompressed, ScalarMixin, Conv1D):
    """int-N Conv1D: ``qweight`` of W.T (one scale per output feature); ``weight`` = the decoded (in, out)."""


class _Conv1DRuntime:
    weight_transposed = True

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    @property
    def weight(self) -> Tensor:
        return super().weight.t()  # decoded (in, out), for code that reads a Conv1D's weight


class CodesConv1D(_Conv1DRuntime, CodesLinear):
    """pq Conv1D at run time: CodesLinear's kernels on the stored W.T (x @ W = x @ (W.T).T)."""


class IntConv1D(_Conv1DRuntime, IntLinear):
    """int-N Conv1D at run time: IntLinear's kernels on the stored W.T."""


register_wrapper(Conv1D)(QNConv1D)
BASE_ATTRS[Conv1D] = ("nf", "nx")
register_compressed(Conv1D, "pq")(PQConv1D)
register_compressed(Conv1D, "scalar")(ScalarConv1D)
extensions.register_runtime(Conv1D, CodesConv1D, IntConv1D)
