"""``save_gguf(model, path, tokenizer=None)``: a transformers Llama or GPT-2 as a GGUF file for llama.cpp, written
with gguf-py's ``GGUFWriter``.

What each weight becomes (the weight the model was trained or compressed against, exactly):
  - a Quant-Noise wrapper on a grid (``QuantNoiseConfig(scheme="scalar", grid="q4_0" | "q8_0")``): its weight
    quantized on that grid (``quantnoise.grids``), i.e. the weight it computes with at p = 1;
  - a compressed layer on a grid (``compress_`` with ``LayerRule(scheme="scalar", grid=...)``): its own codes and
    fp16 scales, repacked into ggml's blocks;
  - a plain ``nn.Linear`` / GPT-2 ``Conv1D`` (or a drop-noise wrapper): F32, or on ``grid`` when one is given
    (post-hoc Q4_0 / Q8_0, as llama.cpp's ``llama-quantize`` does: ``quantnoise.grids`` is bit-identical to its
    reference);
  - norms, biases and plain embeddings: F32.
Anything else (pq layers, int-N layers with per-row scales, noise wrappers on quantnoise's own grids, variants
llama.cpp's ``llama`` / ``gpt2`` architectures do not compute as written here) is refused with one line.

Names, layouts and metadata follow llama.cpp's ``convert_hf_to_gguf.py``: tensor names from gguf-py's own name
map (``token_embd``, ``blk.N.attn_q`` ... ``output``); weights (out, in) (GPT-2's Conv1D (in, out) transposed, as
its ``GPT2Model`` does); a Llama's q / k rows permuted for llama.cpp's rotary layout (``permute_qk``, its
``LlamaModel.permute``: HF rotates the halves of a head, llama.cpp neighbouring pairs; a permutation of whole
rows, so the 32-weight blocks along the input are untouched); the ``llama.*`` / ``gpt2.*`` hyper-parameters; the
vocabulary of a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``: tokens, types, merges, special
ids).  A tied output projection is not written: llama.cpp then reuses ``token_embd``.

Whether llama.cpp's own run of such a file matches quantnoise's logits is not yet tested here (docs/gguf.md);
transformers' GGUF loader reads the files back to the same logits (tests/test_hf_gguf.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import grids
from ..compress.layers import CompressedMixin
from ..config import GRID_BITS
from ..nn import QuantNoiseMixin
from .conv1d import Conv1D  # transformers' GPT-2 layer (the module registers its quantnoise wrappers)

FILE_TYPE = {None: 0, "q8_0": 7, "q4_0": 2}  # llama.cpp's LlamaFileType: ALL_F32, MOSTLY_Q8_0, MOSTLY_Q4_0


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` of the rows of a q (n_head = heads) or k (n_head = kv heads)
    projection, w (out, ...) of any dtype (also a packed byte matrix): within each head, the rows
    [0, d/2) and [d/2, d) are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """The inverse of ``permute_qk``: a GGUF q / k tensor back in HF's row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------ weights
def as_rows(m: nn.Module) -> Tensor:
    """The layer's weight as GGUF stores it, (out, in): GPT-2's Conv1D holds W.T (in, out), as its noise
    wrapper does (``_blocked_weight``); convert_hf_to_gguf.py's GPT2Model transposes it too."""
    if isinstance(m, QuantNoiseMixin):
        return m._blocked_weight().detach()
    return m.weight.detach().t() if isinstance(m, Conv1D) else m.weight.detach()


def is_matmul(m: nn.Module) -> bool:
    """A layer that ``grid`` quantizes post hoc: a Linear or GPT-2's Conv1D (not embeddings, not norms)."""
    return isinstance(m, (nn.Linear, Conv1D))


