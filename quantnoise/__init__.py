"""quantnoise: Quant-Noise (Fan et al. 2020) for any PyTorch model, plus a fairseq plugin.

    from quantnoise import QuantNoiseConfig, quantize_
    names = quantize_(model, QuantNoiseConfig(scheme="scalar", p=0.1, bits=8))
"""
from .api import quantize_, unquantize_, wrapped_layers
from .config import QuantNoiseConfig
from .nn import QNConv1d, QNConv2d, QNEmbedding, QNLinear, QNMultiheadAttention, QuantNoiseMixin

__all__ = ["QuantNoiseConfig", "quantize_", "unquantize_", "wrapped_layers",
           "QNLinear", "QNEmbedding", "QNConv1d", "QNConv2d", "QNMultiheadAttention", "QuantNoiseMixin"]
__version__ = "0.1.0"
