"""quantnoise.hf.save_gguf: a transformers Llama (and GPT-2) as llama.cpp's GGUF, read back with gguf-py's reader (every tensor
dequantized to the weight the model computes with, exactly) and with transformers' own GGUF loader (same logits)."""
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGUFReader, quants  # noqa: E402

from quantnoise import LayerRule, QuantNoiseConfig, compress_, quantize_  # noqa: E402
from quantnoise import grids as G  # noqa: E402
from quantnoise.hf.gguf import permute_qk, save_gguf, unpermute_qk  # noqa: E402

BLOCKS = r"layers\.\d+\.(self_attn|mlp)\."  # every Linear of the decoder layers


def llama(seed=0, **overrides):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def read(path):
    """{name: (type name, dequantized fp32 tensor in HF's layout: q / k rows un-permuted)}, {key: value}."""
    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    heads, kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    out = {}
    for t in r.tensors:
        w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type)))
        w = unpermute_qk(w, heads) if ".attn_q." in t.name else unpermute_qk(w, kv) if ".attn_k." in t.name else w
        out[t.name] = (t.tensor_type.name, w)
    return out, fields


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if hf in fixed:
        return fixed[hf] + ".weight"
    i, rest = hf.split(".")[2], ".".join(hf.split(".")[3:])
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}[rest]
    return f"blk.{i}.{part}.weight"


def test_noise_wrapped_llama_reads_back_exactly_with_its_metadata(tmp_path):
    model = llama()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", p=0.5, include=BLOCKS))
    kinds = save_gguf(model, tmp_path / "m.gguf", grid="q8_0")  # lm_head: post-hoc q8_0
    tensors, fields = read(tmp_path / "m.gguf")
    assert set(tensors) == set(kinds) and len(tensors) == 3 + 2 * 9
    for key, w in plain.items():
        name = gguf_name(key[: -len(".weight")])
        kind, got = tensors[name]
        if "layers" in key and ("self_attn" in key or "mlp" in key):
            assert kind == "Q4_0" and torch.equal(got, G.q4_0_fake(w)), name
        elif key == "lm_head.weight":
            assert kind == "Q8_0" and torch.equal(got, G.q8_0_fake(w))
        else:
            assert kind == "F32" and torch.equal(got, w), name
    cfg = model.config
    assert fields["general.architecture"] == "llama"
    expect = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
              "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
              "llama.vocab_size": 96, "llama.rope.dimension_count": 16, "general.file_type": 2}
    assert {k: fields[k] for k in expect} == expect
    assert fields["llama.rope.freq_base"] == cfg.rope_theta
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-7)
    assert not [f for f in os.listdir(tmp_path) if f != "m.gguf"]  # no temp file left


def test_transformers_gguf_loader_gives_the_same_logits(tmp_path):
    """An independent reader: transformers dequantizes the file with gguf-py and undoes the q / k permutation
    itself; its logits equal the wrapped model's at p = 1 (every block on the grid) bit for bit."""
    model = llama(seed=1)
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", p=1.0, eval_quantized=True, include=BLOCKS))
    save_gguf(model, tmp_path / "m.gguf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.tensor([[1, 5, 9, 17, 3, 44, 80]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("grid", ["q4_0", "q8_0"])
def test_compressed_llama_writes_its_own_codes(grid, tmp_path):
    model = llama(seed=2)
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid=grid, p=0.5, include=BLOCKS))
    compress_(model, LayerRule(pattern=BLOCKS, scheme="scalar", grid=grid))
    kinds = save_gguf(model, tmp_path / "m.gguf")
    tensors, fields = read(tmp_path / "m.gguf")
    for name, m in model.named_modules():
        if hasattr(m, "qweight"):
            kind, got = tensors[gguf_name(name)]
            assert kind == grid.upper() and torch.equal(got, m.weight), name
    assert kinds["output.weight"] == "f32" and fields["general.file_type"] == {"q4_0": 2, "q8_0": 7}[grid]


def test_embeddings_trained_on_the_grid_are_written_on_it(tmp_path):
    model = llama(seed=4)
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q8_0", p=0.5, include=r"embed_tokens"))
    kinds = save_gguf(model, tmp_path / "m.gguf")
    tensors, _ = read(tmp_path / "m.gguf")
    assert kinds["token_embd.weight"] == "q8_0" and torch.equal(tensors["token_embd.weight"][1], G.q8_0_fake(table))
    assert kinds["blk.0.attn_q.weight"] == "f32"


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    model = llama(seed=3, tie_word_embeddings=True)
    kinds = save_gguf(model, tmp_path / "m.gguf", grid="q4_0")
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == "f32" and kinds["blk.0.attn_q.weight"] == "q4_0"


