"""``quantnoise inspect MODEL.qnz``: per-layer scheme, shape, bits per weight, bytes; then totals."""
import os

from ..checkpoint import model_name
from ..export import layer_sizes, read_qnz


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print the layers and sizes of a .qnz file")
    p.add_argument("model", help=".qnz file")
    p.add_argument("--all", action="store_true", help="also list every uncompressed tensor (default: a summary line)")
    p.set_defaults(func=run)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f} MiB"


def run(args) -> int:
    tensors, meta = read_qnz(args.model)
    rows = layer_sizes(tensors, meta)
    size = os.path.getsize(args.model)
    print(f"{args.model}: quantnoise.qnz v{meta['format_version']}, "
          f"model {model_name((meta.get('fairseq') or {}).get('cfg')) or '?'}")
    print(f"{'layer':48s} {'scheme':24s} {'shape':>16s} {'bits/w':>7s} {'bytes':>12s}")
    dense = [r for r in rows if r["name"] not in meta["layers"] and r["name"] not in meta["aliases"]]
    for r in rows:
        if r in dense and not args.all:
            continue
        bpw = 8 * r["bytes"] / max(r["numel"], 1)
        print(f"{r['name']:48s} {r['scheme']:24s} {'x'.join(map(str, r['shape'])):>16s} {bpw:7.3f} {r['bytes']:12d}")
    if dense and not args.all:
        nb, nw = sum(r["bytes"] for r in dense), sum(r["numel"] for r in dense)
        print(f"{f'({len(dense)} other tensors, --all lists them)':48s} {'/'.join(sorted({r['scheme'] for r in dense})):24s} "
              f"{nw:>16d} {8 * nb / max(nw, 1):7.3f} {nb:12d}")
    n = sum(r["numel"] for r in rows if r["bytes"] or r["numel"] and r["name"] not in meta["aliases"])
    fp32 = sum(r["fp32_bytes"] for r in rows)
    bound = sum(r["bound_bits"] for r in rows) / 8
    print(f"file size     {size:12d} bytes ({_mib(size)})")
    print(f"fp32 size     {fp32:12d} bytes ({_mib(fp32)})  compression x{fp32 / size:.2f}")
    print(f"bound         {int(bound):12d} bytes ({_mib(bound)})  {8 * bound / max(n, 1):.3f} bits/weight; "
          f"file is {100 * (size / max(bound, 1) - 1):+.2f}% over it, {8 * size / max(n, 1):.3f} bits/weight")
    return 0
