"""``save_aqlm(model, dir)`` (``hf.save_pretrained(model, dir, format="aqlm")``): an iPQ-compressed transformers
model as a transformers AQLM folder (Egiazarian et al. 2024, "Extreme Compression of Large Language Models via
Additive Quantization"), which ``AutoModel*.from_pretrained(dir)`` loads with the ``aqlm`` package (CPU: numba;
GPU: its CUDA / Triton kernels) and vLLM versions that have the ``aqlm`` method serve.

iPQ with block size b and k <= 256 centroids (Stock et al. 2020) is AQLM's "1x8" layout: one codebook of 2^8
entries, ``in_group_size = b``, ``out_group_size = 1``, unit scales.  ``aqlm.QuantizedLinear`` computes with
    W[o, g*b:(g+1)*b] = codebooks[0, codes[o, g, 0] (as uint8), 0, :] * scales[o, 0, 0, 0]
so a layer's ``codes`` (out, in / b) become ``codes`` (out, in / b, 1) int8 (the same bytes), its codebook (k, b)
``codebooks`` (1, 256, 1, b) (rows k..255 zero, never selected: k < 256 is exact too), ``scales`` (out, 1, 1, 1)
ones.  One ``in_group_size`` holds for the whole folder.

What each layer becomes: a pq ``nn.Linear`` with k <= 256 of the folder's block size (the block size covering most
weights; a compressed model or one loaded compressed) -> AQLM; every other weighted layer is stored dense (its
decoded weight) and listed in ``quantization_config.linear_weights_not_to_quantize``: embeddings (AQLM compresses
Linears only), GPT-2's ``Conv1D`` (not an ``nn.Linear``: transformers leaves it as it is), int-N layers, pq with
k > 256 or another block size, plain Linears, a head tied to the embedding.  A warning names the compressed
Linears / Conv1Ds stored dense (compressed embeddings, dense in every AQLM folder, are logged at info).  Refused
with one line: a model that is not a ``PreTrainedModel``, one still holding Quant-Noise wrappers, one with no
Linear AQLM can hold, int8 codebooks.

On CPU (aqlm 1.1.7): transformers loads the folder in float32 (its AQLM quantizer's default without CUDA; the numba
kernel refuses fp16 / bf16); the kernel must run on one numba thread (``NUMBA_NUM_THREADS=1`` or
``numba.set_num_threads(1)``: its ``prange`` adds into one shared output vector, so at 2 threads outputs can be
wrong); its first forward compiles one kernel per layer shape (seconds each) and permutes the loaded ``codes`` in
place, so a model that has run on CPU must not be re-saved with transformers' ``save_pretrained`` (write the folder
again from quantnoise).
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import pathlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..compress.layers import CompressedMixin, TiedWeightView
from ..export import DTYPES, ExportOptions, _to_fp16
from ..nn import QuantNoiseMixin
from ..runtime.layers import RuntimeMixin

logger = logging.getLogger(__name__)
CODEBOOK = 256  # AQLM 1x8: one codebook of 2^8 entries
AQLM_VERSION = "1.1.7"  # the aqlm package the folders are tested with (scripts/requirements.txt)


# ------------------------------------------------------------------------------------------ pure functions
def aqlm_layer(codes: Tensor, centroids: Tensor, dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """``aqlm.QuantizedLinear``'s tensors (1 codebook of 8 bits, out_group_size 1) of an iPQ Linear: ``codes``
    (out, in / b) uint8 | int16 with values < 256, ``centroids`` (k <= 256, b) -> {"codes": (out, in / b, 1) int8
    (the uint8 bytes), "codebooks": (1, 256, 1, b) ``dtype`` (rows k.. zero), "scales": (out, 1, 1, 1) ones}."""
    k, b = centroids.shape
    if k > CODEBOOK:
        raise ValueError(f"a codebook of {k} centroids does not fit AQLM's 8-bit codes (at most {CODEBOOK})")
    book = centroids.new_zeros(CODEBOOK, b, dtype=dtype)
    book[:k] = centroids.to(dtype)
    out = codes.shape[0]
    return {"codes": codes.reshape(out, -1, 1).to(torch.uint8).view(torch.int8).contiguous(),  # values < 256
            "codebooks": book.reshape(1, CODEBOOK, 1, b),
            "scales": torch.ones(out, 1, 1, 1, dtype=dtype)}


def aqlm_weight(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """The (out, in) weight of AQLM 1x8 tensors, codebooks[codes] * scales: the reference ``aqlm_layer`` inverts."""
    out, groups, _ = codes.shape
    w = codebooks[0, codes.view(torch.uint8)[..., 0].long(), 0]  # (out, groups, b)
    return (w * scales.reshape(out, 1, 1)).reshape(out, groups * codebooks.shape[-1])


# ------------------------------------------------------------------------------------------ layers
def _pq_linear(m: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """(codes (out, in / b), centroids (k, b)) of a pq Linear (compressed or loaded compressed), else None."""
    if not isinstance(m, nn.Linear) or getattr(m, "weight_transposed", False):
        return None
    pq = (isinstance(m, CompressedMixin) and m.scheme == "pq") or (isinstance(m, RuntimeMixin) and m.kind == "pq")
    return (m.codes.reshape(m.out_features, -1), m.centroids.detach()) if pq else None


def _why_dense(m: nn.Module, block: int, tied: bool) -> str:
    """Why a compressed layer is stored dense in the folder."""
    pq = _pq_linear(m)
    if isinstance(m, nn.Embedding):
        return "an embedding (AQLM holds Linears)"
    if not isinstance(m, nn.Linear) or getattr(m, "weight_transposed", False):
        return f"a {type(m).__name__}, not an nn.Linear"
    if tied:
        return "tied to another weight"
    if pq is None:
        return "int-N (AQLM has no int-N)"
    k, b = pq[1].shape
    if k > CODEBOOK:
        return f"pq with {k} centroids (AQLM 1x8 holds <= {CODEBOOK})"
    return f"pq block size {b}, not {block}"


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module '{name}', which its architecture has: save a model of "
                         f"its own architecture (as transformers builds it from its config)") from None


def _fits(pq: Optional[Tuple[Tensor, Tensor]], block: int) -> bool:
    return pq is not None and pq[1].shape[0] <= CODEBOOK and pq[1].shape[1] == block


def _is_compressed(m: nn.Module) -> bool:
    return isinstance(m, (CompressedMixin, RuntimeMixin, TiedWeightView))


def _plain(model: nn.Module) -> nn.Module:
    """The model's architecture on meta, without any quantization: the keys and shapes transformers expects."""
    from transformers.modeling_utils import init_empty_weights, no_init_weights

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights(), init_empty_weights():
        plain = type(model)._from_config(config)
    plain.tie_weights()
    return plain