def layer_grid(name: str, m: nn.Module, grid: Optional[str]) -> Tuple[str, Tensor]:
    """(kind, data) of a layer's weight for the file: ("q4_0" | "q8_0", packed uint8 (out, bytes)) or
    ("f32", fp32 (out, ...)); a one-line ValueError for a layer no GGUF type expresses exactly."""
    if isinstance(m, CompressedMixin):
        if getattr(m, "scheme", None) != "scalar":
            raise ValueError(f"layer '{name}' is {type(m).__name__} ({m.scheme}); GGUF has no such type: save_gguf "
                             f"writes layers compressed with LayerRule(scheme='scalar', grid='q4_0' | 'q8_0')")
        bits = int(m.qbits)
        g = {4: "q4_0", 8: "q8_0"}.get(bits)
        q = m.qweight.reshape(m.weight_shape[0], -1)
        if g is None or m.qscale.numel() * grids.BLOCK != q.numel():
            raise ValueError(f"layer '{name}' is int{bits} with one scale per {q.numel() // m.qscale.numel()} "
                             f"weights, not on a llama.cpp grid; compress it with LayerRule(scheme='scalar', "
                             f"grid='q4_0' | 'q8_0')")
        try:
            d, codes = grids.grid_from_codes(q, m.qscale, g)
        except ValueError as e:
            raise ValueError(f"layer '{name}': {e}; compress it with LayerRule(scheme='scalar', grid={g!r})") from None
        return g, grids.PACK[g](d, codes)
    w = as_rows(m)
    if isinstance(m, QuantNoiseMixin):
        cfg = m.qn_cfg
        if cfg.scheme == "scalar" and cfg.grid is not None:
            grid = cfg.grid
        elif cfg.scheme != "drop":
            raise ValueError(f"layer '{name}' trains against quantnoise's {cfg.scheme} grid, which GGUF does not "
                             f"hold; train with QuantNoiseConfig(scheme='scalar', grid='q4_0' | 'q8_0')")
    if grid is None:
        return "f32", w.float()
    return grid, grids.grid_pack(w.reshape(w.shape[0], -1), grid, f"layer '{name}'")  # rows off the grid: one line


def check_llama(config) -> None:
    """One-line ValueError for a Llama config llama.cpp's ``llama`` architecture would not read as written."""
    unsupported = [(getattr(config, "rope_scaling", None) is not None, "rope_scaling (write rope_scaling keys)"),
                   (getattr(config, "attention_bias", False), "attention_bias=True"),
                   (getattr(config, "mlp_bias", False), "mlp_bias=True"),
                   (getattr(config, "hidden_act", "silu") != "silu", f"hidden_act={getattr(config, 'hidden_act', '')!r}")]
    bad = [what for cond, what in unsupported if cond]
    if bad:
        raise ValueError(f"save_gguf writes plain Llamas; this config has {', '.join(bad)}, which it does not express; "
                         f"use a config without them")


