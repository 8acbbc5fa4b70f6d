"""Resident memory of loading a .qnz compressed (quantnoise.runtime), in fresh processes.

    python benchmarks/load_rss.py WORKDIR [--code DIR ...] [--layers 16 --dim 1024] [--no-warmup]
    python benchmarks/load_rss.py WORKDIR --model roberta_base [--code DIR ...] [--no-warmup]

WORKDIR: a ``benchmarks/infer.py`` work folder (its dictionary ``bin/``, and the .qnz files it made, whose
fairseq configs are reused).
  lm (default): WORKDIR/lm{layers}x{dim}_{pq,int8}.qnz, a ``transformer_lm`` of that size (FFN 4x, dim/64 heads,
    tied embedding) with random pq codes (b=8, k=256) / random int8 weights, saved by ``quantnoise.export.save_qnz``
    (speed and memory do not depend on the values), loaded by ``quantnoise.runtime.load_fairseq``; the forward is
    batch-1 generation of 8 tokens through fairseq's incremental state.
  roberta_base: WORKDIR/roberta_base/{pq,int8,int4}.qnz of ``benchmarks/infer.py --model roberta_base``, loaded by
    ``RobertaModel.from_pretrained`` of their folder (the issue's path); the forward is 8 masked-LM passes of
    12-32-token sentences at batch 1.
For each file and each quantnoise source folder in ``--code`` (default: this checkout; give an older checkout
too to compare, same run), one fresh process, 1 thread:
  1. the fixed overhead: imports, reading the family's ``pq.qnz``, the task's dictionary, one build of the
     architecture on ``meta`` (all that ``--no-warmup`` keeps: the protocol of the first tables); then a warm-up:
     one load + forward of a tiny model of the same architecture and scheme (1 layer, 64-d, random, synthesised
     as WORKDIR/[roberta_base/]warmup_{scheme}.qnz), freed (gc, ``malloc_trim``) before the fixed RSS is taken.
     The warm-up moves into the fixed part what the first load and forward of any model cost once per process:
     pages of libtorch's code (libtorch_cpu.so) touched by the first use of each operator and kernel.  That part
     does not grow with the model: loading with no warm-up at all, the file-backed RSS grows by 4.46 MiB for the
     6x512 LM's 2.6 MiB pq file and for the 16x1024 LM's 25.1 MiB one, 3.96 MiB for a 0.1 MiB 1-layer 64-d
     roberta_base pq file and 3.89 MiB for the 11.0 MiB full one; int8: 5.96 MiB for 19.3 and 195.2 MiB files.
     What the freed warm-up leaves in anonymous memory (0.5-0.9 MiB: Python's object arenas, caches) is shown
     in the fixed column: at most that much of the load's own memory can hide in it.  Not moved: the loaded
     model's own Python objects, its task's dictionary and config (a second set, counted in the growth);
  2. VmRSS / VmHWM (/proc/self/status; VmHWM reset by /proc/self/clear_refs where allowed) after loading and
     after the forward; growth = after - fixed, split into anonymous memory and file-backed pages (RssAnon /
     RssFile), and the bytes of the model's tensors (unique storages of its parameters and buffers; fbgemm's
     packed int8 weights counted at their int8 size: malloc says their layout takes 1.24x that for roberta_base,
     768-wide rows padded, of which RSS shows about half resident).
Ratios: growth / file size.  Linux, glibc.
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file (python benchmarks/load_rss.py): the repository root for the harness
    sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
MODELS = {  # folder in WORKDIR, schemes, cfg.model of (layers, dim), tied weight -> compressed layer it copies
    "lm": dict(folder=".", schemes=("pq", "int8"), tie={"decoder.output_projection.weight": "decoder.embed_tokens"},
               dims=lambda L, D: dict(decoder_layers=L, decoder_embed_dim=D, decoder_input_dim=D, decoder_output_dim=D,
                                      decoder_ffn_embed_dim=4 * D, decoder_attention_heads=max(1, D // 64))),
    "roberta_base": dict(folder="roberta_base", schemes=("pq", "int8", "int4"),
                         tie={"encoder.lm_head.weight": "encoder.sentence_encoder.embed_tokens"},
                         dims=lambda L, D: dict(encoder_layers=L, encoder_embed_dim=D, encoder_ffn_embed_dim=4 * D,
                                                encoder_attention_heads=max(1, D // 64))),
}
ENCODE_LENGTHS = (12, 16, 20, 24, 28, 32, 16, 24)  # roberta_base: the forward's batch-1 sentences


def status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass


def synthesise(work: pathlib.Path, kind: str, layers: int, dim: int, prefix: str) -> dict:
    """{scheme: path} of random .qnz files of ``kind`` at (layers, dim), saved as WORKDIR/<folder>/<prefix>_<scheme>.qnz."""
    import torch
    from torch import nn

    from quantnoise import runtime
    from quantnoise.export import read_qnz, save_qnz
    from quantnoise.compress.layers import scalar_quantize

    spec, folder = MODELS[kind], work / MODELS[kind]["folder"]
    paths = {s: folder / f"{prefix}_{s}.qnz" for s in spec["schemes"]}
    if all(p.exists() for p in paths.values()):
        return paths
    fs = copy.deepcopy(read_qnz(folder / "pq.qnz")[1]["fairseq"])
    fs["cfg"]["model"].update(spec["dims"](layers, dim))
    fs["cfg"]["task"]["data"] = str(work / "bin")
    Q = runtime.fairseq_plugin()
    cfg = Q.qnz_config({"fairseq": fs})
    with torch.device("meta"), Q._meta_stays_meta():
        model = Q._setup_task(cfg).build_model(cfg.model, from_checkpoint=True)
    tied = {key[: -len(".weight")] for key in spec["tie"]}
    g = torch.Generator().manual_seed(0)
    for scheme, path in paths.items():
        state, weights = {}, {}
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Embedding)) or name in tied:
                continue
            out, inn = m.weight.shape
            if scheme == "pq":
                codes = torch.randint(0, 256, (out * inn // 8,), generator=g).to(torch.uint8)
                cents = torch.randn(256, 8, generator=g) * 0.05
                state.update({f"{name}.codes": codes, f"{name}.centroids": cents})
                weights[name] = cents[codes.long()].reshape(out, inn)
            else:
                bits = int(scheme[3:])
                q, s = scalar_quantize(torch.randn(out, inn, generator=g) * 0.05, bits)
                state.update({f"{name}.qweight": q, f"{name}.qscale": s, f"{name}.qbits": torch.tensor(bits)})
                weights[name] = q.float() * s.float().reshape(-1, 1)
            state[f"{name}.weight_size"] = torch.tensor([out, inn])
        for key, t in model.state_dict().items():
            if key in spec["tie"]:
                state[key] = weights[spec["tie"][key]]  # stored as an alias of the compressed layer
            elif not (key.endswith(".weight") and f"{key[:-len('.weight')]}.weight_size" in state):
                floating = t.dtype.is_floating_point
                state[key] = torch.randn(t.shape, generator=g) * 0.02 if floating else torch.zeros(t.shape, dtype=t.dtype)
        save_qnz(path, state, fs)
    return paths


def tensor_bytes(model) -> int:
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for m in model.modules():  # e.g. fbgemm's packed int8 weight, held outside parameters / buffers
        packed = getattr(m, "_packed", None)
        if packed is not None:
            storages[id(packed)] = m.int8_weight().numel()
    return sum(storages.values())


def load(kind: str, qnz: str, data: str):
    """(model, what the caller keeps, forward()) of a .qnz through the loader of ``kind``."""
    import torch

    import quantnoise
    from quantnoise import runtime

    if kind == "lm":
        model, _, task = runtime.load_fairseq(qnz, data=data)
        holder = model
    else:
        from fairseq.models.roberta import RobertaModel

        path = pathlib.Path(qnz)
        holder = RobertaModel.from_pretrained(str(path.parent), path.name, data, bpe=None,
                                              user_dir=str(pathlib.Path(quantnoise.__file__).parent / "qn_fairseq"))
        model, task = holder.model.eval(), holder.task
    d, g = task.dictionary if kind == "lm" else task.source_dictionary, torch.Generator().manual_seed(0)

    def forward():
        with torch.inference_mode():
            if kind == "lm":
                toks = torch.randint(4, len(d), (1, 8), generator=g)
                state = {}
                out = model(toks, incremental_state=state)[0]
                for _ in range(8):
                    toks = torch.cat([toks, out[:, -1].argmax(-1, keepdim=True)], 1)
                    out = model(toks, incremental_state=state)[0]
            else:
                for n in ENCODE_LENGTHS:
                    ids = torch.randint(d.nspecial, len(d), (1, n), generator=g)
                    ids[:, 0], ids[:, -1] = d.bos(), d.eos()
                    model(ids)

    return model, holder, forward


def measure(kind: str, qnz: str, warm: str, data: str) -> None:
    import torch

    import quantnoise
    from quantnoise import runtime
    from quantnoise.export import read_qnz

    torch.set_num_threads(1)
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    Q = runtime.fairseq_plugin()
    meta = read_qnz(pathlib.Path(qnz).parent / "pq.qnz")[1]  # a file of the same family: the same imports,
    cfg = Q.qnz_config(meta, {"data": data})  # config, task and meta build a load does
    task = Q._setup_task(cfg)
    with torch.device("meta"), Q._meta_stays_meta():
        task.build_model(cfg.model, from_checkpoint=True)
    del meta
    gc.collect()
    trim(0)
    pre = status()
    if warm:  # a tiny model of the same architecture and scheme, loaded, run and freed
        model, holder, forward = load(kind, warm, data)
        forward()
        del model, holder, forward
    gc.collect()
    trim(0)  # the same start for every version
    s0 = status()
    reset_peak()
    model, holder, forward = load(kind, qnz, data)
    s1 = status()
    tensors = tensor_bytes(model)
    forward()
    s2 = status()
    print("RESULT " + json.dumps(dict(code=str(pathlib.Path(quantnoise.__file__).parents[1]), pre=pre, s0=s0, s1=s1, s2=s2,
                                      tensors=tensors)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=pathlib.Path)
    p.add_argument("--model", choices=list(MODELS), default="lm")
    p.add_argument("--code", nargs="+", default=[str(ROOT)], help="quantnoise source folders to compare")
    p.add_argument("--layers", type=int, default=16, help="lm: the synthesised model's layers")
    p.add_argument("--dim", type=int, default=1024, help="lm: the synthesised model's width")
    p.add_argument("--no-warmup", action="store_true", help="no tiny-model load in the fixed part (see above)")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    harness.add_record_arg(p, "load_rss")
    args = p.parse_args()
    if args.measure:
        return measure(args.model, args.measure[0], args.measure[1], str(args.workdir / "bin"))
    spec = MODELS[args.model]
    if args.model == "lm":
        paths = synthesise(args.workdir, "lm", args.layers, args.dim, f"lm{args.layers}x{args.dim}")
    else:
        paths = {s: args.workdir / spec["folder"] / f"{s}.qnz" for s in spec["schemes"]}
        missing = [str(q) for q in paths.values() if not q.exists()]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)} missing; make them with `python benchmarks/infer.py "
                             f"{args.workdir} --model roberta_base --cases fp32` (setup only needs one case)")
    warm = {} if args.no_warmup else synthesise(args.workdir, args.model, 1, 64, "warmup")
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}; warm-up: "
          f"{'none' if args.no_warmup else 'a 1-layer 64-d model of the same scheme'}\n")
    print("| file | MiB | quantnoise | fixed RSS MiB (warm-up's part: anon / file-backed) | load growth MiB (x file) "
          "| anon / file-backed MiB | model tensors MiB (x file) | load peak growth MiB (x file) | after forward MiB (x file) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    mib = 2**20
    rows = []
    for scheme, path in paths.items():
        size = path.stat().st_size
        for code in args.code:
            env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            out = subprocess.run([sys.executable, __file__, str(args.workdir), "--model", args.model, "--measure",
                                  str(path), str(warm.get(scheme, ""))], env=env, capture_output=True, text=True, cwd="/")
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.split("RESULT ", 1)[1])
            s0, s1, s2 = r["s0"], r["s1"], r["s2"]

            def x(n):
                return f"{n / mib:.1f} ({n / size:.2f})"

            anon, file = s1["RssAnon"] - s0["RssAnon"], s1["RssFile"] - s0["RssFile"]
            pre = r["pre"]
            wa, wf = (s0["RssAnon"] - pre["RssAnon"]) / mib, (s0["RssFile"] - pre["RssFile"]) / mib
            print(f"| {path.name} | {size / mib:.1f} | {r['code']} | {s0['VmRSS'] / mib:.0f} ({wa:.1f} / {wf:.1f}) "
                  f"| {x(s1['VmRSS'] - s0['VmRSS'])} "
                  f"| {anon / mib:.1f} / {file / mib:.1f} | {x(r['tensors'])} | {x(s1['VmHWM'] - s0['VmRSS'])} "
                  f"| {x(max(s2['VmHWM'], s2['VmRSS']) - s0['VmRSS'])} |", flush=True)
            rows.append({"file": path.name, "bytes": size, "scheme": scheme, **r})
    harness.save("load_rss", {"model": args.model, "warmup": not args.no_warmup, "rows": rows}, args.record, threads=1)


if __name__ == "__main__":
    main()
