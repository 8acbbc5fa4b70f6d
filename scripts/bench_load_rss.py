"""Resident memory of loading a .qnz compressed (quantnoise.runtime.load_qnz), in fresh processes.

    python scripts/bench_load_rss.py WORKDIR [--code DIR ...] [--layers 16 --dim 1024]

WORKDIR: a ``scripts/bench_infer.py`` work folder (its dictionary ``bin/`` and its ``pq.qnz``, whose fairseq
config is reused).  Writes WORKDIR/lm{layers}x{dim}_{pq,int8}.qnz: a ``transformer_lm`` of that size (FFN 4x,
dim/64 heads, tied embedding) with random pq codes (b=8, k=256) / random int8 weights, saved by
``quantnoise.export.save_qnz`` (speed and memory do not depend on the values).  Then, for each file and
each quantnoise source folder in ``--code`` (default: this checkout; give an older checkout too to compare,
same run), one fresh process: VmRSS / VmHWM (/proc/self/status) after the fixed overhead (imports, the
task's dictionary, one meta build of the architecture), after ``load_qnz`` and after generating 8 tokens.
Growth = after - fixed (peak: VmHWM - fixed); ratio = growth / file size.  Linux, glibc.
"""
import argparse
import copy
import ctypes
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def vm():
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def synthesise(work: pathlib.Path, layers: int, dim: int) -> dict:
    import torch
    from torch import nn

    from quantnoise import runtime
    from quantnoise.export import read_qnz, save_qnz
    from quantnoise.ipq import scalar_quantize

    paths = {s: work / f"lm{layers}x{dim}_{s}.qnz" for s in ("pq", "int8")}
    if all(p.exists() for p in paths.values()):
        return paths
    fs = copy.deepcopy(read_qnz(work / "pq.qnz")[1]["fairseq"])
    fs["cfg"]["model"].update(decoder_layers=layers, decoder_embed_dim=dim, decoder_input_dim=dim, decoder_output_dim=dim,
                              decoder_ffn_embed_dim=4 * dim, decoder_attention_heads=max(1, dim // 64))
    fs["cfg"]["task"]["data"] = str(work / "bin")
    Q = runtime._plugin()
    cfg = Q.qnz_config({"fairseq": fs})
    with torch.device("meta"), Q._meta_stays_meta():
        model = Q._setup_task(cfg).build_model(cfg.model, from_checkpoint=True)
    g = torch.Generator().manual_seed(0)
    for scheme, path in paths.items():
        state, emb = {}, None
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Embedding)) or name == "decoder.output_projection":
                continue
            out, inn = m.weight.shape
            if scheme == "pq":
                codes = torch.randint(0, 256, (out * inn // 8,), generator=g).to(torch.uint8)
                cents = torch.randn(256, 8, generator=g) * 0.05
                state.update({f"{name}.codes": codes, f"{name}.centroids": cents})
                w = cents[codes.long()].reshape(out, inn)
            else:
                q, s = scalar_quantize(torch.randn(out, inn, generator=g) * 0.05, 8)
                state.update({f"{name}.qweight": q, f"{name}.qscale": s, f"{name}.qbits": torch.tensor(8)})
                w = q.float() * s.float().reshape(-1, 1)
            state[f"{name}.weight_size"] = torch.tensor([out, inn])
            if isinstance(m, nn.Embedding):
                emb = w
        for key, t in model.state_dict().items():
            if key == "decoder.output_projection.weight":
                state[key] = emb  # tied: stored as an alias
            elif not (key.endswith(".weight") and f"{key[:-len('.weight')]}.weight_size" in state):
                floating = t.dtype.is_floating_point
                state[key] = torch.randn(t.shape, generator=g) * 0.02 if floating else torch.zeros(t.shape, dtype=t.dtype)
        save_qnz(path, state, fs)
    return paths


def measure(qnz: str, data: str) -> None:
    import torch

    import quantnoise
    from quantnoise import runtime
    from quantnoise.export import read_qnz

    torch.set_num_threads(1)
    Q = runtime._plugin()
    meta = read_qnz(pathlib.Path(data).parent / "pq.qnz")[1]  # a small file of the same family: the same imports,
    cfg = Q.qnz_config(meta, {"data": data})  # config, task and meta build a load does
    task = Q._setup_task(cfg)
    with torch.device("meta"), Q._meta_stays_meta():
        task.build_model(cfg.model, from_checkpoint=True)
    del meta
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the same start for every version
    rss0, hwm0 = vm()
    model, _, task = runtime.load_qnz(qnz, data=data)
    rss1, hwm1 = vm()
    toks = torch.randint(4, len(task.dictionary), (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        state = {}
        out = model(toks, incremental_state=state)[0]
        for _ in range(8):
            toks = torch.cat([toks, out[:, -1].argmax(-1, keepdim=True)], 1)
            out = model(toks, incremental_state=state)[0]
    rss2, hwm2 = vm()
    print("RESULT " + json.dumps(dict(code=str(pathlib.Path(quantnoise.__file__).parents[1]), rss0=rss0, hwm0=hwm0,
                                      rss1=rss1, hwm1=hwm1, rss2=rss2, hwm2=hwm2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=pathlib.Path)
    p.add_argument("--code", nargs="+", default=[str(ROOT)], help="quantnoise source folders to compare")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args.measure, str(args.workdir / "bin"))
    paths = synthesise(args.workdir, args.layers, args.dim)
    print(f"load average {os.getloadavg()[0]:.1f}\n")
    print("| file | MiB | quantnoise | fixed RSS MiB | load growth MiB (x file) | load peak growth MiB (x file) "
          "| after 8 tokens MiB (x file) |\n|---|---|---|---|---|---|---|")
    mib = 2**20
    for scheme, path in paths.items():
        size = path.stat().st_size
        for code in args.code:
            env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, __file__, str(args.workdir), "--measure", str(path)], env=env,
                                 capture_output=True, text=True, cwd="/")
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.split("RESULT ", 1)[1])
            g1, p1, g2 = r["rss1"] - r["rss0"], r["hwm1"] - r["rss0"], r["hwm2"] - r["rss0"]
            print(f"| {path.name} | {size / mib:.1f} | {r['code']} | {r['rss0'] / mib:.0f} | {g1 / mib:.1f} ({g1 / size:.2f}) "
                  f"| {p1 / mib:.1f} ({p1 / size:.2f}) | {g2 / mib:.1f} ({g2 / size:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
