"""Inference of a .qnz run compressed (quantnoise.runtime) against fp32 and the decoded model.

    python benchmarks/infer.py WORKDIR [--threads 1 2] [--rounds 3] [--gen-tokens 48]
    python benchmarks/infer.py WORKDIR --kernels [--shapes 384x384 ...] [--tokens 1 16]   # pq Linear kernels
    python benchmarks/infer.py WORKDIR --one-process [--threads 1 2] [--rounds 7]   # all cases in one process
    python benchmarks/infer.py WORKDIR --model roberta_base [--threads 1 2] [--rounds 3] [--reps 3]

Setup (cached in WORKDIR, not committed): the generated stdlib-docstring corpus (scripts/make_corpus.py),
binarised; a 6x512 ``transformer_lm`` (FFN 2048, 8 heads, tied input/output embedding) trained for 1
update by ``fairseq-train`` (speed and memory do not depend on training); ``quantnoise quantize`` pq
(b=8, k=256, 4 k-means iterations), int8 and int4 of every Linear/Embedding; ``quantnoise export``.

Cases, each in its own process (``--worker``), interleaved in a shuffled order every round:
  fp32         the fairseq checkpoint, stock loader;
  decoded-pq   pq.qnz with QUANTNOISE_QNZ_DECODE=1 (decoded to fp32 when loaded, the pre-runtime path);
  pq/int8/int4 the .qnz through the plugin, compressed runtime layers (and the runtime's lean incremental step:
               qn_fairseq/runtime.py ``use_lean_step``);
  (--one-process only: pq-table, pq on the look-up table; fp32-lean, fp32 through the same lean step.)
Per case: RSS (psutil) and peak RSS (getrusage ru_maxrss) before loading (imports, the task's dictionary and
one build of the architecture on the meta device, which imports ~70 MiB of modules: the process' fixed
overhead), after loading and after generating; batch-1 greedy generation, tokens/s
(one new token per forward through fairseq's incremental state, 4 warm-up tokens not timed); and
``fairseq-eval-lm`` on the valid split (a real corpus; 512-token blocks), tokens/s from its log and its
peak RSS.  Ratios are taken against fp32 within each round and thread count; the table gives medians.
A roofline table follows: per case, the bytes and operations a generated token costs in the Linear layers
against a read bandwidth (over a buffer of that many bytes) and an fp32 matmul peak measured in the case's
own process right after its generation (``weight_traffic``, ``machine_limits``), and which bound it is at.

``--model roberta_base``: fairseq's ``roberta_base`` (12x768, FFN 3072; vocabulary: the corpus' dictionary) trained
1 update with ``--task masked_lm`` on the same corpus, saved without optimizer state (the fp32 file is the model),
quantized the same way (files and results.jsonl in WORKDIR/roberta_base).  Each case is loaded by
``RobertaModel.from_pretrained`` of the folder holding the checkpoint / .qnz (with the plugin); an encoder
generates nothing, so the speed is masked-LM forwards (encoder + LM head at every position), tokens/s: batch 1
over ``ENCODE_LENGTHS`` (short sentences one at a time, the serving case) and a batch of 8 x 128 tokens.
"""
import argparse
import json
import os
import pathlib
import random
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file (python benchmarks/infer.py): the repository root for the harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
BIN = pathlib.Path(sys.executable).parent
USER_DIR = ROOT / "quantnoise" / "qn_fairseq"
CASES = ["fp32", "decoded-pq", "pq", "int8", "int4"]
QUANT = {"pq": ["--scheme", "pq", "--block-size", "8", "--centroids", "256", "--iters", "4"],
         "int8": ["--scheme", "scalar", "--bits", "8"], "int4": ["--scheme", "scalar", "--bits", "4"]}
