"""k-means for iPQ: quantnoise (faiss) vs fairseq's ``PQ`` (hand-written EM) on the same weights.

    python benchmarks/kmeans.py [--iters 20] [--fairseq-iters 2] [--shapes linear_up,linear_down,embedding]

Each run is a fresh subprocess, so its peak RSS (ru_maxrss) is its own; "RSS +" is the peak minus
the RSS just before the k-means (torch, the weight and the imports excluded).  Weights are the
layers' own seeded default initialisations.  fairseq's PQ takes about 30 s and 4.3 GiB per
iteration on Linear(1024, 4096) here, so it runs ``--fairseq-iters`` iterations and the table gives
its time per iteration; ours runs the same number of iterations (for the MSE comparison) and
``--iters``.  fairseq's distance tensor is (256 x 8 x n_blocks) fp32: 17 GiB for the 32000x512
embedding, more than this machine can spare, so that case is skipped for fairseq unless
``--fairseq-embedding`` is given.
"""
import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file (python benchmarks/kmeans.py): the repository root for benchmarks.harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.harness import add_record_arg, machine, save  # noqa: E402

SHAPES = {"linear_up": ("Linear", 1024, 4096), "linear_down": ("Linear", 4096, 1024),
          "embedding": ("Embedding", 32000, 512)}


def weight(kind: str, a: int, b: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.Linear(a, b) if kind == "Linear" else nn.Embedding(a, b)  # Linear(in, out): weight (out, in)
    return layer.weight.detach()


def child(args) -> None:
    import psutil
    import torch

    torch.set_num_threads(2)
    w = weight(*SHAPES[args.shape])
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if args.impl == "ours":
        from quantnoise.compress.layers import pq_quantize

        codes, cents = pq_quantize(w, 8, 256, niter=args.iters, seed=0)
        w_hat = cents[codes.long()].reshape(w.shape)
    else:
        from fairseq.modules.quantization.pq.pq import PQ

        torch.manual_seed(0)
        pq = PQ(w, block_size=8, n_centroids=256, n_iter=args.iters, eps=1e-6, max_tentatives=30, verbose=False)
        pq.encode()
        w_hat = pq.decode()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mse = (w - w_hat).pow(2).mean().item()
    print(json.dumps({"impl": args.impl, "shape": args.shape, "iters": args.iters, "seconds": dt,
                      "peak_rss": peak, "rss_increase": peak - base, "mse": mse}))


def run_child(impl: str, shape: str, iters: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", impl, "--shape", shape, "--iters", str(iters)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--fairseq-iters", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--fairseq-embedding", action="store_true")
    ap.add_argument("--child", choices=["ours", "fairseq"])
    ap.add_argument("--shape", choices=list(SHAPES))
    add_record_arg(ap, "kmeans")
    args = ap.parse_args()
    if args.child:
        return child(argparse.Namespace(impl=args.child, shape=args.shape, iters=args.iters))
    gib = 2**30
    m = machine(2)
    print(f"{m['cpu']} ({m['isa']}), 2 threads, load average {' / '.join(map(str, m['load_avg']))}\n")
    rows = []
    print("| weight | impl | iters | wall s | s/iter | peak RSS GiB | RSS + GiB | MSE |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        kind, a, b = SHAPES[shape]
        label = f"{kind}({a}, {b})"
        runs = [("ours", args.fairseq_iters), ("ours", args.iters)]
        if shape != "embedding" or args.fairseq_embedding:
            runs.append(("fairseq", args.fairseq_iters))
        for impl, iters in runs:
            r = run_child(impl, shape, iters)
            print(f"| {label} | {impl} | {iters} | {r['seconds']:.2f} | {r['seconds'] / iters:.2f} | "
                  f"{r['peak_rss'] / gib:.2f} | {r['rss_increase'] / gib:.2f} | {r['mse']:.4e} |", flush=True)
            rows.append({"weight": label, **r})
    save("kmeans", {"block": 8, "centroids": 256, "rows": rows}, args.record, threads=2)


if __name__ == "__main__":
    main()
