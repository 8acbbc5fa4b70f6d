"""Hugging Face ``transformers`` models with quantnoise: the one package that imports ``transformers``.

  - aqlm.py: ``save_pretrained(model, dir, format="aqlm")``, iPQ Linears (k <= 256) as a transformers AQLM folder;
  - bert.py: the local all-MiniLM-L6-v2 BERT (offline) and the sentence-classification helpers of recipes/bert;
  - conv1d.py: GPT-2's ``Conv1D`` noised, compressed and run compressed like a Linear (registered on import);
  - gguf.py: ``save_gguf(model, path, tokenizer)``, a Llama / GPT-2 on llama.cpp's Q4_0 / Q8_0 grids as a GGUF file;
  - linears.py: transformers' Linear subclasses computing nn.Linear's product (Falcon's) run by the runtime kernels;
  - pretrained.py: ``save_pretrained(model, dir, tokenizer)`` / ``from_pretrained(dir)``, a compressed model
    as a folder (config.json + model.safetensors, the .qnz, + a model card) loaded with runtime layers;
  - quantizer.py: the ``quantnoise`` quantization method of transformers (registered on import), so that
    ``AutoModel*.from_pretrained(dir)`` of such a folder loads it compressed too, ``model.save_pretrained(dir)``
    writes one, and ``from_pretrained(fp32_dir, quantization_config=QuantNoiseHfConfig(...))`` compresses at load;
  - trainer.py: ``QuantNoiseCallback``, masks keyed on the Trainer's step and staged iPQ inside ``Trainer``.
See docs/hf.md.
"""
from . import conv1d, linears, quantizer  # noqa: F401  (register GPT-2's Conv1D, Falcon's Linear, the quantnoise method)
from .bert import (accuracy, batches, bits_per_param, cosine, finetune_, forward, load_classifier, load_encoder,
                   load_tokenizer, mean_pool, model_dir, n_params, predict, read_tsv)
from .gguf import save_gguf
from .pretrained import from_pretrained, save_pretrained
from .quantizer import QuantNoiseHfConfig
from .trainer import QuantNoiseCallback

__all__ = ["read_tsv", "batches", "model_dir", "load_tokenizer", "load_classifier", "load_encoder", "forward",
           "mean_pool", "finetune_", "predict", "accuracy", "cosine", "n_params", "bits_per_param",
           "save_pretrained", "from_pretrained", "QuantNoiseHfConfig", "QuantNoiseCallback", "save_gguf"]
