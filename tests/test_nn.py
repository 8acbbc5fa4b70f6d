"""Exactness of the wrappers: the properties issue 3 lists, each a test."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantnoise import QNConv2d, QuantNoiseConfig, quantize_, unquantize_
from quantnoise.nn import QuantNoiseMixin
from quantnoise import functional as QF

SCHEMES = [dict(scheme="drop"), dict(scheme="scalar", bits=8), dict(scheme="scalar", bits=4, symmetric=False),
           dict(scheme="pq", n_centroids=16)]


def cfg(**kw):
    base = dict(p=0.1, block_size=4, seed=0)
    return QuantNoiseConfig(**{**base, **kw})


def layers():
    torch.manual_seed(0)
    return {"linear": (nn.Linear(16, 24), torch.randn(5, 16)),
            "embedding": (nn.Embedding(50, 16, padding_idx=1), torch.randint(0, 50, (4, 9))),
            "conv1d": (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 10)),
            "conv2d": (nn.Conv2d(2, 6, 2), torch.randn(2, 2, 6, 6))}


def wrap(layer, c, name="layer"):
    from quantnoise.nn import wrapper_for

    return wrapper_for(layer).from_float(copy.deepcopy(layer), c, name)


def ref_channel_int(w, bits):
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    s = (rows.abs().amax(1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.clamp(torch.round(rows / s), -qmax, qmax) * s).view_as(w)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_p0_is_bit_identical_to_plain_layer(kind, scheme):
    plain, x = layers()[kind]
    qn = wrap(plain, cfg(**{**scheme, "p": 0.0}))
    out_plain, out_qn = plain(x), qn(x)
    assert torch.equal(out_plain, out_qn)
    g = torch.randn_like(out_plain)
    out_plain.backward(g)
    out_qn.backward(g)
    assert torch.equal(plain.weight.grad, qn.weight.grad)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_parameter_unchanged_by_many_forwards(kind, scheme):
    plain, x = layers()[kind]
    qn = wrap(plain, cfg(**scheme))
    before = qn.weight.detach().clone()
    for _ in range(10):
        qn(x)
    assert torch.equal(qn.weight, before)


def test_scalar_unselected_blocks_exact_selected_on_grid():
    lin = nn.Linear(32, 64, bias=False)
    qn = wrap(lin, cfg(scheme="scalar", bits=4, p=0.3))
    w_eff = qn(torch.eye(32)).t()  # identity input: the effective weight, exactly
    ref = ref_channel_int(lin.weight.detach(), 4)
    exact = QF.blocks(w_eff == lin.weight, 4).all(-1)
    on_grid = QF.blocks(w_eff == ref, 4).all(-1)
    assert (exact | on_grid).all()
    assert 0.15 < (on_grid & ~exact).float().mean() < 0.45  # about p of the blocks got noise


def test_scalar_p1_is_full_fake_quantization():
    lin, x = layers()["linear"]
    qn = wrap(lin, cfg(scheme="scalar", bits=8, p=1.0))
    assert torch.equal(qn(x), F.linear(x, ref_channel_int(lin.weight.detach(), 8), lin.bias))


def test_pq_selected_blocks_lie_on_a_centroid():
    lin = nn.Linear(32, 64, bias=False)
    qn = wrap(lin, cfg(scheme="pq", p=0.5, n_centroids=32))
    w_eff = qn(torch.eye(32)).t()
    b, c = QF.blocks(w_eff, 4).reshape(-1, 4), qn.qn_codebook
    on_centroid = (b[:, None, :] == c[None]).all(-1).any(-1)
    exact = QF.blocks(w_eff == lin.weight, 4).all(-1).reshape(-1)
    assert (on_centroid | exact).all() and (on_centroid & ~exact).any()


def test_drop_zeroes_blocks_and_rescales_the_rest():
    lin = nn.Linear(32, 16, bias=False)
    qn = wrap(lin, cfg(scheme="drop", p=0.25))
    w_eff = QF.blocks(qn(torch.eye(32)).t(), 4)  # (16, 8, 4): 128 blocks
    zero = (w_eff == 0).all(-1)
    assert 0.1 < zero.float().mean() < 0.4  # about p of the blocks dropped: neither none nor all
    assert torch.equal(w_eff[~zero], QF.blocks(lin.weight.detach() * (1 / 0.75), 4)[~zero])
    assert ((w_eff == 0).any(-1) == zero).all()  # a block is dropped whole or not at all


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_gradient_reaches_every_weight_straight_through(scheme):
    lin, x = layers()["linear"]
    qn = wrap(lin, cfg(**{**scheme, "p": 0.5}))
    g = torch.randn(5, 24)
    qn(x).backward(g)
    lin(x).backward(g)
    assert torch.equal(qn.weight.grad, lin.weight.grad)  # dL/dW = g^T x whatever W was


def test_masks_seeded_repeatable_and_fresh_each_step():
    def effective_weights(seed, steps=3):
        qn = wrap(nn.Linear(32, 16, bias=False), cfg(scheme="drop", p=0.5, seed=seed))
        torch.manual_seed(123)  # the global RNG must not matter
        return [qn(torch.eye(32)) for _ in range(steps)]

    torch.manual_seed(0)
    a = effective_weights(1)
    torch.manual_seed(0)
    b = effective_weights(1)
    c = effective_weights(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])
    assert not torch.equal(a[0], c[0])


def test_eval_mode_no_noise_by_default_and_full_quantization_on_request():
    lin, x = layers()["linear"]
    assert torch.equal(wrap(lin, cfg(scheme="scalar", p=0.5)).eval()(x), lin(x))
    full = wrap(lin, cfg(scheme="scalar", p=0.5, eval_quantized=True)).eval()
    assert torch.equal(full(x), F.linear(x, ref_channel_int(lin.weight.detach(), 8), lin.bias))


def test_embedding_noises_looked_up_rows_consistently():
    emb = nn.Embedding(100, 16, padding_idx=0)
    qn = wrap(emb, cfg(scheme="scalar", bits=4, p=1.0))
    ids = torch.tensor([[3, 7, 3, 0]])
    out = qn(ids)
    ref = ref_channel_int(emb.weight.detach(), 4)
    assert torch.equal(out[0], ref[ids[0]])
    out.sum().backward()
    assert qn.weight.grad[0].abs().sum() == 0  # padding row keeps no gradient
    assert torch.equal(qn.weight.grad[3], torch.full((16,), 2.0))  # looked up twice


def test_embedding_drop_same_id_same_noise():
    qn = wrap(nn.Embedding(20, 8), cfg(scheme="drop", p=0.5))
    out = qn(torch.tensor([5, 9, 5, 5]))
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3])


def test_conv2d_block_of_kernel_size_is_one_kernel():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    qn = wrap(conv, cfg(scheme="drop", p=0.5, block_size=9))
    w_eff = qn.noisy(qn.weight, 0.5)  # (4, 3, 3, 3)
    zero_kernels = (w_eff == 0).flatten(2).all(-1)  # (4, 3)
    nonzero_kernels = (w_eff != 0).flatten(2).all(-1)
    assert (zero_kernels | nonzero_kernels).all() and zero_kernels.any()
    assert isinstance(qn, QNConv2d) and isinstance(qn, nn.Conv2d)


def test_block_size_not_dividing_is_clear_error():
    with pytest.raises(ValueError) as e:
        wrap(nn.Linear(30, 8), cfg(block_size=8), name="decoder.fc1")
    msg = str(e.value)
    assert "decoder.fc1" in msg and "30" in msg and "block_size=8" in msg


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_dtype_follows_input(dtype, scheme):
    lin = nn.Linear(16, 8).to(dtype)
    qn = wrap(lin, cfg(**{**scheme, "p": 0.5}))
    out = qn(torch.randn(3, 16, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_pq_codebook_refreshes_every_n_steps():
    qn = wrap(nn.Linear(16, 32), cfg(scheme="pq", p=0.5, n_centroids=8, refresh_every=3))
    x = torch.randn(2, 16)
    qn(x)
    first = qn.qn_codebook
    with torch.no_grad():
        qn.weight.mul_(2)
    qn(x), qn(x)
    assert qn.qn_codebook is first
    qn(x)  # step 3: refresh on the new weights
    assert qn.qn_codebook is not first


def test_ema_observer_tracks_range_slowly():
    lin = nn.Linear(16, 8, bias=False)
    qn = wrap(lin, cfg(scheme="scalar", p=1.0, observer="ema", ema_momentum=0.5))
    x = torch.eye(16)
    qn(x)
    hi0 = qn.qn_hi.clone()
    with torch.no_grad():
        qn.weight.mul_(3)
    qn(x)
    assert torch.allclose(qn.qn_hi, hi0 * 2)  # halfway between old and 3x range


def test_state_dict_keys_and_values_load_both_ways():
    lin = nn.Linear(16, 8)
    qn = wrap(lin, cfg(scheme="pq", p=1.0, n_centroids=8))
    x = torch.randn(2, 16)
    qn(x)  # creates the (non-persistent) codebook
    assert qn.state_dict().keys() == lin.state_dict().keys()
    fresh = nn.Linear(16, 8)
    fresh.load_state_dict(qn.state_dict())  # wrapper -> plain
    assert all(torch.equal(fresh.state_dict()[k], lin.state_dict()[k]) for k in ("weight", "bias"))
    other = nn.Linear(16, 8)
    qn.load_state_dict(other.state_dict())  # plain -> wrapper
    assert all(torch.equal(qn.state_dict()[k], other.state_dict()[k]) for k in ("weight", "bias"))
    # ...and the noise follows the loaded weights: p=1 pq is the codebook of *these* weights
    assert torch.equal(qn(x), wrap(other, cfg(scheme="pq", p=1.0, n_centroids=8))(x))


def test_resume_continues_the_mask_sequence():
    """Masks are keyed on (update, forward within the update): a run that reports its updates with
    set_num_updates (fairseq does, before every micro-batch and after loading a checkpoint) replays
    the same masks after a resume, whatever number of micro-batches per update."""
    x = torch.eye(32)

    def run(layer, updates, micro=2):
        outs = []
        for u in updates:
            layer.set_num_updates(u)
            outs += [layer(x) for _ in range(micro)]
        return outs

    ran = wrap(nn.Linear(32, 16, bias=False), cfg(scheme="drop", p=0.5))
    whole = run(ran, range(5))
    resumed = wrap(nn.Linear(32, 16, bias=False), cfg(scheme="drop", p=0.5))
    resumed.load_state_dict(ran.state_dict())
    resumed.set_num_updates(3)  # what fairseq's trainer does after loading a checkpoint
    tail = run(resumed, range(3, 5))
    assert all(torch.equal(a, b) for a, b in zip(whole[6:], tail))
    assert len({tuple(o.flatten().tolist()) for o in whole}) == len(whole)  # every micro-batch its own mask


def test_without_set_num_updates_masks_change_every_training_forward():
    lin = nn.Linear(32, 16, bias=False)
    qn = wrap(lin, cfg(scheme="drop", p=0.5))
    outs = [qn(torch.eye(32)) for _ in range(4)]
    qn.eval()
    qn(torch.eye(32))  # eval forwards do not advance the sequence
    qn.train()
    outs.append(qn(torch.eye(32)))
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 5
    again = wrap(lin, cfg(scheme="drop", p=0.5))
    assert all(torch.equal(a, again(torch.eye(32))) for a in outs)


def _two_layer(c, checkpoint=None):
    torch.manual_seed(0)
    a, b = nn.Linear(16, 32), nn.Linear(32, 8)
    qa, qb = wrap(a, c, "a"), wrap(b, c, "b")

    def forward(x):
        block = lambda t: qb(torch.relu(qa(t)))  # noqa: E731
        return block(x) if checkpoint is None else torch.utils.checkpoint.checkpoint(block, x, use_reentrant=checkpoint)

    return forward, (qa, qb)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(map(str, s.values())))
def test_activation_checkpointing_recompute_reuses_the_mask(scheme, reentrant):
    """torch.utils.checkpoint re-runs the forward inside backward: it must see the same masks,
    so gradients equal those without checkpointing, micro-batch after micro-batch."""
    c = cfg(**{**scheme, "p": 0.5})
    x = torch.randn(6, 16, requires_grad=True)
    grads = []
    for ckpt in (None, reentrant):
        forward, layers = _two_layer(c, ckpt)
        got = []
        for update in range(2):
            for m in layers:
                m.set_num_updates(update)
            for _ in range(2):  # two micro-batches per update
                x.grad = None
                forward(x).pow(2).sum().backward()
                got.append([x.grad.clone()] + [m.weight.grad.clone() for m in layers])
                for m in layers:
                    m.weight.grad = None
        grads.append(got)
    plain, ckpt = grads
    assert all(torch.equal(g, h) for gs, hs in zip(plain, ckpt) for g, h in zip(gs, hs))
    assert not torch.equal(plain[0][0], plain[1][0])  # the two micro-batches did draw different masks


# ------------------------------------------------------------------ eval_quantized (issue 13.3)
def test_pq_eval_quantized_uses_a_codebook_of_the_current_weights():
    """Validation between training steps sees the codebook of the weights it evaluates, whether the
    optimizer wrote the Parameter (torch optimizers) or its ``.data`` (fairseq's); training keeps its
    own codebook, so evaluating does not change the training run."""
    c = cfg(scheme="pq", p=0.5, n_centroids=8, refresh_every=1000, eval_quantized=True)
    lin, x = nn.Linear(16, 24), torch.randn(5, 16)
    qn, twin = wrap(lin, c), wrap(lin, c)
    opt = torch.optim.SGD(qn.parameters(), lr=0.5)
    for write in ("param", "data"):
        qn.train()
        qn(x).pow(2).sum().backward()
        if write == "param":
            opt.step()
        else:
            with torch.no_grad():
                qn.weight.data.add_(qn.weight.grad, alpha=-0.5)  # fairseq's optimizers write p.data
        opt.zero_grad()
        qn.eval()
        now = nn.Linear(16, 24)
        now.load_state_dict(qn.state_dict())
        assert torch.equal(qn(x), wrap(now, c).eval()(x)), write  # k-means of the current weights
        assert not torch.equal(qn(x), now(x))
    qn.train()
    twin.train()
    twin.load_state_dict(qn.state_dict())
    twin.qn_codebook, twin.qn_codes = qn.qn_codebook, qn.qn_codes  # the codebook training built
    twin.qn_step, twin.qn_calls = qn.qn_step, qn.qn_calls
    assert torch.equal(qn(x), twin(x))  # evaluating did not replace the training codebook


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's own, from TransformerEncoder
@pytest.mark.parametrize("include", [None, "linear", "self_attn"])
def test_eval_quantized_reaches_torch_fused_encoder_fast_path(include):
    """nn.TransformerEncoderLayer / TransformerEncoder in eval under no_grad run one fused kernel on
    the raw weights; with eval_quantized the wrappers must still be used (with a padding mask
    TransformerEncoder hands its layers nested tensors)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    raw = copy.deepcopy(enc)
    quantize_(enc, QuantNoiseConfig(scheme="scalar", p=0.5, bits=4, block_size=4, eval_quantized=True,
                                    include=include))
    ref = copy.deepcopy(raw)  # the plain encoder (fused path) with the selected weights on the int4 grid
    with torch.no_grad():
        for n, m in enc.named_modules():
            if isinstance(m, QuantNoiseMixin):
                name = "in_proj_weight" if isinstance(m, nn.MultiheadAttention) else "weight"
                ref.get_submodule(n).get_parameter(name).copy_(ref_channel_int(m.weight, 4))
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:], pad[2, 2:] = True, True
    with torch.no_grad():
        got = enc.layers[0](x)
        torch.testing.assert_close(got, ref.layers[0](x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, raw.layers[0](x), atol=1e-3)  # the quantization is visible
        got, want = enc(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- embedding masks (issue 13.4)
def test_embedding_row_mask_does_not_depend_on_the_batch():
    """A vocabulary row's mask is a function of (seed, layer, step, row) only: two batches sharing
    the row (as two ranks would) noise it identically at the same step, and the whole table agrees."""
    c = cfg(scheme="drop", p=0.5)
    emb = nn.Embedding(64, 16)
    qa, qb, qall = wrap(emb, c, "emb"), wrap(emb, c, "emb"), wrap(emb, c, "emb")
    a, b = torch.tensor([[40, 3, 9]]), torch.tensor([[1, 2, 5, 7, 9, 11, 40, 63]])
    seen = []
    for step in range(4):
        torch.manual_seed(step)  # the global RNG (different on every rank) must not matter
        oa, ob, oall = qa(a), qb(b), qall(torch.arange(64))
        assert torch.equal(oa[0, 0], ob[0, 6]) and torch.equal(oa[0, 2], ob[0, 4])  # rows 40 and 9
        assert torch.equal(oa[0], oall[a[0]]) and torch.equal(ob[0], oall[b[0]])
        seen.append(oall)
    assert not torch.equal(seen[0], seen[1])  # ...and it changes with the step
    dropped = torch.stack([(QF.blocks(o, 4) == 0).all(-1) for o in seen])  # (4, 64, 4)
    assert 0.4 < dropped.float().mean() < 0.6


def test_embedding_scale_grad_by_freq_uses_the_same_row_masks():
    c = cfg(scheme="drop", p=0.5)
    emb = nn.Embedding(64, 16)
    freq = nn.Embedding(64, 16, scale_grad_by_freq=True)
    freq.load_state_dict(emb.state_dict())
    ids = torch.tensor([5, 9, 5, 60])
    assert torch.equal(wrap(emb, c, "emb")(ids), wrap(freq, c, "emb")(ids))


RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from torch import nn
from quantnoise import QuantNoiseConfig
from quantnoise.nn import QNEmbedding
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(rank)  # ranks differ in everything but the noise config and the weights
emb = nn.Embedding(1000, 32)
with torch.no_grad():
    emb.weight.copy_(torch.arange(32000.).view(1000, 32))
qn = QNEmbedding.from_float(emb, QuantNoiseConfig(scheme="drop", p=0.5, block_size=4, seed=7), "embed_tokens")
shared = torch.tensor([17, 500, 999])
for step in range(3):
    own = torch.randint(0, 1000, (2, 50))  # each rank its own batch, holding the shared rows
    ids = torch.cat([own[:, :20], shared.expand(2, 3), own[:, 20:]], 1)[:, torch.randperm(53)]
    out = qn(ids)
    rows = torch.stack([out[ids == r][0] for r in shared])
    both = [torch.empty_like(rows) for _ in range(2)]
    dist.all_gather(both, rows)
    assert torch.equal(both[0], both[1]), f"step {step}: ranks noise shared rows differently"
    assert (rows == 0).any() and (rows != 0).any()
print("rank", rank, "ok")
"""


@pytest.mark.slow  # two processes importing torch: seconds on an idle machine, more on a loaded one
def test_embedding_masks_identical_on_two_gloo_ranks_with_different_batches(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for r in (0, 1)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert all(f"rank {r} ok" in log for r, log in enumerate(logs))


# --------------------------------------------------------- attention with bias_kv (issue 13.13)
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_with_bias_kv_and_zero_attn(batch_first):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True, batch_first=batch_first)
    model = nn.Sequential(copy.deepcopy(plain))
    orig = model[0]
    assert quantize_(model, QuantNoiseConfig(scheme="scalar", p=0.0, block_size=4)) == ["0", "0.out_proj"]
    qn = model[0]
    assert qn.bias_k is orig.bias_k and qn.bias_v is orig.bias_v  # the same Parameters, carried over
    assert torch.equal(qn.bias_k, plain.bias_k) and torch.equal(qn.bias_v, plain.bias_v)
    x = torch.randn(5, 3, 16)
    pad = torch.zeros(5 if batch_first else 3, 3 if batch_first else 5, dtype=torch.bool)
    pad[0, -1] = True
    out, w = qn(x, x, x, key_padding_mask=pad)
    ref, rw = plain(x, x, x, key_padding_mask=pad)
    assert torch.equal(out, ref) and torch.equal(w, rw)
    noisy = nn.Sequential(copy.deepcopy(plain))
    quantize_(noisy, QuantNoiseConfig(scheme="scalar", p=1.0, bits=2, block_size=4))
    noisy[0](x, x, x)[0].sum().backward()
    assert noisy[0].bias_k.grad.abs().sum() > 0
    one = x[:, 0]  # unbatched (T, E) input: the same as a batch of one (p=1, so the same noise)
    batch = one.unsqueeze(0 if batch_first else 1)
    assert torch.equal(noisy[0](one, one, one)[0], noisy[0](batch, batch, batch)[0].squeeze(0 if batch_first else 1))
    unquantize_(model)
    assert type(model[0]) is nn.MultiheadAttention and model[0].bias_k is qn.bias_k
    assert torch.equal(model[0](x, x, x, key_padding_mask=pad)[0], ref)