MODELS = {  # fairseq-train flags of each benchmarked model (1 update, then quantized as QUANT says)
    "lm": ["--task", "language_modeling", "--arch", "transformer_lm", "--share-decoder-input-output-embed",
           "--tokens-per-sample", "512", "--max-tokens", "2048"],
    "lm16": ["--task", "language_modeling", "--arch", "transformer_lm", "--share-decoder-input-output-embed",
             "--decoder-layers", "16", "--decoder-embed-dim", "1024", "--decoder-ffn-embed-dim", "4096",
             "--decoder-attention-heads", "16", "--tokens-per-sample", "512", "--max-tokens", "1024"],
    "roberta_base": ["--task", "masked_lm", "--criterion", "masked_lm", "--arch", "roberta_base",
                     "--tokens-per-sample", "128", "--max-tokens", "1024", "--no-save-optimizer-state"],
}
MODEL_DIR = {"lm": ".", "lm16": "lm16", "roberta_base": "roberta_base"}
DATA = {"lm": ("bin", 6000, ["--thresholdsrc", "2"]), "lm16": ("bin4k", 40000, ["--nwordssrc", "4000"]),
        "roberta_base": ("bin", 6000, ["--thresholdsrc", "2"])}  # binarised corpus: folder, lines, dictionary flags
LMS = ("lm", "lm16")
SPEEDS = {  # (result key, column, key of the kernels it used) per model
    "lm": [("gen_tok_s", "gen", "gen_kernels"), ("eval_tok_s", "eval-lm", "eval_kernels")],
    "roberta_base": [("b1_tok_s", "batch-1", "b1_kernels"), ("b8_tok_s", "8x128", "b8_kernels")],
}
SPEEDS["lm16"] = SPEEDS["lm"]
ENCODE_LENGTHS = (12, 16, 20, 24, 28, 32, 16, 24)  # batch 1: short sentences, one forward each


