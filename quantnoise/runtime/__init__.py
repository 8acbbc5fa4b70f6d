"""Run a ``.qnz`` compressed: layers that compute from the stored codes / int weights (layers.py), their
arithmetic as short tensor functions (kernels.py) with compiled CPU versions of two of them (ext.py builds
csrc/pq_lut.cpp), and the filling of a model built on ``meta`` from a file's tensors (load.py)."""
from .layers import CodesEmbedding, CodesLinear, IntEmbedding, IntLinear, RuntimeMixin
from .load import fairseq_plugin, fill_model_, load_fairseq, release_freed_memory, runtime_layer, runtime_summary, stored_int

__all__ = ["CodesLinear", "CodesEmbedding", "IntLinear", "IntEmbedding", "RuntimeMixin", "fairseq_plugin", "fill_model_", "load_fairseq",
           "release_freed_memory", "runtime_layer", "runtime_summary", "stored_int"]