def check_gpt2(config) -> None:
    """One-line ValueError for a GPT-2 config llama.cpp's ``gpt2`` architecture would not compute the same way."""
    unsupported = [(config.activation_function != "gelu_new", f"activation_function={config.activation_function!r} "
                                                               f"(llama.cpp's gpt2 uses the tanh GELU, gelu_new)"),
                   (getattr(config, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True"),
                   (not getattr(config, "scale_attn_weights", True), "scale_attn_weights=False")]
    bad = [what for cond, what in unsupported if cond]
    if bad:
        raise ValueError(f"save_gguf writes plain GPT-2s; this config has {', '.join(bad)}, which it does not express; "
                         f"use a config without them")


ARCHS = {"llama": check_llama, "gpt2": check_gpt2}  # model_type -> config check; the gguf arch has the same name


def model_tensors(model: nn.Module, arch: str, grid: Optional[str]) -> List[Tuple[str, str, Tensor]]:
    """(gguf name, kind, data) of every tensor of a ``LlamaForCausalLM`` / ``GPT2LMHeadModel``, in model order:
    weights (out, in) as ``layer_grid`` makes them, biases F32, a Llama's q / k rows permuted."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2,
                                     cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out, covered = [], set()
    for name, m in model.named_modules():
        own = isinstance(m, (CompressedMixin, QuantNoiseMixin)) or isinstance(m._parameters.get("weight"), nn.Parameter)
        if not name or not own:
            continue
        covered.update(f"{name}.{k}" for k in m.state_dict())
        if tied and name == "lm_head":
            continue  # llama.cpp reads token_embd as the output projection when output.weight is absent
        gname = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gname is None:
            raise ValueError(f"layer '{name}' ({type(m).__name__}) has no tensor in llama.cpp's {arch} architecture; "
                             f"save_gguf writes plain LlamaForCausalLM / GPT2LMHeadModel models")
        kind, data = layer_grid(name, m, grid if is_matmul(m) else None)
        bias = getattr(m, "bias", None)
        bias = bias.detach().float() if isinstance(bias, Tensor) else None
        if arch == "llama" and name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            data = permute_qk(data, heads)
            bias = None if bias is None else permute_qk(bias, heads)
        out.append((gname, kind, data))
        if bias is not None:
            out.append((gname[: -len("weight")] + "bias", "f32", bias))
    left = [k for k in model.state_dict() if k not in covered]
    if left:
        raise ValueError(f"save_gguf cannot express {left[0]} ({len(left)} tensors outside the {arch} layers): "
                         f"write a plain LlamaForCausalLM / GPT2LMHeadModel")
    return out


# ------------------------------------------------------------------------------------------ vocabulary
def add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer's vocabulary as llama.cpp's ``gpt2`` tokenizer model: tokens by id (ids the
    tokenizer lacks become ``[PAD{id}]``, UNUSED, as convert_hf_to_gguf.py does), their types, the merges and
    the special token ids."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ValueError(f"save_gguf writes the vocabulary of a fast byte-level BPE tokenizer, not a "
                         f"{type(tokenizer).__name__} ({model.get('type', 'no tokenizer.json model')}); pass "
                         f"tokenizer=None, or convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                         f"{vocab_size}; pass the model's own tokenizer")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            special = i in added and getattr(added[i], "special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED if i in added
                         else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        tid = getattr(tokenizer, f"{what}_token_id", None)
        if tid is not None:
            add(int(tid))
    if getattr(tokenizer, "add_bos_token", None) is not None:
        writer.add_add_bos_token(bool(tokenizer.add_bos_token))


# ------------------------------------------------------------------------------------------ the file
def llama_metadata(writer, config, name: str) -> None:
    """The ``llama.*`` keys convert_hf_to_gguf.py writes for a plain Llama."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))


def gpt2_metadata(writer, config, name: str) -> None:
    """The ``gpt2.*`` keys convert_hf_to_gguf.py writes for GPT-2, and the vocabulary size."""
    writer.add_name(name)
    writer.add_block_count(int(config.n_layer))
    writer.add_context_length(int(config.n_positions))
    writer.add_embedding_length(int(config.n_embd))
    writer.add_feed_forward_length(int(config.n_inner or 4 * config.n_embd))
    writer.add_head_count(int(config.n_head))
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    writer.add_vocab_size(int(config.vocab_size))  # llama.cpp reads it when present (else the token list's length)


METADATA = {"llama": llama_metadata, "gpt2": gpt2_metadata}


def save_gguf(model: nn.Module, path, tokenizer=None, grid: Optional[str] = None, name: Optional[str] = None) -> Dict:
    """Write ``model`` (a ``transformers`` ``LlamaForCausalLM``: plain, with Quant-Noise wrappers, or compressed)
    as a GGUF file for llama.cpp, atomically (a temp file beside ``path``, then a rename).  ``grid``: "q4_0" |
    "q8_0" for the plain Linears (post-hoc quantization; None keeps them F32); layers trained or compressed on a
    grid are written on their own grid whatever ``grid`` says.  ``tokenizer``: a fast byte-level BPE tokenizer
    whose vocabulary goes into the file (llama.cpp needs one to run it).  Returns {gguf tensor name: type}."""
    try:
        import gguf
    except ImportError:
        raise ImportError("save_gguf needs the gguf package: pip install gguf==0.19.0 (scripts/requirements.txt)") from None
    if grid is not None:
        grids.check_grid(grid)
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in ARCHS or not hasattr(model, "lm_head"):
        raise ValueError(f"save_gguf writes a transformers LlamaForCausalLM or GPT2LMHeadModel, not a "
                         f"{type(model).__name__} (model_type {arch!r})")
    ARCHS[arch](config)
    tensors = model_tensors(model, arch, grid)
    kinds = {k for _, k, _ in tensors if k in GRID_BITS}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        METADATA[arch](writer, config, name or getattr(config, "_name_or_path", "") or f"quantnoise-{arch}")
        writer.add_file_type(FILE_TYPE["q4_0" if "q4_0" in kinds else "q8_0" if kinds else None])
        if kinds:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None:
            add_vocab(writer, tokenizer, int(config.vocab_size))
        qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
        for gname, kind, data in tensors:
            array = data.detach().cpu().contiguous().numpy()
            writer.add_tensor(gname, array, raw_dtype=qtype.get(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {gname: kind for gname, kind, _ in tensors}
