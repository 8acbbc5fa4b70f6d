"""quantnoise against what a user would run instead: batch-1 CPU inference of one Llama, every peer on the same weights.

    python benchmarks/peers.py WORKDIR [--layers 12 --dim 768 --vocab 8000] [--threads 1 2] [--rounds 3]
                                  [--new-tokens 32] [--prefill 128] [--record PATH]
    python benchmarks/peers.py WORKDIR --quick     # a 2 x 128 Llama, 1 round, 1 thread: that it runs, not a figure

The model: a ``LlamaForCausalLM`` from a config (``--layers`` x ``--dim``, FFN 8/3 dim rounded to a multiple of 256,
heads of 64, ``--vocab``), random init (seed 0; speed does not depend on the values), built once in WORKDIR.  Cases:
  fp32                   the model, transformers' ``from_pretrained`` of its folder;
  quantnoise int8 / int4 ``compress_`` of every Linear and Embedding (per-row scales), ``hf.save_pretrained``, then
                         ``hf.from_pretrained`` (quantnoise's runtime layers);
  quantnoise pq          the same with pq, block 8, 256 centroids (k-means 4 iterations);
  torchao int8           torchao's ``Int8WeightOnlyConfig`` on the fp32 model (torchao has no CPU int4 weight-only path);
  quanto int8 / int4     optimum-quanto ``quantize(weights=qint8 | qint4)`` + ``freeze``;
  aqlm 1x8               every Linear of the pq model as ``aqlm.QuantizedLinear`` (1 codebook of 8 bits, in_group_size 8,
                         unit scales) holding **the same codes and centroids** (the embedding stays as the pq model's);
                         its numba CPU kernel runs on ``numba.set_num_threads(threads)``;
  llama.cpp q8_0 / q4_0  llama-cpp-python on ``hf.save_gguf`` of the model with every Linear and the embedding on the
                         grid (Quant-Noise wrappers at p = 1, i.e. llama.cpp's own Q8_0 / Q4_0 of the same weights),
                         in its own process (one per thread count), the same protocol.
A peer whose package is not importable gets a row saying so (``make peers`` installs them).

Measured: batch-1 greedy generation of ``--new-tokens`` tokens after an 8-token prompt (tokens/s; one new token per
forward with the KV cache: transformers' ``generate(do_sample=False)``, llama.cpp's eval + argmax), a prefill of
``--prefill`` tokens (one forward, tokens/s), at each ``--threads``; all Python cases in this process, interleaved in
a shuffled order every round (benchmarks/harness.py), medians over ``--rounds`` and the per-round ratio to fp32's
time.  RSS (VmRSS) after loading and after one prefill, each case in a fresh process (imports first, then the load:
the growth is the model's), and the bytes of its file (fp32 / quantnoise: the safetensors; llama.cpp: the GGUF;
torchao / quanto / aqlm, which quantize at load: their ``torch.save``'d state dict).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file (python benchmarks/peers.py): the repository root for the harness
    sys.path.insert(0, str(ROOT))
from benchmarks import harness  # noqa: E402

PY_CASES = ["fp32", "quantnoise int8", "quantnoise int4", "quantnoise pq", "torchao int8", "quanto int8",
            "quanto int4", "aqlm 1x8"]
GGUF_CASES = ["llama.cpp q8_0", "llama.cpp q4_0"]
CASES = PY_CASES + GGUF_CASES
NEEDS = {"torchao int8": "torchao", "quanto int8": "optimum.quanto", "quanto int4": "optimum.quanto",
         "aqlm 1x8": "aqlm", "llama.cpp q8_0": "llama_cpp", "llama.cpp q4_0": "llama_cpp"}
QN_RULES = {"quantnoise int8": dict(scheme="scalar", bits=8), "quantnoise int4": dict(scheme="scalar", bits=4),
            "quantnoise pq": dict(scheme="pq", block_size=8, n_centroids=256, kmeans_iters=4)}
PROMPT = 8  # prompt tokens before greedy generation


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def missing(case: str):
    """The module a case needs that is not importable (None when it runs)."""
    mod = NEEDS.get(case)
    if mod is None:
        return None
    try:
        importlib.import_module(mod)
        if mod == "aqlm":
            importlib.import_module("numba")  # its CPU kernel
    except Exception:  # ImportError, or a package that fails to load
        return mod if mod != "aqlm" else "aqlm (+ numba)"
    return None


# ------------------------------------------------------------------------------------ the model and its files
def llama_config(layers: int, dim: int, vocab: int):
    import transformers as tf

    ffn = max(256, round(dim * 8 / 3 / 256) * 256)
    heads = max(1, dim // 64)
    return tf.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                          rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)


def byte_bpe_tokenizer(vocab: int):
    """A byte-level BPE tokenizer trained here (nothing downloaded), ids < ``vocab``: llama.cpp needs one in the file."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 400), special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([harness.__doc__ or "quant noise"] * 4, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def folder(work: pathlib.Path, case: str) -> pathlib.Path:
    return work / case.replace(" ", "_").replace(".", "")