def sh(cmd, env=None, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    if out.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{out.stderr[-3000:]}")
    return out


def setup(work: pathlib.Path, model: str = "lm") -> dict:
    """The corpus (``DATA``: WORKDIR/bin, shared by the 6x512 LM and the encoder; WORKDIR/bin4k for lm16), and the
    fp32 checkpoint and .qnz files of ``model`` (``MODEL_DIR``: WORKDIR for the 6x512 LM, WORKDIR/lm16,
    WORKDIR/roberta_base) with its results file."""
    work.mkdir(parents=True, exist_ok=True)
    folder, lines, dict_flags = DATA[model]
    data, txt, mdir = work / folder, work / f"txt{lines}", work / MODEL_DIR[model]
    if not (data / "dict.txt").exists():
        sh([sys.executable, ROOT / "scripts" / "make_corpus.py", txt, "--max-lines", lines])
        sh([BIN / "fairseq-preprocess", "--only-source", "--trainpref", txt / "train.txt", "--validpref",
            txt / "valid.txt", "--destdir", data, "--workers", "1", *dict_flags])
    ckpt = mdir / "fp32" / "checkpoint_last.pt"
    if not ckpt.exists():
        sh([BIN / "fairseq-train", data, *MODELS[model], "--optimizer", "adam", "--lr", "0.0005", "--max-update", "1",
            "--save-dir", mdir / "fp32", "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0",
            "--seed", "1"], env={"OMP_NUM_THREADS": "2"})
    paths = {"fp32": ckpt}
    for scheme, flags in QUANT.items():
        qnz = mdir / f"{scheme}.qnz"
        if not qnz.exists():
            sh([sys.executable, "-m", "quantnoise.cli", "quantize", ckpt, "-o", mdir / f"{scheme}.pt", *flags])
            sh([sys.executable, "-m", "quantnoise.cli", "export", mdir / f"{scheme}.pt", "-o", qnz])
        paths[scheme] = qnz
    paths["decoded-pq"] = paths["pq"]
    return {"data": data, "paths": paths, "results": mdir / "results.jsonl"}


# ------------------------------------------------------------------------------------ worker
def _mib(n):
    return n / 2**20


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kernels_used(model, tokens: int) -> str:
    import torch
    from quantnoise.runtime import CodesLinear, IntLinear

    from quantnoise.runtime.kernels import use_compiled

    used, x = set(), torch.empty(tokens, 1)
    for m in model.modules():
        if isinstance(m, CodesLinear):
            used.add(f"pq-{m.choose_kernel(x)}{'-c++' if use_compiled(x, m.codes) else ''}")
        elif isinstance(m, IntLinear):
            kernel = m.choose_kernel(x)
            c = kernel in ("lut", "bytes", "int4") and use_compiled(x, m.qweight)
            used.add(f"int{m.bits}-{kernel}{'-c++' if c else ''}")
    return "+".join(sorted(used)) or "fp32 (MKL)"


def worker(args) -> None:
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "decoded-pq":
        os.environ["QUANTNOISE_QNZ_DECODE"] = "1"
    from fairseq import checkpoint_utils, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from quantnoise.runtime import fairseq_plugin

    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    proc = psutil.Process()
    flags = MODELS[args.model]
    cfg = convert_namespace_to_omegaconf(argparse.Namespace(task=flags[flags.index("--task") + 1],
                                                            arch=flags[flags.index("--arch") + 1], data=str(args.data)))
    task = tasks.setup_task(cfg.task)  # the dictionary: part of the fixed overhead
    with torch.device("meta"), fairseq_plugin()._meta_stays_meta():  # so is what fairseq imports while building its
        task.build_model(cfg.model)  # first model (~70 MiB: sympy, ...)
    fixed_rss, fixed_peak = proc.memory_info().rss, _peak()
    t = time.perf_counter()
    if args.model in LMS:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(args.path)],
                                                                        arg_overrides={"data": str(args.data)})
        model = models[0].eval()
    else:  # the path for an encoder: from_pretrained of the folder holding the checkpoint / .qnz
        from fairseq.models.roberta import RobertaModel

        path = pathlib.Path(args.path)
        hub = RobertaModel.from_pretrained(str(path.parent), path.name, str(args.data), bpe=None,
                                           user_dir=str(USER_DIR))
        model, task = hub.model.eval(), hub.task
        del hub
    res = {"case": args.worker, "threads": args.threads, "fixed_rss": fixed_rss, "fixed_peak": fixed_peak,
           "load_rss": proc.memory_info().rss, "load_s": time.perf_counter() - t}
    with torch.inference_mode():
        res.update((bench_lm if args.model in LMS else bench_encoder)(model, task, args))
    res["peak"] = _peak()
    if args.model in LMS:
        del model, models
        res.update(eval_lm(args))
    print("RESULT " + json.dumps(res))


def bench_lm(model, task, args, limits: bool = True) -> dict:
    """Batch-1 greedy generation, one new token per forward through fairseq's incremental state."""
    import torch

    toks = torch.randint(4, len(task.dictionary), (1, 8), generator=torch.Generator().manual_seed(0))
    state = {}
    out = model(toks, incremental_state=state)[0]
    n, t = 0, None
    for i in range(4 + args.gen_tokens):
        if i == 4:
            t = time.perf_counter()
        nxt = out[:, -1].argmax(-1, keepdim=True)
        toks = torch.cat([toks, nxt], 1)
        out = model(toks, incremental_state=state)[0]
        n += i >= 4
    res = {"gen_tok_s": n / (time.perf_counter() - t), "gen_kernels": kernels_used(model, 1),
           "eval_kernels": kernels_used(model, 512)}
    if not limits:
        return res
    res["tok_bytes"], res["tok_ops"] = weight_traffic(model)
    return {**res, **machine_limits(res["tok_bytes"], args.threads)}


