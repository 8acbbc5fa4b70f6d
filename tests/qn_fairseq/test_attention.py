"""Our noise reaches fairseq's attention projections (stock fairseq's hooks never fire there)."""
import argparse

import pytest
import torch

from conftest import USER_DIR


def build_lm(data, *flags):
    from fairseq import options, tasks, utils

    utils.import_user_module(argparse.Namespace(user_dir=USER_DIR))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", "language_modeling", "--user-dir", USER_DIR,
                                                "--tokens-per-sample", "16", *flags])
    task = tasks.setup_task(args)
    return task.build_model(args), task


def count_forward_calls(model, modules):
    calls = {name: 0 for name in modules}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: calls.__setitem__(n, calls[n] + 1)) for n in modules]
    return calls, handles


@pytest.mark.slow
def test_noise_reaches_every_attention_projection(lm_data):
    from quantnoise import wrapped_layers

    model, task = build_lm(lm_data, "--arch", "qn_transformer_lm_tiny", "--quant-noise-scheme", "scalar",
                           "--quant-noise-p", "0.5", "--quant-noise-bits", "4")
    names = wrapped_layers(model)
    attn = [n for n in names if "self_attn" in n]
    assert len(attn) == 4 * 2  # q, k, v, out in both layers
    calls, _ = count_forward_calls(model, names)
    model.train()
    tokens = torch.randint(4, len(task.dictionary), (2, 16))
    model(tokens)[0].sum().backward()
    assert all(c == 1 for c in calls.values()), calls
    # the noise changes what attention computes: with p=0 the same call is deterministic
    q = model.get_submodule(attn[0])
    assert not torch.equal(q.noisy(q.weight, 0.5), q.weight)


@pytest.mark.slow
def test_stock_fairseq_hooks_skip_attention(lm_data):
    """The failure our wrappers fix, measured: fairseq's own --quant-noise-pq hooks on q/k/v/out_proj
    never run, because its MultiheadAttention fast path reads the weights directly."""
    model, task = build_lm(lm_data, "--arch", "transformer_lm", "--decoder-embed-dim", "64",
                           "--decoder-ffn-embed-dim", "128", "--decoder-layers", "2", "--decoder-attention-heads", "4",
                           "--decoder-input-dim", "64", "--decoder-output-dim", "64", "--quant-noise-pq", "0.1",
                           "--quant-noise-pq-block-size", "8")
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks]
    proj = [n for n in hooked if "self_attn" in n]
    assert proj
    calls, _ = count_forward_calls(model, hooked)
    model.train()
    model(torch.randint(4, len(task.dictionary), (2, 16)))
    assert all(calls[n] == 0 for n in proj) and any(calls[n] for n in hooked if n not in proj)


def test_routed_attention_equals_fairseq_fast_path():
    """A routed MultiheadAttention calls its projection modules and, in eval, computes what fairseq's fast path
    (F.multi_head_attention_forward) does, with fused attention: causal float mask, bool mask, key padding,
    encoder-decoder keys; returned weights and incremental decoding go to fairseq's own forward."""
    from fairseq.modules import MultiheadAttention

    from quantnoise.runtime import fairseq_plugin

    route_attention = fairseq_plugin().route_attention  # the plugin as fairseq's --user-dir imports it (qn_fairseq)

    torch.manual_seed(0)
    for self_attn in (True, False):
        plain = MultiheadAttention(32, 4, dropout=0.1, self_attention=self_attn,
                                   encoder_decoder_attention=not self_attn).eval()
        routed = MultiheadAttention(32, 4, dropout=0.1, self_attention=self_attn,
                                    encoder_decoder_attention=not self_attn).eval()
        routed.load_state_dict(plain.state_dict())
        model = torch.nn.Module()
        model.attn = routed
        route_attention(model)
        assert type(routed).__name__ == "RoutedMultiheadAttention" and routed.skip_embed_dim_check
        calls = []
        routed.q_proj.register_forward_hook(lambda *a: calls.append(1))
        T, S, B = 7, 7 if self_attn else 5, 3
        x, mem = torch.randn(T, B, 32), torch.randn(S, B, 32)
        key = x if self_attn else mem
        causal = torch.triu(torch.full((T, S), float("-inf")), 1)
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, -2:] = True
        for attn_mask, kpm in ((None, None), (causal, None), (causal, pad), (None, pad), (causal.isinf(), pad)):
            want, _ = plain(x, key, key, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
            got, w = routed(x, key, key, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
            assert w is None
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want, want_w = plain(x, key, key, need_weights=True)  # weights asked: fairseq's manual path
        got, got_w = routed(x, key, key, need_weights=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
        assert len(calls) == 6
    import pickle  # a module-level class: a whole model pickles (and deep-copies, fairseq's --ema)

    routed.q_proj._forward_hooks.clear()  # the test's counting hook (a lambda) does not pickle
    assert type(pickle.loads(pickle.dumps(routed))) is type(routed)
    routed.train()  # training with attention dropout: fairseq's own (manual) path, seeded the same
    torch.manual_seed(1)
    a, _ = routed(x, key, key, need_weights=False)
    torch.manual_seed(1)
    b, _ = super(type(routed), routed).forward(x, key, key, need_weights=False)
    assert torch.equal(a, b)
