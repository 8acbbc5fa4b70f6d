"""Hugging Face ``transformers`` models with quantnoise: the one package that imports ``transformers``.

  - bert.py: the local all-MiniLM-L6-v2 BERT (offline) and the sentence-classification helpers of recipes/bert;
  - conv1d.py: GPT-2's ``Conv1D`` noised, compressed and run compressed like a Linear (registered on import);
"""
from . import conv1d  # noqa: F401  (registers GPT-2's Conv1D handlers)
from .bert import (accuracy, batches, bits_per_param, cosine, finetune_, forward, load_classifier, load_encoder,
                   load_tokenizer, mean_pool, model_dir, n_params, predict, read_tsv)

__all__ = ["read_tsv", "batches", "model_dir", "load_tokenizer", "load_classifier", "load_encoder", "forward",
           "mean_pool", "finetune_", "predict", "accuracy", "cosine", "n_params", "bits_per_param"]