def _folder_block(model: nn.Module, linears: List[str], shared: set) -> int:
    """The block size covering most weights of the pq Linears AQLM can hold; ValueError when there is none."""
    weights: Dict[int, int] = collections.Counter()
    for name in linears:
        pq = _pq_linear(_module(model, name))
        if pq is not None and pq[1].shape[0] <= CODEBOOK and f"{name}.weight" not in shared:
            weights[int(pq[1].shape[1])] += pq[0].numel() * pq[1].shape[1]
    if not weights:
        raise ValueError(f"no nn.Linear of {type(model).__name__} is iPQ with at most {CODEBOOK} centroids, so an AQLM "
                         f"folder would compress nothing (embeddings, GPT-2's Conv1D and int-N layers stay dense): "
                         f"compress its Linears with quantnoise.compress_(model, LayerRule(n_centroids=256)), or save "
                         f"it with format='quantnoise' (or quantnoise.hf.save_gguf for llama.cpp grids)")
    return max(weights, key=lambda b: (weights[b], b))


# ------------------------------------------------------------------------------------------ the folder
def aqlm_contents(model: nn.Module, opts: Optional[ExportOptions] = None):
    """(tensors, AqlmConfig) of ``model``'s AQLM folder: the state dict transformers builds after
    ``replace_with_aqlm_linear`` (tied copies once), in ``opts.rest_dtype`` (codebooks and scales too)."""
    from transformers import AqlmConfig

    if opts is None:
        opts = ExportOptions(rest_dtype=_rest(model))
    if opts.centroids_dtype != "float16":
        raise ValueError(f"centroids_dtype={opts.centroids_dtype!r}: an AQLM folder holds its codebooks in the model's "
                         f"float dtype; pass ExportOptions(rest_dtype='float16' | 'float32') and no centroids_dtype")
    wrapped = next((n for n, m in model.named_modules() if isinstance(m, QuantNoiseMixin)), None)
    if wrapped is not None:
        raise ValueError(f"layer '{wrapped}' is a Quant-Noise wrapper ({type(_module(model, wrapped)).__name__}), "
                         f"not compressed: compress the model first (quantnoise.compress_(model, LayerRule(n_centroids="
                         f"256))), or unquantize_ it to store its layers dense")
    dtype = DTYPES[opts.rest_dtype]
    plain = _plain(model)
    state = plain.state_dict(keep_vars=True)
    first: Dict[int, str] = {}
    tied = {k for k, t in state.items() if first.setdefault(id(t), k) != k}  # transformers stores a tied tensor once
    count = collections.Counter(id(t) for t in state.values())
    shared = {k for k, t in state.items() if count[id(t)] > 1}  # a tied Linear stays nn.Linear, for tie_weights
    linears = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)]  # what replace_with_aqlm_linear swaps
    block = _folder_block(model, linears, shared)
    aqlm = [n for n in linears if f"{n}.weight" not in shared and _fits(_pq_linear(_module(model, n)), block)]
    keep = set(aqlm)
    tensors: Dict[str, Tensor] = {}
    for key, like in state.items():
        owner, _, part = key.rpartition(".")
        if key in tied or (owner in keep and part == "weight"):
            continue
        m = _module(model, owner)
        t = m.weight if part == "weight" and _is_compressed(m) else getattr(m, part, None)  # a weight decoded: dense
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{key}: the model holds {None if t is None else tuple(t.shape)} where "
                             f"{type(model).__name__} has {tuple(like.shape)}; save a model of its own architecture")
        tensors[key] = _stored(t.detach(), key, dtype)
    for name in aqlm:
        codes, cents = _pq_linear(_module(model, name))
        cents = _stored(cents, f"{name}.centroids", dtype)
        tensors.update({f"{name}.{k}": v for k, v in aqlm_layer(codes.cpu(), cents, dtype).items()})
    weighted = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)
    listed = [f"{n}.weight" for n, m in plain.named_modules() if isinstance(m, weighted) and n not in keep]
    decoded = {n: _why_dense(_module(model, n), block, f"{n}.weight" in shared) for n, m in plain.named_modules()
               if isinstance(m, weighted) and n not in keep and _is_compressed(_module(model, n))}
    if decoded:  # a warning when a Linear / Conv1D is: compressed embeddings are dense in every AQLM folder
        level = logging.WARNING if any(not why.startswith("an embedding") for why in decoded.values()) else logging.INFO
        logger.log(level, "save_pretrained(format='aqlm'): %d compressed layers stored dense (decoded), as AQLM "
                          "cannot hold them: %s", len(decoded), "; ".join(f"{n}: {why}" for n, why in decoded.items()))
    qconfig = AqlmConfig(in_group_size=block, out_group_size=1, num_codebooks=1, nbits_per_codebook=8,
                         linear_weights_not_to_quantize=listed)
    return tensors, qconfig


