"""quantnoise.hf.save_gguf's files run in llama.cpp itself (llama-cpp-python): a tiny Llama on the q4_0 / q8_0 grid
gives the logits of the fake-quantized PyTorch model within a stated tolerance, and greedy generation agrees token for
token.  Marked ``peers``: ``make peers`` builds llama-cpp-python from source and runs them; without it they skip.

Tolerances, as max |llama.cpp logit - PyTorch logit| / max |PyTorch logit| over 24 positions (max |logit| ~10), the KV
cache in F32 (llama.cpp's default F16 cache adds ~5e-5), measured with llama-cpp-python 0.3.36 on an AVX-512 Xeon:
  - against the fake-quantized model (the weights on the grid, activations fp32): F32 file 3.8e-7, q8_0 3.9e-3,
    q4_0 4.4e-3; asserted below 1e-5 / 2e-2 / 2e-2.  The q8_0 / q4_0 gap is not the weights (they are bit-identical,
    tests/test_hf_gguf.py) but llama.cpp's matmuls: a Q4_0 / Q8_0 weight is multiplied with the *activations quantized
    to Q8_0* (blocks of 32 inputs, one fp16 scale: ggml's vec_dot_q4_0_q8_0 / vec_dot_q8_0_q8_0);
  - against that model with every grid Linear's input put on Q8_0 too (``grids.q8_0_fake``, what llama.cpp computes):
    2.9e-7 (q8_0) / 3.9e-7 (q4_0), fp32 rounding; asserted below 1e-5.
"""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:  # an optional peer: `make peers` builds it
    llama_cpp = None

from quantnoise import LayerRule, compress_  # noqa: E402
from quantnoise import grids as G  # noqa: E402
from quantnoise.compress.layers import ScalarMixin  # noqa: E402
from quantnoise.hf.gguf import save_gguf  # noqa: E402
from test_hf_gguf import byte_bpe_tokenizer  # noqa: E402

pytestmark = [pytest.mark.peers, pytest.mark.skipif(
    llama_cpp is None, reason="llama_cpp is not importable: `make peers` builds llama-cpp-python (llama.cpp) and runs "
                              "these tests")]

LINEARS = r"layers\.\d+\.(self_attn|mlp)\.|lm_head"  # every Linear; embeddings and norms stay F32
TOL = {None: 1e-5, "q8_0": 2e-2, "q4_0": 2e-2}  # max |logit difference| / max |logit| (see the docstring)
TOL_Q8_INPUTS = 1e-5  # the same, against the model whose grid Linears take Q8_0 inputs, as llama.cpp's do
F32 = 0  # ggml's GGML_TYPE_F32: the KV cache's type


@pytest.fixture(scope="module")
def trained():
    return trained_llama()


def trained_llama():
    """(tiny Llama trained 150 steps to continue a fixed token stream: peaked logits, so greedy choices are not ties;
    its tokenizer, the stream)."""
    tok = byte_bpe_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(2, len(tok), (64,), generator=g).repeat(4)  # a 64-token cycle, repeated
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~0.05 s a step on one core; OpenMP threads spinning on a busy machine take 20x that
    try:
        for step in range(150):
            start = int(torch.randint(0, 128, (1,), generator=g))
            ids = stream[start:start + 96].unsqueeze(0)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok, stream


def on_grid(model, grid):
    import copy

    model = copy.deepcopy(model)
    if grid is not None:
        compress_(model, LayerRule(pattern=LINEARS, scheme="scalar", grid=grid))
    return model


def load(path, n_ctx=128):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                           n_threads_batch=1, type_k=F32, type_v=F32, seed=0, verbose=False)


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def q8_0_inputs(model):
    """Forward pre-hooks putting the input of every layer on a grid on Q8_0, row by row (llama.cpp's matmul)."""
    def hook(module, args):
        x = args[0]
        return (G.q8_0_fake(x.reshape(-1, x.shape[-1])).reshape(x.shape),)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, ScalarMixin) and m.grid]


@pytest.mark.parametrize("grid", [None, "q8_0", "q4_0"])
def test_llama_cpp_logits_match_the_fake_quantized_model(trained, grid, tmp_path):
    model, tok, stream = trained
    model = on_grid(model, grid)
    kinds = save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    assert kinds["blk.0.ffn_down.weight"] == (grid or "f32") and kinds["output.weight"] == (grid or "f32")
    ids = stream[5:29].tolist()
    got = llama_cpp_logits(load(tmp_path / "m.gguf"), ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        hooks = q8_0_inputs(model)
        emulated = model(torch.tensor([ids])).logits[0].numpy()
    for h in hooks:
        h.remove()
    assert len(hooks) == (0 if grid is None else 2 * 7 + 1)
    scale = np.abs(ref).max()
    rel, rel_q8 = float(np.abs(got - ref).max() / scale), float(np.abs(got - emulated).max() / scale)
    print(f"grid {grid}: max |llama.cpp - torch| / max |logit| = {rel:.2e}, with Q8_0 inputs {rel_q8:.2e} "
          f"(max |logit| {scale:.2f})")
    assert rel < TOL[grid] and rel_q8 < TOL_Q8_INPUTS
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("grid", ["q8_0", "q4_0"])
def test_greedy_generation_agrees_token_for_token(trained, grid, tmp_path):
    model, tok, stream = trained
    model = on_grid(model, grid)
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tok)
    prompt = stream[10:18].tolist()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    llm = load(tmp_path / "m.gguf")
    llm.reset()
    llm.eval(prompt)
    got = []
    for _ in range(16):  # greedy: the argmax of the last position's logits, fed back
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    assert got == want
