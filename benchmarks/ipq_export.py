"""Whole-model iPQ time / peak memory, and .qnz export sizes, on randomly initialised fairseq models.

    python benchmarks/ipq_export.py WORKDIR [--skip-big]

1. Writes (to WORKDIR, not committed) a fairseq checkpoint of a 16-layer 1024-d ``transformer_lm``
   (FFN 4096, vocab 32000, untied output projection) with an Adam state, as fairseq-train saves it,
   and times ``quantnoise quantize --scheme pq --block-size 8 --centroids 256`` on it (wall time and
   peak RSS of that process, from /usr/bin/time).
2. For ``transformer_lm`` (6 layers, 512/2048, vocab 32000) and a ``roberta_base``-shaped model
   (12 layers, 768/3072, vocab 50265, tied LM head): quantize (pq b=8 k=256 everywhere; pq with
   attention at b=4; int8; int4), export, and report file size vs the fp32 checkpoint (model only)
   and vs the bits-per-weight bound printed by ``quantnoise inspect``.
Every random choice is seeded.  Prints Markdown tables.
"""
import argparse
import os
import pathlib
import re
import subprocess
import sys
from argparse import Namespace

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/ipq_export.py): the repository root for the harness
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402

BIN = pathlib.Path(sys.executable).parent


class _Task:
    def __init__(self, n):
        from fairseq.data import Dictionary

        d = Dictionary()
        for i in range(n - len(d)):
            d.add_symbol(f"w{i}")
        self.source_dictionary = self.target_dictionary = self.dictionary = d


def build(kind: str, vocab: int, **dims):
    torch.manual_seed(0)
    if kind == "transformer_lm":
        from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture

        args = Namespace(arch="transformer_lm", tokens_per_sample=512, max_target_positions=512, **dims)
        base_lm_architecture(args)
        model = TransformerLanguageModel.build_model(args, _Task(vocab))
    else:
        from fairseq.models.roberta.model import RobertaModel, base_architecture

        args = Namespace(arch="roberta_base", tokens_per_sample=512, max_positions=512, **dims)
        base_architecture(args)
        model = RobertaModel.build_model(args, _Task(vocab))
    cfg = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None), list))}
    cfg["_name"] = kind if kind == "transformer_lm" else "roberta"
    return model, {"model": cfg, "common": {"user_dir": None}}


def save(model, cfg, path, with_adam=False):
    state = {"args": None, "cfg": cfg, "model": model.state_dict(),
             "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                    "lr_scheduler_state": {}, "num_updates": 0}],
             "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}}, "task_state": {}}
    if with_adam:
        params = [p for p in model.parameters()]
        state["last_optimizer_state"] = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p) * 1e-3,
                                                      "exp_avg_sq": torch.rand_like(p) * 1e-6}
                                                  for i, p in enumerate(params)},
                                         "param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]}
    torch.save(state, path)


def timed(cmd) -> tuple:
    """(wall seconds, peak RSS bytes, stdout) of a command, via GNU time."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *map(str, cmd)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    sec, kib = out.stderr.strip().splitlines()[-1].split()
    return float(sec), int(kib) * 1024, out.stdout


def qn(*args):
    return [BIN / "quantnoise", *args]


def whole_model(work: pathlib.Path) -> dict:
    ckpt = work / "lm16x1024.pt"
    if not ckpt.exists():
        model, cfg = build("transformer_lm", 32000, decoder_layers=16, decoder_embed_dim=1024,
                           decoder_ffn_embed_dim=4096, decoder_attention_heads=16)
        save(model, cfg, ckpt, with_adam=True)
        del model
    n = sum(t.numel() for t in torch.load(ckpt, mmap=True, weights_only=True)["model"].values())
    sec, rss, _ = timed(qn("quantize", ckpt, "-o", work / "lm16x1024.q.pt", "--scheme", "pq", "--block-size", "8",
                           "--centroids", "256"))
    fp32 = 4 * n
    print("| model | params | fp32 weights GiB | checkpoint file GiB (with Adam) | quantize wall s | peak RSS GiB | RSS / fp32 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| transformer_lm 16x1024 (FFN 4096, vocab 32000) | {n / 1e6:.1f} M | {fp32 / 2**30:.2f} | "
          f"{ckpt.stat().st_size / 2**30:.2f} | {sec:.1f} | {rss / 2**30:.2f} | {rss / fp32:.2f} |", flush=True)
    return {"model": "transformer_lm 16x1024 (FFN 4096, vocab 32000)", "params": n, "fp32_bytes": fp32,
            "checkpoint_bytes": ckpt.stat().st_size, "quantize_s": sec, "peak_rss": rss}


CONFIGS = {
    "pq b=8 k=256 (all)": ["--scheme", "pq", "--block-size", "8", "--centroids", "256"],
    "pq b=8 k=256, int8 centroids": ["--scheme", "pq", "--block-size", "8", "--centroids", "256"],
    "pq ffn/emb b=8, attn b=4": None,  # plan YAML below
    "int8": ["--scheme", "scalar", "--bits", "8"],
    "int4": ["--scheme", "scalar", "--bits", "4"],
}
PLAN = """seed: 0
stages:
  - {pattern: '_proj$|self_attn', block_size: 4, n_centroids: 256}
  - {pattern: '.', block_size: 8, n_centroids: 256}