def _rest(model: nn.Module) -> str:
    """The default float dtype of the folder: the one a loaded quantnoise model was stored with, else float16."""
    rest = getattr(getattr(model.config, "quantization_config", None), "rest_dtype", "float16")
    return rest if rest in ("float16", "float32") else "float16"


def _stored(t: Tensor, key: str, dtype: torch.dtype) -> Tensor:
    t = t.cpu()
    if not t.is_floating_point():
        return t.contiguous()
    if dtype == torch.float16:
        t = _to_fp16(t, key, "save it with opts=ExportOptions(rest_dtype='float32')")
    return t.to(dtype).contiguous()


def save_aqlm(model: nn.Module, save_dir, tokenizer=None, opts: Optional[ExportOptions] = None) -> pathlib.Path:
    """Write ``model`` (a transformers ``PreTrainedModel`` whose Linears ``quantnoise.compress_`` made iPQ with at most
    256 centroids, or loaded compressed) as a transformers AQLM folder (config.json with ``quantization_config``
    ``{"quant_method": "aqlm", "in_group_size": b, "out_group_size": 1, "num_codebooks": 1, "nbits_per_codebook": 8,
    "linear_weights_not_to_quantize": [...]}``, model.safetensors, a model card, the generation config and the
    tokenizer's files when given), atomically file by file; return the folder.  ``opts.rest_dtype``: the dtype of
    every float tensor, codebooks included (float16 by default, what GPU kernels and vLLM take; float32 keeps the
    model's own values).  ``transformers.AutoModel*.from_pretrained(dir)`` loads it with the ``aqlm`` package."""
    from .pretrained import CARD, CARD_MARK, CARD_TAG, WEIGHTS, _write_safetensors, _write_text, replaceable_card

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string") or not hasattr(type(model), "_from_config"):
        raise ValueError(f"save_pretrained(format='aqlm') takes a transformers PreTrainedModel, not a "
                         f"{type(model).__name__}; for any other module use quantnoise.save_qnz(model, path)")
    tensors, qconfig = aqlm_contents(model, opts)
    folder = pathlib.Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / WEIGHTS, tensors, {"format": "pt"})
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.quantization_config = qconfig
    config.dtype = DTYPES[(opts or ExportOptions(rest_dtype=_rest(model))).rest_dtype]
    text = json.loads(config.to_json_string(use_diff=True))
    text.setdefault("torch_dtype", text.get("dtype"))  # the key transformers < 4.56 (and vLLM on them) reads
    _write_text(folder / "config.json", json.dumps(text, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if replaceable_card(folder / CARD) is not None:  # never the user's own card (pretrained.write_card's rule)
        n = sum(k.endswith(".codebooks") for k in tensors)
        _write_text(folder / CARD, f"---\nlibrary_name: transformers\ntags:\n{CARD_TAG}- aqlm\n---\n\n{CARD_MARK}\n\n"
                                   f"# {type(model).__name__}, iPQ-compressed with quantnoise, as AQLM 1x8\n\n"
                                   f"{n} Linears as AQLM (one 8-bit codebook, in_group_size {qconfig.in_group_size}); "
                                   f"{len(qconfig.linear_weights_not_to_quantize)} weights dense. Needs `pip install "
                                   f"aqlm=={AQLM_VERSION}` (+ numba on CPU, where it runs in float32):\n\n```python\n"
                                   f"from transformers import AutoModel\n"
                                   f"model = AutoModel.from_pretrained(\"path/to/this/folder\")\n```\n")
    return folder
