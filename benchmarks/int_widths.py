"""Time quantnoise.runtime's IntLinear at every int width 2..8, loaded from a .qnz as a model would be.

    python benchmarks/int_widths.py [--shapes 768x768,3072x768,768x3072] [--tokens 1,16,128] [--threads 1]
        [--repeats 20]

For each (out x in) shape, token count and width: the median time of a forward, and that time per byte
of the weight as the file stores it (bits / 8 per weight) and as the runtime holds it (int3 4 bits wide,
int5-7 as int8: ``runtime.load.runtime_width``); plus, for the odd widths, the layer holding the file's
bit stream as it is (decode + matmul every call) for comparison.  Prints one table; the times are only as
good as the machine is quiet (say its load average with them).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file (python benchmarks/int_widths.py): the repository root for the harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from quantnoise.compress.layers import scalar_quantize  # noqa: E402
from quantnoise.export import ExportOptions, encode
from quantnoise.runtime import IntLinear, fill_model_


def loaded_layer(w: torch.Tensor, bits: int) -> nn.Module:
    q, scale = scalar_quantize(w, bits)
    state = {"lin.qweight": q, "lin.qscale": scale, "lin.qbits": torch.tensor(bits), "lin.weight_size": torch.tensor(w.shape)}
    tensors, meta = encode(state, {}, ExportOptions(rest_dtype="float32"))
    model = nn.Module()
    model.lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fill_model_(model, dict(tensors), meta)
    raw = None if bits in (2, 4, 8) else IntLinear(w.shape[1], w.shape[0], tensors["lin.qweight"], tensors["lin.qscale"],
                                                   bits, bits, None)  # the file's stream as it is (decode + matmul)
    return model.lin, raw


def median_ms(f, x, repeats: int) -> float:
    with torch.no_grad():
        f(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x768,3072x768,768x3072")
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    harness.add_record_arg(ap, "int_widths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    m = harness.machine(args.threads)
    print(f"{m['cpu']} ({m['isa']}), threads {args.threads}, load average {m['load_avg'][0]:.2f}, torch {torch.__version__}")
    rows = []
    print(f"{'shape':>10s} {'T':>4s} {'bits':>4s} {'kernel':>8s} {'ms':>8s} {'ns/file B':>10s} {'ns/mem B':>9s} "
          f"{'raw ms':>8s}")
    for shape in args.shapes.split(","):
        out, inn = (int(v) for v in shape.split("x"))
        w = torch.randn(out, inn, generator=g)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, inn, generator=g)
            for bits in range(2, 9):
                layer, raw = loaded_layer(w, bits)
                ms = median_ms(layer, x, args.repeats)
                raw_ms = median_ms(raw, x, args.repeats) if raw is not None else float("nan")
                file_b, mem_b = out * inn * bits / 8, out * inn * layer.width / 8
                print(f"{shape:>10s} {tokens:4d} {bits:4d} {layer.choose_kernel(x):>8s} {ms:8.3f} "
                      f"{1e6 * ms / file_b:10.3f} {1e6 * ms / mem_b:9.3f} {raw_ms:8.3f}")
                rows.append({"shape": shape, "tokens": tokens, "bits": bits, "kernel": layer.choose_kernel(x), "ms": ms,
                             "raw_ms": None if raw is None else raw_ms})
    from quantnoise.runtime import ext

    harness.save("int_widths", {"repeats": args.repeats, "compiled_kernels": ext.available(), "rows": rows}, args.record,
                 threads=args.threads)


if __name__ == "__main__":
    main()