"""


def export_sizes(work: pathlib.Path) -> list:
    (work / "plan.yaml").write_text(PLAN)
    models = {"transformer_lm 6x512 (FFN 2048, vocab 32000)":
              ("transformer_lm", 32000, dict(decoder_layers=6, decoder_embed_dim=512, decoder_ffn_embed_dim=2048,
                                            decoder_attention_heads=8)),
              "roberta_base shape (12x768, FFN 3072, vocab 50265, tied head)": ("roberta", 50265, {})}
    print("| model | scheme | fp32 ckpt MiB | .qnz MiB | x vs fp32 ckpt | x vs fp32 weights | bound MiB | file over bound | bits/weight |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, (kind, vocab, dims) in models.items():
        stem = work / kind
        model, cfg = build(kind, vocab, **dims)
        save(model, cfg, f"{stem}.pt")
        del model
        fp32_file = os.path.getsize(f"{stem}.pt")
        for name, flags in CONFIGS.items():
            tag = re.sub(r"\W+", "_", name)
            flags = flags if flags is not None else ["--config", work / "plan.yaml"]
            timed(qn("quantize", f"{stem}.pt", "-o", f"{stem}.{tag}.pt", *flags))
            extra = ["--centroids", "int8"] if "int8 centroids" in name else []
            timed(qn("export", f"{stem}.{tag}.pt", "-o", f"{stem}.{tag}.qnz", *extra))
            _, _, report = timed(qn("inspect", f"{stem}.{tag}.qnz"))
            size = os.path.getsize(f"{stem}.{tag}.qnz")
            fp32 = int(re.search(r"fp32 size\s+(\d+)", report).group(1))
            bound = int(re.search(r"bound\s+(\d+)", report).group(1))
            bpw = float(re.search(r"([0-9.]+) bits/weight\s*$", report.strip()).group(1))
            print(f"| {label} | {name} | {fp32_file / 2**20:.1f} | {size / 2**20:.2f} | {fp32_file / size:.1f} | "
                  f"{fp32 / size:.1f} | {bound / 2**20:.2f} | {100 * (size / bound - 1):+.2f}% | {bpw:.3f} |", flush=True)
            rows.append({"model": label, "scheme": name, "fp32_ckpt_bytes": fp32_file, "qnz_bytes": size,
                         "fp32_weight_bytes": fp32, "bound_bytes": bound, "bits_per_weight": bpw})
            os.remove(f"{stem}.{tag}.pt")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=pathlib.Path)
    ap.add_argument("--skip-big", action="store_true", help="skip the 16-layer whole-model timing")
    harness.add_record_arg(ap, "ipq_export")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    m = harness.machine()
    print(f"{m['cpu']} ({m['isa']}), load average {' / '.join(map(str, m['load_avg']))}\n")
    figures = {"whole_model": None if args.skip_big else whole_model(args.workdir)}
    figures["export"] = export_sizes(args.workdir)
    harness.save("ipq_export", figures, args.record)


if __name__ == "__main__":
    main()