def weight_traffic(model) -> tuple:
    """(bytes, arithmetic operations) one batch-1 generated token costs in the model's Linear layers (the output
    projection included; attention over the short cache and the embedding row are left out): each Linear reads
    its whole stored weight once per token.  fp32: 4 bytes and 2 flops (one multiply-add) per weight; pq: its codes
    and codebook, and with no table (``pq_linear_direct``) 2 flops per weight, by look-up table 2 * k * in flops
    for the table and out * in / bs adds; int8 (fbgemm): 1 byte and 2 int8 operations per weight; int4 (compiled
    kernel): half a byte, 2 flops (widened to fp32)."""
    import torch
    from torch import nn

    from quantnoise.runtime import CodesLinear, IntLinear

    nbytes = ops = 0
    for m in model.modules():
        if isinstance(m, CodesLinear):
            (k, bs), (out, mm) = m.centroids.shape, m.codes.shape
            nbytes += m.codes.numel() * m.codes.element_size() + m.centroids.numel() * 4
            direct = m.choose_kernel(torch.empty(1, 1)) == "direct"  # no table: fp32's multiply-adds
            ops += 2 * out * mm * bs if direct else 2 * k * mm * bs + out * mm
        elif isinstance(m, IntLinear):
            nbytes += m.out_features * m.in_features * m.width // 8
            ops += 2 * m.out_features * m.in_features
        elif isinstance(m, nn.Linear):
            nbytes += m.weight.numel() * m.weight.element_size()
            ops += 2 * m.weight.numel()
    return nbytes, ops


