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
