"""Compression: layers that *are* codes + a codebook (iPQ) or int-N weights (layers.py), plans of stages
(plan.py), and Q-BERT's mixed precision: per-layer Hessian sensitivity (sensitivity.py) and bits per layer
for a budget (bitplan.py).  ``quantnoise.compress_`` applies a rule or a plan to any model."""
from .layers import (LayerRule, PQConv1d, PQConv2d, PQEmbedding, PQLinear, ScalarEmbedding, ScalarLinear,
                     compress_module, compressed_class, pq_quantize, scalar_decode, scalar_quantize)
from .plan import IPQPlan, load_plan, quantize_state_dict

__all__ = ["LayerRule", "IPQPlan", "load_plan", "quantize_state_dict", "compress_module", "compressed_class",
           "pq_quantize", "scalar_quantize", "scalar_decode", "PQLinear", "PQEmbedding", "PQConv1d", "PQConv2d",
           "ScalarLinear", "ScalarEmbedding"]
