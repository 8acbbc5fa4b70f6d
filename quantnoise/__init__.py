"""quantnoise: Quant-Noise (Fan et al. 2020) for any PyTorch model, plus a fairseq plugin.

    from quantnoise import QuantNoiseConfig, quantize_, compress_, LayerRule
    names = quantize_(model, QuantNoiseConfig(scheme="pq", p=0.1, block_size=8))   # train with noise
    unquantize_(model); compress_(model, LayerRule(block_size=8, n_centroids=256))  # then iPQ
    save_qnz(model, "m.qnz"); load_qnz("m.qnz", fresh_model_on_meta)                  # runs compressed
"""
from .api import compress_, quantize_, unquantize_, wrapped_layers
from .compress import IPQPlan, LayerRule
from .config import QuantNoiseConfig
from .mixed import LayerBits, MixedPrecisionConfig, load_bit_plan
from .qnz import load_qnz, save_qnz
from .nn import QNConv1d, QNConv2d, QNEmbedding, QNLinear, QNMultiheadAttention, QuantNoiseMixin

__all__ = ["QuantNoiseConfig", "MixedPrecisionConfig", "LayerBits", "load_bit_plan", "quantize_", "unquantize_", "compress_", "save_qnz", "load_qnz", "LayerRule", "IPQPlan", "wrapped_layers",
           "QNLinear", "QNEmbedding", "QNConv1d", "QNConv2d", "QNMultiheadAttention", "QuantNoiseMixin"]
__version__ = "0.1.0"