def machine_limits(nbytes: int, threads: int, reps: int = 15) -> dict:
    """Measured now, in this process, at ``threads`` threads: the read bandwidth over a buffer of ``nbytes`` (the
    case's own working set: the same cache level its weights stream from; one sum of it) and the fp32
    multiply-add peak (one 512 x 512 x 512 matmul, MKL); each the best of ``reps`` single timings (on a shared
    machine a median counts the time the process is descheduled; the best is the closest to the limit)."""
    import torch

    buf = torch.ones(max(1 << 16, nbytes // 4))
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    bw, fl = [], []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        bw.append(buf.numel() * 4 / (time.perf_counter() - t))
        t = time.perf_counter()
        a @ b
        fl.append(2 * 512**3 / (time.perf_counter() - t))
    return {"bw": max(bw), "peak_flops": max(fl)}


def bench_encoder(model, task, args) -> dict:
    """Masked-LM forwards (encoder + LM head over every position), tokens/s: batch 1 (ENCODE_LENGTHS, one
    sentence at a time, the serving case) and a batch of 8 x 128 tokens; each after one untimed pass.  Peak RSS
    after batch 1 (``peak_b1``: the model and small activations) and after all (``peak``, in the worker)."""
    import torch

    g, d = torch.Generator().manual_seed(0), task.source_dictionary

    def sentence(*shape):
        ids = torch.randint(d.nspecial, len(d), shape, generator=g)
        ids[:, 0], ids[:, -1] = d.bos(), d.eos()
        return ids

    def tok_s(batches, reps):
        for b in batches:
            model(b)
        t = time.perf_counter()
        for _ in range(reps):
            for b in batches:
                model(b)
        return reps * sum(b.numel() for b in batches) / (time.perf_counter() - t)

    res = {"b1_tok_s": tok_s([sentence(1, n) for n in ENCODE_LENGTHS], args.reps), "peak_b1": _peak()}
    return {**res, "b8_tok_s": tok_s([sentence(8, 128)], args.reps),
            "b1_kernels": "/".join(sorted({kernels_used(model, n) for n in ENCODE_LENGTHS})),
            "b8_kernels": kernels_used(model, 8 * 128)}


def eval_lm(args) -> dict:
    """``fairseq-eval-lm`` on the valid split: its tokens/s, perplexity and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    ev = subprocess.run([str(BIN / "fairseq-eval-lm"), str(args.data), "--path", str(args.path), "--user-dir",
                         str(USER_DIR), "--tokens-per-sample", "512", "--max-tokens", "2048", "--num-workers", "0",
                         "--gen-subset", "valid"], capture_output=True, text=True, env=env)
    m = re.search(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s \(([0-9.]+) tokens/s\)", ev.stderr + ev.stdout)
    if not m:
        raise SystemExit(f"fairseq-eval-lm failed:\n{ev.stderr[-3000:]}")
    ppl = re.search(r"Perplexity: ([0-9.]+)", ev.stderr + ev.stdout)
    return dict(eval_tokens=int(m.group(1).replace(",", "")), eval_tok_s=float(m.group(3)), eval_ppl=float(ppl.group(1)),
                eval_peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)


# --------------------------------------------------------------------------------- kernels
KERNEL_SHAPES = ((384, 384), (1536, 384), (384, 1536), (512, 512), (2048, 512), (512, 2048), (768, 768), (3072, 768),
                 (768, 3072))
KERNEL_TOKENS = (1, 4, 8, 16, 32, 64, 128, 256, 1024)


def bench_kernels(threads, rounds: int, shapes=KERNEL_SHAPES, token_counts=KERNEL_TOKENS) -> dict:
    """pq Linear (b=8, k=256) at the 6x512 LM's, MiniLM's and roberta_base's shapes: no table vs look-up table vs
    decode + matmul vs fp32, per token count, all in this process: each round times every kernel at every thread
    count back to back (a shared machine's load is then about the same for all of them).  Each cell: the median
    over rounds of that round's fp32 time / the kernel's time, then in brackets the same ratio of the best times
    (a median of times counts the time the process is descheduled; the best is the closest to the kernel)."""
    import torch
    import torch.nn.functional as F

    from quantnoise.runtime import ext as runtime_ext
    from quantnoise.runtime.kernels import direct_wins, lut_wins, pq_linear_decode, pq_linear_direct, pq_linear_lut

    g = torch.Generator().manual_seed(0)
    c = runtime_ext.available()
    load = os.getloadavg()
    print(f"\n### pq Linear kernels, b=8 k=256, threads {' / '.join(map(str, threads))}, compiled kernels "
          f"{'built' if c else 'NOT built'}, {rounds} interleaved rounds; load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} at the start\n")
    print("fp32 time / that kernel's time (> 1: faster than fp32), median of the rounds' ratios (ratio of the best "
          "times); no table: the compiled pq_linear_direct; table (pure): the pure PyTorch table; auto: what the "
          "runtime picks (quantnoise.runtime.kernels.direct_wins, lut_wins)\n")
    print("| out x in | tokens | threads | fp32 us (best) | no table | table | decode+matmul | table (pure) | auto |\n"
          "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for out, inn in shapes:
        codes = torch.randint(0, 256, (out, inn // 8), generator=g).to(torch.uint8)
        cents = torch.randn(256, 8, generator=g)
        w = cents[codes.long()].reshape(out, inn)
        for tokens in token_counts:
            x = torch.randn(tokens, inn, generator=g)
            fns = {"fp32": lambda: F.linear(x, w), "table": lambda: pq_linear_lut(x, codes, cents),
                   "decode": lambda: pq_linear_decode(x, codes, cents)}
            if c and tokens <= 64:
                fns["direct"] = lambda: pq_linear_direct(x, codes, cents)
            if tokens <= 16:
                fns["pure"] = lambda: pq_linear_lut(x, codes, cents, compiled=False)
            times = {(n, th): [] for n in fns for th in threads}
            reps = max(2, min(50, 4_000_000 // (tokens * out * inn // 64 + 1)))
            for _ in range(rounds):
                for th in threads:
                    torch.set_num_threads(th)
                    for n, f in fns.items():
                        f()
                        t = time.perf_counter()
                        for _ in range(reps):
                            f()
                        times[n, th].append((time.perf_counter() - t) / reps * 1e6)
            auto = "no table" if direct_wins(x, codes) else "table" if lut_wins(x, codes, 8) else "decode"
            for th in threads:
                f32 = times["fp32", th]

                def cell(n):
                    if n not in fns:
                        return "-"
                    ts = times[n, th]
                    return (f"{statistics.median(a / b for a, b in zip(f32, ts)):.2f} "
                            f"({min(f32) / min(ts):.2f})")

                print(f"| {out}x{inn} | {tokens} | {th} | {min(f32):.0f} | {cell('direct')} | {cell('table')} | "
                      f"{cell('decode')} | {cell('pure')} | {auto} |", flush=True)
                rows.append({"shape": f"{out}x{inn}", "tokens": tokens, "threads": th, "fp32_us_best": min(f32),
                             "auto": auto, "x_fp32": {n: harness.median_spread(a / b for a, b in zip(f32, times[n, th]))
                                                      for n in fns if n != "fp32"}})
    end = os.getloadavg()
    print(f"\nload average at the end {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f}")
    return {"block": 8, "centroids": 256, "rounds": rounds, "rows": rows}


def bench_one_process(args, s) -> dict:
    """Batch-1 greedy generation of every case loaded in ONE process, interleaved: each round times
    ``--gen-tokens`` tokens of every case, in a shuffled order, at each thread count; the ratio to fp32 is taken
    within the round (the load of a shared machine is then the same for both) and the table gives the median and
    the range over rounds."""
    import torch
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    from quantnoise.runtime import CodesLinear, fairseq_plugin

    cases = [c for c in args.cases if c != "decoded-pq"]
    models = {}
    for case in cases:
        path = s["paths"]["pq" if case == "pq-table" else "fp32" if case == "fp32-lean" else case]
        ms, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(s["data"])})
        models[case] = ms[0].eval()
        if case == "pq-table":  # the pq model with every pq Linear on the look-up table (the kernel before no-table)
            for m in models[case].modules():
                if isinstance(m, CodesLinear):
                    m.kernel = "lut"
        if case == "fp32-lean":  # the fp32 model through the runtime's lean incremental step (what it buys alone)
            fairseq_plugin().use_lean_step(models[case])
    load, rng = os.getloadavg(), random.Random(0)
    speed = {(c, th): [] for c in cases for th in args.threads}
    with torch.inference_mode():
        for r in range(args.rounds):
            for th in args.threads:
                torch.set_num_threads(th)
                order = list(cases)
                rng.shuffle(order)
                for case in order:
                    speed[case, th].append(bench_lm(models[case], task, args, limits=False)["gen_tok_s"])
            print(f"round {r}: " + ", ".join(f"{c}/{th} {v[-1]:.1f}" for (c, th), v in speed.items()), file=sys.stderr,
                  flush=True)
    end = os.getloadavg()
    print(f"\nOne process, {args.rounds} interleaved rounds of {args.gen_tokens} generated tokens per case; load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start, {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f} at the "
          f"end.\n\n| case | threads | gen tok/s (median) | x fp32 (median of rounds) | x fp32 (range) | kernels |\n"
          f"|---|---|---|---|---|---|")
    for th in args.threads:
        for case in cases:
            rs = [a / b for a, b in zip(speed[case, th], speed["fp32", th])]
            print(f"| {case} | {th} | {statistics.median(speed[case, th]):.1f} | {statistics.median(rs):.2f} | "
                  f"{min(rs):.2f}-{max(rs):.2f} | {kernels_used(models[case], 1)} |")
    return {"model": args.model, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
            "rows": [{"case": case, "threads": th, "gen_tok_s": harness.median_spread(speed[case, th]),
                      "x_fp32": harness.median_spread(a / b for a, b in zip(speed[case, th], speed["fp32", th])),
                      "kernels": kernels_used(models[case], 1)} for th in args.threads for case in cases]}


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=pathlib.Path)
    p.add_argument("--model", choices=list(MODELS), default="lm",
                   help="lm: the 6x512 transformer_lm; lm16: 16x1024 (FFN 4096, 16 heads, 4,000-word dictionary; in "
                   "WORKDIR/lm16); roberta_base: the encoder (in WORKDIR/roberta_base)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3, help="roberta_base: timed passes over each batch set")
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES + ["pq-table", "fp32-lean"],
                   help="--one-process only: pq-table, the pq model with every pq Linear on the look-up table; "
                   "fp32-lean, the fp32 model through the runtime's lean incremental step")
    p.add_argument("--kernels", action="store_true", help="only the pq Linear kernel crossover table")
    p.add_argument("--shapes", nargs="+", help="--kernels: layer shapes OUTxIN (default: the LM's, MiniLM's, "
                   "roberta_base's)")
    p.add_argument("--tokens", type=int, nargs="+", help="--kernels: token counts (default 1 4 8 ... 1024)")
    p.add_argument("--report", action="store_true", help="only print the table of the model's results.jsonl")
    p.add_argument("--one-process", action="store_true",
                   help="lm: batch-1 generation of every case loaded in one process, rounds interleaved there")
    p.add_argument("--record", metavar="PATH", help="write the run's record here (default results/infer_MODEL.json, "
                   "results/infer_kernels.json with --kernels, results/infer_MODEL_one_process.json; '-': none)")
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)
    if args.kernels:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes] if args.shapes else KERNEL_SHAPES
        figures = bench_kernels(args.threads, args.rounds, shapes, args.tokens or KERNEL_TOKENS)
        return harness.save("infer_kernels", figures, args.record or str(harness.RESULTS / "infer_kernels.json"))
    s = setup(args.workdir, args.model)
    for case in ("pq-table", "fp32-lean"):
        if case in args.cases and not args.one_process:
            raise SystemExit(f"--cases {case}: only with --one-process")
    if args.one_process:
        name = f"infer_{args.model}_one_process"
        return harness.save(name, bench_one_process(args, s), args.record or str(harness.RESULTS / f"{name}.json"))
    if args.report:
        rows = [json.loads(line) for line in open(s["results"])]
        args.threads = sorted({x["threads"] for x in rows})
        args.rounds = len({x["round"] for x in rows})
        return report(rows, s, args, os.getloadavg())
    load = os.getloadavg()
    rng, rows = random.Random(0), []
    log = open(s["results"], "w")  # every result as it comes (a cut-short run still reports)
    for r in range(args.rounds):
        for th in args.threads:
            order = list(args.cases)
            rng.shuffle(order)
            for case in order:
                out = sh([sys.executable, __file__, args.workdir, "--worker", case, "--path", s["paths"][case],
                          "--data", s["data"], "--threads", th, "--gen-tokens", args.gen_tokens, "--reps", args.reps,
                          "--model", args.model], env={"OMP_NUM_THREADS": str(th)})
                res = json.loads(out.stdout.split("RESULT ", 1)[1])
                res["round"] = r
                rows.append(res)
                log.write(json.dumps(res) + "\n")
                log.flush()
                speeds = ", ".join(f"{col} {res[key]:.1f} tok/s" for key, col, _ in SPEEDS[args.model])
                print(f"round {r} threads {th} {case}: {speeds}, peak +{_mib(res['peak'] - res['fixed_peak']):.1f} MiB",
                      file=sys.stderr, flush=True)
    print(f"load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    report(rows, s, args, load)
    sizes = {c: pathlib.Path(s["paths"][c]).stat().st_size for c in args.cases}
    harness.save(f"infer_{args.model}", {"model": args.model, "rounds": args.rounds, "file_bytes": sizes, "rows": rows},
                 args.record or str(harness.RESULTS / f"infer_{args.model}.json"))


def report(rows, s, args, load) -> None:
    sizes = {c: pathlib.Path(s["paths"][c]).stat().st_size for c in args.cases}
    speeds, lm = SPEEDS[args.model], args.model in LMS
    what = (f"{args.gen_tokens} generated tokens, eval-lm on the valid split ({rows[0]['eval_tokens']} tokens)" if lm else
            f"masked-LM forwards, {args.reps} timed passes: batch 1 over sentences of {ENCODE_LENGTHS} tokens, "
            f"and one batch of 8 x 128 tokens")
    print(f"\nMachine: {os.cpu_count()} CPUs, load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
          f"{args.rounds} rounds, {what}.\n")
    peak_key = "peak" if lm else "peak_b1"  # after load + batch-1 generation / encoding
    cols = ["case", "threads", "file MiB", "fixed RSS MiB", "load RSS growth MiB", "peak RSS growth MiB", "growth / file",
            *[c for _, col, _ in speeds for c in (f"{col} tok/s", f"{col} x fp32")],
            *(["eval-lm peak RSS MiB", "ppl"] if lm else ["peak growth with 8x128 MiB"]),
            f"kernels ({'; '.join(col for _, col, _ in speeds)})"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for th in args.threads:
        for case in args.cases:
            mine = [x for x in rows if x["case"] == case and x["threads"] == th]
            if not mine:
                continue
            base = {x["round"]: x for x in rows if x["case"] == "fp32" and x["threads"] == th}

            def med(f):
                return statistics.median(f(x) for x in mine)

            def ratio(key):
                rs = [x[key] / base[x["round"]][key] for x in mine if x["round"] in base]
                return f"{statistics.median(rs):.2f}" if rs else "-"

            growth = med(lambda x: x["load_rss"] - x["fixed_rss"])
            peak = med(lambda x: x[peak_key] - x["fixed_peak"])
            cells = [case, th, f"{_mib(sizes[case]):.1f}", f"{_mib(med(lambda x: x['fixed_rss'])):.0f}",
                     f"{_mib(growth):.1f}", f"{_mib(peak):.1f}", f"{peak / sizes[case]:.2f}"]
            for key, _, _ in speeds:
                cells += [f"{med(lambda x: x[key]):.1f}", ratio(key)]
            if lm:
                cells += [f"{_mib(med(lambda x: x['eval_peak'])):.0f}", f"{mine[0]['eval_ppl']:.2f}"]
            else:
                cells.append(f"{_mib(med(lambda x: x['peak'] - x['fixed_peak'])):.1f}")
            cells.append("; ".join(mine[0][k] for _, _, k in speeds))
            print("| " + " | ".join(map(str, cells)) + " |")
    if lm and all("tok_bytes" in x for x in rows):
        roofline(rows, args)


def roofline(rows, args) -> None:
    """Per case, batch-1 generation against its two bounds, each measured in the case's own process right after
    its generation: bytes per token / the read bandwidth over a buffer of that size, and operations per token /
    the fp32 matmul peak (``weight_traffic``, ``machine_limits``).  The bound is the larger of the two times; the
    fraction achieved is that time x tokens/s (medians over rounds)."""
    print("\nRoofline of batch-1 generation (Linear layers only): bytes / bandwidth and operations / fp32 peak, "
          "both measured in the same process; fraction = bound time / achieved time per token\n")
    print("| case | threads | MB / token | bandwidth GB/s | memory time us | Gop / token | fp32 peak Gflop/s | "
          "compute time us | achieved us / token | bound | fraction of bound |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for th in args.threads:
        for case in args.cases:
            mine = [x for x in rows if x["case"] == case and x["threads"] == th]
            if not mine:
                continue
            med = lambda f: statistics.median(f(x) for x in mine)  # noqa: E731
            t_mem = med(lambda x: x["tok_bytes"] / x["bw"]) * 1e6
            t_ops = med(lambda x: x["tok_ops"] / x["peak_flops"]) * 1e6
            t = med(lambda x: 1 / x["gen_tok_s"]) * 1e6
            bound = "memory" if t_mem >= t_ops else "compute"
            print(f"| {case} | {th} | {mine[0]['tok_bytes'] / 1e6:.1f} | {med(lambda x: x['bw']) / 1e9:.1f} | "
                  f"{t_mem:.0f} | {mine[0]['tok_ops'] / 1e9:.3f} | {med(lambda x: x['peak_flops']) / 1e9:.0f} | {t_ops:.0f} | "
                  f"{t:.0f} | {bound} | {max(t_mem, t_ops) / t:.2f} |")


if __name__ == "__main__":
    main()