def prepare(work: pathlib.Path, layers: int, dim: int, vocab: int) -> None:
    """The model's folders in WORKDIR (each made once): fp32, quantnoise int8 / int4 / pq, and the two GGUFs."""
    import torch
    import transformers as tf

    from quantnoise import LayerRule, QuantNoiseConfig, compress_, quantize_
    from quantnoise import hf
    from quantnoise.hf.gguf import save_gguf

    key = {"layers": layers, "dim": dim, "vocab": vocab}
    stamp = work / "model.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        raise SystemExit(f"{work} holds a model of {stamp.read_text().strip()}, not {key}: use another WORKDIR")
    work.mkdir(parents=True, exist_ok=True)
    harness.write_json(stamp, key)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config(layers, dim, vocab)).eval()
    if not (folder(work, "fp32") / "model.safetensors").is_file():
        model.save_pretrained(folder(work, "fp32"))
    for case, rule in QN_RULES.items():
        if not (folder(work, case) / "model.safetensors").is_file():
            m = copy.deepcopy(model)
            compress_(m, LayerRule(pattern=".", **rule))
            hf.save_pretrained(m, folder(work, case))
            del m
    tok = byte_bpe_tokenizer(vocab)
    for case in GGUF_CASES:
        grid = case.split()[-1]
        path = folder(work, case).with_suffix(".gguf")
        if not path.is_file():
            m = copy.deepcopy(model)
            quantize_(m, QuantNoiseConfig(scheme="scalar", grid=grid, p=1.0))  # every Linear and the embedding
            save_gguf(m.eval(), path, tokenizer=tok)
            del m


# ------------------------------------------------------------------------------------ the Python cases
def load(work: pathlib.Path, case: str):
    """(model, file bytes) of a Python case."""
    import torch
    import transformers as tf

    from quantnoise import hf

    if case == "fp32":
        f = folder(work, "fp32")
        return tf.LlamaForCausalLM.from_pretrained(f).eval(), (f / "model.safetensors").stat().st_size
    if case in QN_RULES:
        f = folder(work, case)
        return hf.from_pretrained(f).eval(), (f / "model.safetensors").stat().st_size
    if case == "aqlm 1x8":
        model = aqlm_model(hf.from_pretrained(folder(work, "quantnoise pq")).eval())
    else:
        model = tf.LlamaForCausalLM.from_pretrained(folder(work, "fp32")).eval()
        if case == "torchao int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_ as ao_quantize_

            ao_quantize_(model, Int8WeightOnlyConfig())
        else:
            from optimum import quanto

            quanto.quantize(model, weights=quanto.qint8 if case == "quanto int8" else quanto.qint4)
            quanto.freeze(model)
    return model, state_dict_bytes(model, work / f".{case.replace(' ', '_')}.pt")


def state_dict_bytes(model, path: pathlib.Path):
    """The size of ``torch.save(model.state_dict())`` (None when the peer's tensors do not serialise)."""
    import torch

    try:
        torch.save(model.state_dict(), path)
        return path.stat().st_size
    except Exception:
        return None
    finally:
        path.unlink(missing_ok=True)


