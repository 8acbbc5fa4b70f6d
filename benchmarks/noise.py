"""Benchmark: cost of Quant-Noise per layer, ours vs fairseq's, as ratios to the plain layer.

Forward+backward of Linear(1024,4096) and Linear(4096,1024) on 2048 tokens and Embedding(32000,512)
on 2048 ids; plain vs our drop / scalar int8 / scalar int4 / pq vs fairseq's ``quant_noise`` hook
and ``IntLinear``/``IntEmbedding``, all at p=0.1, block 8.  Implementations are interleaved inside
each round and every time is divided by the plain time of the same round; the table gives the
median ratio over rounds (absolute times drift on a shared machine).  Memory: bytes allocated by
one forward (torch profiler), minus the plain layer's, as a multiple of the weight's bytes.

fairseq's scalar path calls ``.cuda()``; inside this benchmark only, ``Tensor.cuda`` is a no-op so
it runs on CPU.  fairseq's hook overwrites ``weight.data``; the weight is restored before each call.

    python benchmarks/noise.py [--rounds 7] [--iters 3] [--markdown] [--layer Embedding] [--ours-only]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import pathlib
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as a file (python benchmarks/noise.py): the repository root for benchmarks.harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, interleaved, machine, save  # noqa: E402
from quantnoise import QuantNoiseConfig
from quantnoise.nn import wrapper_for

P, BLOCK, TOKENS = 0.1, 8, 2048


@contextlib.contextmanager
def cuda_is_noop():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def ours(layer, **kw):
    return wrapper_for(layer).from_float(copy.deepcopy(layer), QuantNoiseConfig(p=P, block_size=BLOCK, seed=0, **kw), "bench")


def fairseq_hook(layer):
    from fairseq.modules.quant_noise import quant_noise

    return quant_noise(copy.deepcopy(layer), P, BLOCK)


def fairseq_int(layer):
    from fairseq.modules.quantization.scalar.modules import IntEmbedding, IntLinear

    if isinstance(layer, nn.Embedding):
        m = IntEmbedding(layer.num_embeddings, layer.embedding_dim, p=P, bits=8, method="histogram")
    else:
        m = IntLinear(layer.in_features, layer.out_features, p=P, bits=8, method="histogram")
        m.bias.data.copy_(layer.bias.data)
    m.weight.data.copy_(layer.weight.data)
    return m


def cases(layer, ours_only=False):
    if ours_only:
        return {k: v for k, v in cases(layer).items() if not k.startswith("fairseq")}
    return {
        "plain": copy.deepcopy(layer),
        "ours drop": ours(layer, scheme="drop"),
        "ours scalar int8": ours(layer, scheme="scalar", bits=8),
        "ours scalar int4": ours(layer, scheme="scalar", bits=4),
        "ours pq": ours(layer, scheme="pq", n_centroids=256),
        "fairseq quant_noise": fairseq_hook(layer),
        "fairseq Int*": fairseq_int(layer),
    }


def step(m, x, w0):
    if w0 is not None:  # undo fairseq's in-place weight overwrite (outside the timed region)
        m.weight.data.copy_(w0)
    m.zero_grad(set_to_none=True)
    t = time.perf_counter()
    m(x).float().sum().backward()
    return time.perf_counter() - t


def bytes_allocated(m, x) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m(x)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def bench(name, layer, x, rounds, iters, ours_only=False):
    impls = cases(layer, ours_only)
    w0 = {k: (m.weight.detach().clone() if k == "fairseq quant_noise" else None) for k, m in impls.items()}
    for k, m in impls.items():  # warm-up: first pq forward builds the codebook, Int* its scale
        m.train()
        step(m, x, w0[k])
    timed = interleaved({k: (lambda m=m, k=k: min(step(m, x, w0[k]) for _ in range(iters))) for k, m in impls.items()},
                        rounds, seed=0, baseline="plain")
    wbytes = layer.weight.numel() * layer.weight.element_size()
    plain_bytes = bytes_allocated(impls["plain"], x)
    rows = []
    for k, m in impls.items():
        if w0[k] is not None:
            m.weight.data.copy_(w0[k])
        extra = (bytes_allocated(m, x) - plain_bytes) / wbytes
        rows.append((name, k, timed[k]["ratio"], extra))
    return rows, timed["plain"]["s"]["median"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="calls per implementation per round (min taken)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--layer", default="", help="only the layers whose name contains this text, e.g. Embedding")
    ap.add_argument("--ours-only", action="store_true", help="skip fairseq's implementations")
    add_record_arg(ap, "noise")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layers = [("Linear(1024,4096)", nn.Linear(1024, 4096), torch.randn(TOKENS, 1024)),
              ("Linear(4096,1024)", nn.Linear(4096, 1024), torch.randn(TOKENS, 4096)),
              ("Embedding(32000,512)", nn.Embedding(32000, 512), torch.randint(0, 32000, (TOKENS,)))]
    layers = [case for case in layers if a.layer in case[0]]
    rows, plains = [], {}
    with cuda_is_noop():
        for name, layer, x in layers:
            r, plains[name] = bench(name, layer, x, a.rounds, a.iters, a.ours_only)
            rows += r
    m = machine(a.threads)
    print(f"date {datetime.date.today()}, {m['cores']} cores ({m['cpu']}, {m['isa']}), torch {torch.__version__}, "
          f"{a.threads} threads, load average {' / '.join(map(str, m['load_avg']))}, {a.rounds} rounds x {a.iters} "
          f"calls, p={P}, block={BLOCK}")
    print("plain fwd+bwd medians: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in plains.items()))
    if a.markdown:
        print("\n| layer | implementation | time / plain (median) | extra bytes per forward / weight bytes |")
        print("|---|---|---|---|")
        for layer, impl, ratio, extra in rows:
            print(f"| {layer} | {impl} | {ratio['median']:.3f}x | {extra:.2f}x |")
    else:
        for layer, impl, ratio, extra in rows:
            print(f"{layer:22s} {impl:22s} {ratio['median']:7.3f}x time {extra:6.2f}x weight extra bytes")
    save("noise", {"p": P, "block": BLOCK, "tokens": TOKENS, "rounds": a.rounds, "iters": a.iters,
                   "plain_s": plains,
                   "rows": [{"layer": layer, "impl": impl, "ratio": ratio, "extra_bytes_x_weight": extra}
                            for layer, impl, ratio, extra in rows]}, a.record, threads=a.threads)


if __name__ == "__main__":
    main()