def test_permutation_is_llama_cpp_rope_layout():
    """HF rotates (x[i], x[i + d/2]) pairs (rotate_half); llama.cpp's llama rotates (x[2i], x[2i + 1]).  After
    ``permute_qk`` of the projection's rows, llama.cpp's rotation of each head equals the permuted HF one."""
    heads, d, pos, base = 2, 8, 3.0, 10000.0
    torch.manual_seed(0)
    w, x = torch.randn(heads * d, 16), torch.randn(16)
    theta = pos * base ** (-torch.arange(0, d, 2).float() / d)  # (d/2,)
    q = (w @ x).view(heads, d)
    cos, sin = torch.cat([theta.cos()] * 2), torch.cat([theta.sin()] * 2)
    hf = q * cos + torch.cat([-q[:, d // 2:], q[:, : d // 2]], -1) * sin  # transformers' apply_rotary_pos_emb
    qp = (permute_qk(w, heads) @ x).view(heads, d // 2, 2)
    x0, x1 = qp[..., 0], qp[..., 1]
    cpp = torch.stack([x0 * theta.cos() - x1 * theta.sin(), x0 * theta.sin() + x1 * theta.cos()], -1).view(heads, d)
    assert torch.allclose(cpp.reshape(-1), permute_qk(hf.reshape(-1, 1), heads).reshape(-1), atol=1e-6)
    assert torch.equal(unpermute_qk(permute_qk(w, heads), heads), w)


def gpt2(seed=0, **overrides):
    kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=96)
    kw.update(overrides)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()


GPT2_BLOCKS = r"h\.\d+\.(attn|mlp)\."


def gpt2_name(hf: str) -> str:
    fixed = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
    stem, leaf = hf.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    i, rest = stem.split(".")[2], ".".join(stem.split(".")[3:])
    part = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
            "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}[rest]
    return f"blk.{i}.{part}.{leaf}"


def test_gpt2_reads_back_transposed_on_the_grid(tmp_path):
    model = gpt2()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q8_0", p=0.5, include=GPT2_BLOCKS))
    kinds = save_gguf(model, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: (t.tensor_type.name, torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type))))
               for t in r.tensors}
    assert set(tensors) == set(kinds) and "output.weight" not in kinds  # GPT-2's head is tied to wte
    for key, w in plain.items():
        if key == "lm_head.weight":
            continue
        kind, got = tensors[gpt2_name(key)]
        if key.endswith(".weight") and (".attn." in key or ".mlp." in key):
            assert kind == "Q8_0" and torch.equal(got, G.q8_0_fake(w.t())), key  # Conv1D (in, out) -> (out, in)
        else:
            assert kind == "F32" and torch.equal(got, w), key
    expect = {"general.architecture": "gpt2", "gpt2.block_count": 2, "gpt2.context_length": 1024,
              "gpt2.embedding_length": 64, "gpt2.feed_forward_length": 256, "gpt2.attention.head_count": 4,
              "gpt2.vocab_size": 96, "general.file_type": 7}
    assert {k: fields[k] for k in expect} == expect


def test_gpt2_transformers_gguf_loader_gives_the_same_logits(tmp_path):
    tok = byte_bpe_tokenizer()  # transformers takes a gpt2 file's vocabulary size from its token list
    model = gpt2(seed=1, vocab_size=len(tok))
    quantize_(model, QuantNoiseConfig(scheme="scalar", grid="q4_0", p=1.0, eval_quantized=True, include=GPT2_BLOCKS))
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.tensor([[1, 5, 9, 17, 3, 44, 80]])
    with torch.no_grad():  # Conv1D's addmm on W.T vs the wrapper's linear: equal up to fp32 summation order
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gpt2_compressed_on_the_grid(tmp_path):
    model = gpt2(seed=2)
    compress_(model, LayerRule(pattern=GPT2_BLOCKS, scheme="scalar", grid="q4_0"))
    save_gguf(model, tmp_path / "m.gguf")
    r = GGUFReader(tmp_path / "m.gguf")
    got = {t.name: torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type))) for t in r.tensors}
    fc = model.transformer.h[1].mlp.c_fc
    assert torch.equal(got["blk.1.ffn_up.weight"], fc.weight.t()) and torch.equal(got["blk.1.ffn_up.bias"], fc.bias)


def byte_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_tokenizer_vocabulary_goes_into_the_file(tmp_path):
    tok = byte_bpe_tokenizer()
    n = len(tok) + 3  # a model vocabulary larger than the tokenizer's: the rest become [PAD{id}], unused
    save_gguf(llama(vocab_size=n), tmp_path / "m.gguf", tokenizer=tok)
    _, fields = read(tmp_path / "m.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(tokens) == len(types) == n
    assert all(tokens[i] == t for t, i in tok.get_vocab().items())
    assert tokens[-1] == f"[PAD{n - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tok.bos_token_id] == gguf.TokenType.CONTROL and types[10] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and fields["tokenizer.ggml.eos_token_id"] == 1
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == len(tok.get_vocab()) - 258 and all(len(m.split(" ")) == 2 for m in merges)


@pytest.mark.parametrize("case,match", [
    ("pq", "GGUF has no such type"), ("int8_rows", "not on a llama.cpp grid"), ("qn_int4", "quantnoise's scalar grid"),
    ("rope_scaling", "rope_scaling"), ("bert", "LlamaForCausalLM or GPT2LMHeadModel"),
    ("gpt2_gelu", "activation_function='gelu'"), ("bad_grid", "grid='q5_1' is unknown"),
    ("small_tokenizer_vocab", "vocab_size is 8")])
def test_refusals_are_one_line_and_leave_the_old_file(case, match, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    model, kwargs = llama(), {}
    if case == "pq":
        compress_(model, LayerRule(pattern=r"mlp\.up_proj", scheme="pq", block_size=8, n_centroids=4))
    elif case == "int8_rows":
        compress_(model, LayerRule(pattern=r"mlp\.up_proj", scheme="scalar", bits=8))
    elif case == "qn_int4":
        quantize_(model, QuantNoiseConfig(scheme="scalar", bits=4, include=BLOCKS))
    elif case == "rope_scaling":
        model = llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif case == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                                     num_attention_heads=2, intermediate_size=64))
    elif case == "gpt2_gelu":
        model = gpt2(activation_function="gelu")
    elif case == "bad_grid":
        kwargs["grid"] = "q5_1"
    else:
        model, kwargs["tokenizer"] = llama(vocab_size=8), byte_bpe_tokenizer()
    with pytest.raises(ValueError, match=match) as e:
        save_gguf(model, path, **kwargs)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.gguf"]
