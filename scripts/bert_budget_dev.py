"""DEV accuracy of recipes/bert's Q-BERT bit plans at another weight budget (issue 20, run 4): the Hessian
measured-cost plan over 2/3/4/8 bits at ``--avg-bits`` stored bits per weight (default 2.5, which no uniform
width gives), its inverted-ranking control and uniform int2, each post hoc and after the recipe's QAT fine-tune.

    python scripts/bert_budget_dev.py TRAIN.tsv DEV.tsv OUTDIR [--avg-bits 2.5] [--size small] [--seed 1]
        [--rows int2,hessian,inverted] [--no-qat ROW,...] [--ref-dir DIR]

Everything is the recipe's own (recipes/bert/table.py): the plans (``Run.qbert3_plans``: QBERT3_BITS, QBERT3_CLIP,
QBERT3_COST, one scale per head on q/k/v), the post-hoc model (``Run.posthoc3_model``), QAT (``Run.qat3_model``:
qat3_steps at qat3_lr from the fp32 model) and DEV read back from each row's .qnz.  OUTDIR: a recipe folder with
ckpt/fp32.pt and ckpt/sensitivity.json (else the Hessian scores are computed there).  DEV only: the TEST file is
never read (the DEV file stands in for ``Run``'s TEST argument; nothing here scores ``run.test``).  Each row is
cached in OUTDIR/stages/b{B}_{row}_{posthoc,qat}.json (a rerun resumes); uniform int3 (3.0 bits) is quoted from
``--ref-dir``'s stages/int3_{posthoc,qat}.json when present (not rerun).  Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "bert"))

import table  # noqa: E402  (recipes/bert/table.py)

from quantnoise import LayerBits  # noqa: E402

ROWS = ("int2", "hessian", "inverted")


def row_layers(plans: dict, row: str) -> dict:
    """{layer: LayerBits} of ``row``: "int2" = every plan layer at 2 bits, one scale per row (as int3_qat at 3);
    "hessian" / "inverted" = that plan of ``plans`` (``Run.qbert3_plans``)."""
    if row == "int2":
        return {k: LayerBits(bits=2) for k in plans["hessian"]["bits"]}
    return table.plan_layers(plans, row)


def evaluate(run: "table.Run", name: str, model) -> dict:
    """DEV accuracy of ``model`` read back from ckpt/NAME.qnz, and the file's bytes."""
    path = run.out / "ckpt" / f"{name}.qnz"
    nbytes = table.qnz_bytes(model, path)
    return {"dev_acc": run.dev_acc(run.from_qnz(path)), "bytes": nbytes}


def summary(layers: dict, sizes: dict) -> dict:
    """Stored weight bits per weight (the .qnz packs int-N in N bits) and layers at each of QBERT3_BITS."""
    n = sum(sizes[k] for k in layers)
    return {"weight_bits": round(sum(sizes[k] * table.pack_width(s.bits) for k, s in layers.items()) / n, 4),
            "layers_at_bits": {str(b): sum(1 for s in layers.values() if s.bits == b) for b in table.QBERT3_BITS}}


def markdown(rows: list) -> str:
    f = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| row | weight bits | layers at 2/3/4/8 | .qnz bytes | DEV post hoc | DEV after QAT |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        at = "/".join(str(r["layers_at_bits"].get(str(b), 0)) for b in table.QBERT3_BITS)
        lines.append(f"| {r['row']} | {r['weight_bits']:.3f} | {at} | {r['bytes']:,} | {f(r.get('posthoc'))} | "
                     f"{f(r.get('qat'))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("train", "dev", "outdir"):
        ap.add_argument(a)
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--size", choices=sorted(table.SIZES), default="small")
    ap.add_argument("--seed", type=int, default=1)
    split = lambda v: [x for x in v.split(",") if x]  # noqa: E731
    ap.add_argument("--rows", type=split, default=list(ROWS), help=f"subset of {','.join(ROWS)}, in this order")
    ap.add_argument("--no-qat", type=split, default=[], help="rows to evaluate post hoc only")
    ap.add_argument("--ref-dir", default=None, help="a recipe folder whose stages/int3_{posthoc,qat}.json to quote")
    a = ap.parse_args(argv)
    bad = [r for r in a.rows + a.no_qat if r not in ROWS]
    if bad:
        print(f"error: unknown row {bad[0]!r}; choose from {','.join(ROWS)}", file=sys.stderr)
        return 2
    os.makedirs(a.outdir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(os.path.join(a.outdir, "log.txt"))])
    run = table.Run(argparse.Namespace(train=a.train, dev=a.dev, test=a.dev, outdir=a.outdir, size=a.size,
                                       seed=a.seed, epochs=None, lr=None, stages=None, child=False))
    tag = f"b{a.avg_bits:g}"
    plans = run.stage(f"{tag}_plan", lambda: run.qbert3_plans(avg_bits=a.avg_bits, prefix=tag))
    sizes = {k: run.numel(k) for k in plans["hessian"]["bits"]}
    out = []
    for row in a.rows:
        layers = row_layers(plans, row)
        name = f"{tag}_{row}" if row != "int2" else "int2"
        r = {"row": name, **summary(layers, sizes)}
        ph = run.stage(f"{name}_posthoc", lambda: evaluate(run, f"{name}_posthoc", run.posthoc3_model(layers)))
        r.update(posthoc=ph["dev_acc"], bytes=ph["bytes"])
        if row not in a.no_qat:
            def qat():
                model, losses = run.qat3_model(name, layers, 1.0)
                res = evaluate(run, f"{name}_qat", model)
                res.update(steps=run.cfg["qat3_steps"], lr=run.cfg["qat3_lr"],
                           last_loss=round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4))
                return res
            q = run.stage(f"{name}_qat", qat)
            r.update(qat=q["dev_acc"], qat_bytes=q["bytes"])
        out.append(r)
    if a.ref_dir:
        st = pathlib.Path(a.ref_dir) / "stages"
        ph, q = (json.loads((st / f"int3_{k}.json").read_text()) if (st / f"int3_{k}.json").exists() else {}
                 for k in ("posthoc", "qat"))
        if ph or q:
            out.append({"row": f"int3 (from {a.ref_dir}, not rerun)", "weight_bits": 3.0,
                        "layers_at_bits": {"3": len(sizes)}, "bytes": ph.get("bytes") or q.get("bytes"),
                        "posthoc": ph.get("dev_acc"), "qat": q.get("dev_acc")})
    text = markdown(out)
    table.write_json(run.out / f"{tag}_results.json", {"avg_bits": a.avg_bits, "rows": out})
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