def aqlm_model(pq):
    """``pq`` (loaded by hf.from_pretrained) with every pq Linear as an ``aqlm.QuantizedLinear`` of the same codes:
    iPQ with 256 centroids and block b is AQLM 1x8 with in_group_size b, out_group_size 1, unit scales."""
    import aqlm
    import torch

    from quantnoise.nn import set_submodule
    from quantnoise.runtime import CodesLinear

    for name, m in list(pq.named_modules()):
        if not isinstance(m, CodesLinear):
            continue
        k, bs = m.centroids.shape
        out, inn = m.out_features, m.in_features
        q = aqlm.QuantizedLinear(inn, out, in_group_size=bs, out_group_size=1, num_codebooks=1, nbits_per_codebook=8,
                                 bias=m.bias is not None)
        with torch.no_grad():
            codes = m.codes.reshape(out, inn // bs).to(torch.uint8).view(torch.int8)
            q.codes.data = codes.reshape(out, inn // bs, 1).contiguous()
            cents = torch.zeros(256, bs)
            cents[:k] = m.centroids.float()
            q.codebooks.data = cents.reshape(1, 256, 1, bs)
            q.scales.data = torch.ones(out, 1, 1, 1)
            if m.bias is not None:
                q.bias.data = m.bias.detach().float().clone()
        set_submodule(pq, name, q)
    return pq


def inputs(vocab: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (1, n), generator=g)


def generate_fn(model, prompt, new_tokens: int):
    import torch

    def run():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    return run


def prefill_fn(model, ids):
    import torch

    def run():
        with torch.no_grad():
            model(ids, use_cache=False)
    return run


def python_speed(work, cases, threads, rounds, new_tokens, prefill, vocab) -> dict:
    """{threads: {"gen": interleaved(...), "prefill": interleaved(...)}} over the Python cases, one process."""
    import torch

    models, sizes = {}, {}
    for case in cases:
        t0 = time.perf_counter()
        models[case], sizes[case] = load(work, case)
        trim()
        print(f"peers: {case} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    prompt, ids = inputs(vocab, PROMPT, 1), inputs(vocab, prefill, 2)
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        if "aqlm 1x8" in cases:  # AQLM's CPU kernel is numba's prange: its threads, not torch's
            import numba

            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
        gen = {c: generate_fn(models[c], prompt, new_tokens) for c in cases}
        pre = {c: prefill_fn(models[c], ids) for c in cases}
        for c in cases:  # warm-up: lazy packing, numba compilation, caches
            gen[c](), pre[c]()
        base = "fp32" if "fp32" in cases else None
        t0 = time.perf_counter()
        out[t] = {"gen": harness.interleaved(gen, rounds, seed=t, baseline=base),
                  "prefill": harness.interleaved(pre, rounds, seed=100 + t, baseline=base)}
        print(f"peers: {t} thread(s), {rounds} round(s) of {len(cases)} Python cases in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return out, sizes


# ------------------------------------------------------------------------------------ llama.cpp (own process)
def llama_cpp_load(path, threads: int, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, seed=0, verbose=False)


def llama_cpp_child(work: pathlib.Path, threads: int, rounds: int, new_tokens: int, prefill: int, vocab: int) -> dict:
    import numpy as np

    n_ctx = max(prefill, PROMPT + new_tokens) + 8
    llms = {c: llama_cpp_load(folder(work, c).with_suffix(".gguf"), threads, n_ctx) for c in GGUF_CASES}
    prompt, ids = inputs(vocab, PROMPT, 1)[0].tolist(), inputs(vocab, prefill, 2)[0].tolist()

    def gen(llm):
        def run():
            llm.reset()
            llm.eval(prompt)
            for _ in range(new_tokens):  # greedy: argmax of the last logits, fed back (as generate(do_sample=False))
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return run

    def pre(llm):
        def run():
            llm.reset()
            llm.eval(ids)
        return run

    g = {c: gen(llm) for c, llm in llms.items()}
    p = {c: pre(llm) for c, llm in llms.items()}
    for c in GGUF_CASES:
        g[c](), p[c]()
    return {"gen": harness.interleaved(g, rounds, seed=threads), "prefill": harness.interleaved(p, rounds, seed=100 + threads)}


def rss_child(work: pathlib.Path, case: str, prefill: int, vocab: int) -> dict:
    """One fresh process: RSS after the imports a case needs, after its load, after one prefill."""
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401

    from quantnoise import hf  # noqa: F401
    if NEEDS.get(case):
        importlib.import_module(NEEDS[case])
    trim()
    before = rss()
    if case in GGUF_CASES:
        llm = llama_cpp_load(folder(work, case).with_suffix(".gguf"), 1, prefill + 8)
        after = rss()
        llm.eval(inputs(vocab, prefill, 2)[0].tolist())
    else:
        model, _ = load(work, case)
        trim()
        after = rss()
        prefill_fn(model, inputs(vocab, prefill, 2))()
    return {"before": before, "after_load": after, "after_prefill": rss()}


def child(args, *extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.child_threads), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, __file__, args.workdir, "--layers", str(args.layers), "--dim", str(args.dim),
                        "--vocab", str(args.vocab), "--rounds", str(args.rounds), "--new-tokens", str(args.new_tokens),
                        "--prefill", str(args.prefill), *extra], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ the table
def rows_of(cases, speed, gguf_speed, sizes, rss_rows, skipped, new_tokens, prefill, threads) -> list:
    rows = []
    for case in cases:
        row = {"case": case}
        if case in skipped:
            row["note"] = f"not installed ({skipped[case]})"
            rows.append(row)
            continue
        for t in threads:
            src = gguf_speed.get(t) if case in GGUF_CASES else speed.get(t)
            if src is None:
                continue
            gen, pre = src["gen"][case], src["prefill"][case]
            row[f"t{t}"] = {"gen_tok_s": new_tokens / gen["s"]["median"], "gen_s": gen["s"],
                            "prefill_tok_s": prefill / pre["s"]["median"], "prefill_s": pre["s"]}
        row["bytes"] = sizes.get(case)
        row["rss"] = rss_rows.get(case)
        rows.append(row)
    fp32 = next((r for r in rows if r["case"] == "fp32" and "note" not in r), None)
    for r in rows:  # tokens/s against fp32's: medians (the llama.cpp cases ran in another process, not interleaved)
        for t in threads:
            if fp32 and f"t{t}" in r and f"t{t}" in fp32:
                r[f"t{t}"]["gen_vs_fp32"] = r[f"t{t}"]["gen_tok_s"] / fp32[f"t{t}"]["gen_tok_s"]
                r[f"t{t}"]["prefill_vs_fp32"] = r[f"t{t}"]["prefill_tok_s"] / fp32[f"t{t}"]["prefill_tok_s"]
    return rows


def markdown(rows, threads, new_tokens, prefill) -> str:
    mib = 2 ** 20
    head = ["case"] + [f"gen {t}t tok/s (x fp32)" for t in threads] + [f"prefill {prefill} {t}t tok/s (x fp32)"
                                                                       for t in threads]
    head += ["RSS after load MiB", "file MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['case']} | {r['note']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["case"]]
        for key in ("gen", "prefill"):
            for t in threads:
                s = r.get(f"t{t}")
                cells.append("-" if s is None else f"{s[key + '_tok_s']:.1f} ({s.get(key + '_vs_fp32', 0):.2f}x)")
        rr = r.get("rss")
        cells.append("-" if not rr else f"{(rr['after_load'] - rr['before']) / mib:.1f}")
        cells.append("-" if r.get("bytes") is None else f"{r['bytes'] / mib:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peer_versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("torchao", "optimum-quanto", "aqlm", "numba", "llama_cpp_python", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES, metavar="CASE",
                   help=f"a subset of: {', '.join(repr(c) for c in CASES)}")
    p.add_argument("--skip-rss", action="store_true", help="speed only (no resident-memory child processes)")
    p.add_argument("--quick", action="store_true", help="a 2 x 128 Llama (vocabulary 512), 1 round, 1 thread, "
                                                        "8 new tokens, prefill 16: checks that it runs")
    harness.add_record_arg(p, "peers")
    p.add_argument("--child", choices=["llama_cpp", "rss"], help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.layers, a.dim, a.vocab, a.rounds, a.threads, a.new_tokens, a.prefill = 2, 128, 512, 1, [1], 8, 16
    work = pathlib.Path(a.workdir)
    if a.child == "llama_cpp":
        return print(json.dumps(llama_cpp_child(work, a.child_threads, a.rounds, a.new_tokens, a.prefill, a.vocab)))
    if a.child == "rss":
        return print(json.dumps(rss_child(work, a.child_case, a.prefill, a.vocab)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(a.threads)))
    prepare(work, a.layers, a.dim, a.vocab)
    skipped = {c: missing(c) for c in a.cases if missing(c)}
    run = [c for c in a.cases if c not in skipped]
    load_start = os.getloadavg()
    t0 = time.time()
    speed, sizes = python_speed(work, [c for c in run if c in PY_CASES], a.threads, a.rounds, a.new_tokens,
                                a.prefill, a.vocab) if any(c in PY_CASES for c in run) else ({}, {})
    gguf_speed = {}
    if any(c in GGUF_CASES for c in run):
        for t in a.threads:
            a.child_threads = t
            gguf_speed[t] = child(a, "--child", "llama_cpp", "--child-threads", str(t))
        for c in GGUF_CASES:
            sizes[c] = folder(work, c).with_suffix(".gguf").stat().st_size
    rss_rows = {}
    if not a.skip_rss:
        a.child_threads = 1
        for c in run:
            rss_rows[c] = child(a, "--child", "rss", "--child-case", c)
    rows = rows_of(a.cases, speed, gguf_speed, sizes, rss_rows, skipped, a.new_tokens, a.prefill, a.threads)
    config = {"layers": a.layers, "dim": a.dim, "vocab": a.vocab, "ffn": llama_config(a.layers, a.dim, a.vocab)
              .intermediate_size, "new_tokens": a.new_tokens, "prompt": PROMPT, "prefill": a.prefill,
              "rounds": a.rounds, "threads": a.threads, "quick": a.quick}
    print(f"Llama {a.layers}x{a.dim} (FFN {config['ffn']}, vocabulary {a.vocab}), batch-1 greedy {a.new_tokens} tokens "
          f"after {PROMPT}, prefill {a.prefill}, median of {a.rounds} round(s); load average "
          f"{' '.join(f'{x:.2f}' for x in load_start)} at the start, {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"at the end; {time.time() - t0:.0f} s")
    print(markdown(rows, a.threads, a.new_tokens, a.prefill))
    harness.save("peers", {"config": config, "rows": rows, "load_avg_start": [round(x, 2) for x in load_start],
                          "versions": peer_versions()},
                 a.record, threads=max(a.threads))


if __name__ == "__main__":
    main()
