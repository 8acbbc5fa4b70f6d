"""Post-hoc DEV accuracy of the ~3-bit bit plans of recipes/bert (issue 20): uniform int3 and the Hessian /
inverted plans under both knapsack costs ("model": score * n * 4^-b; "measured": score * ||W - Q_b(W)||^2 of the
rows' own quantizer), each round-to-nearest from the recipe's cached fp32 model with the rows' scales
(``QBERT3_CLIP``, one scale per head on q/k/v in the plans), no fine-tuning.  DEV only: for choosing the cost.

    python scripts/bert_plan_posthoc.py TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size small] [--seed 1] [--qkv-rows N] -o posthoc.json

OUTDIR: a recipe folder with ckpt/fp32.pt (and ckpt/sensitivity.json, else it is computed and cached there);
TEST.tsv is only read because the recipe's ``Run`` loads it, never scored.  The plans are the recipe's own
(``Run.qbert3_plans``, their YAMLs written to OUTDIR/ckpt/posthoc_{model,measured}_*), each model its
``Run.posthoc3_model``.  Writes -o: {plan: {dev_acc, layers_at_bits, avg_bits, bits}} plus the measured errors
and the seconds.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "bert"))

import table  # noqa: E402  (recipes/bert/table.py)

from quantnoise import hf  # noqa: E402
from quantnoise.export import pack_width  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("train", "dev", "test", "outdir"):
        ap.add_argument(a)
    ap.add_argument("--size", choices=sorted(table.SIZES), default="small")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qkv-rows", type=int, default=None,
                    help="rows per scale on q/k/v in the plans (default: a head's, as the recipe's rows; 1: per row)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    run = table.Run(argparse.Namespace(train=a.train, dev=a.dev, test=a.test, outdir=a.outdir, size=a.size,
                                       seed=a.seed, epochs=None, lr=None, stages=None, child=False))
    t0 = time.time()
    plans = {"uniform_int3": {k: table.LayerBits(bits=3) for k in run.sensitivity()[0]}}  # per row everywhere
    out = {"clip": table.QBERT3_CLIP, "plans": {}}
    for cost in ("model", "measured"):  # the recipe's own plans under either cost (YAMLs in ckpt/posthoc_COST_*)
        res = run.qbert3_plans(prefix=f"posthoc_{cost}", cost=cost, qkv_rows=a.qkv_rows)
        plans.update({f"{which}_{cost}": table.plan_layers(res, which) for which in ("hessian", "inverted")})
        out["head_rows"] = res["head_rows"]
        if cost == "measured":
            out["errors"], out["errors_seconds"] = res["errors"], res["errors_seconds"]
    sizes = {k: run.numel(k) for k in plans["uniform_int3"]}
    for name, layers in plans.items():
        bits = {k: spec.bits for k, spec in layers.items()}
        acc = hf.accuracy(hf.predict(run.posthoc3_model(layers), run.dev)[0], run.ydev)
        used = sum(sizes[k] * pack_width(b) for k, b in bits.items()) / sum(sizes.values())
        out["plans"][name] = {"dev_acc": acc, "avg_bits": round(used, 4), "bits": bits,
                              "layers_at_bits": {str(b): sum(1 for v in bits.values() if v == b) for b in table.QBERT3_BITS}}
        print(f"{name}: DEV {acc:.4f}, {used:.4f} bits, layers at 2/3/4/8 {out['plans'][name]['layers_at_bits']}",
              flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    pathlib.Path(a.output).write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
