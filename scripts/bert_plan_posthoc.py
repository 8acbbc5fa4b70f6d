"""Post-hoc DEV accuracy of the ~3-bit bit plans of recipes/bert (issue 20): uniform int3 and the Hessian /
inverted plans under both knapsack costs ("model": score * n * 4^-b; "measured": score * ||W - Q_b(W)||^2 of the
rows' own quantizer), each round-to-nearest from the recipe's cached fp32 model with the rows' scales
(``QBERT3_CLIP``, one scale per head on q/k/v in the plans), no fine-tuning.  DEV only: for choosing the cost.

    python scripts/bert_plan_posthoc.py TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size small] [--seed 1] [--qkv-rows N] -o posthoc.json

OUTDIR: a recipe folder with ckpt/fp32.pt (and ckpt/sensitivity.json, else it is computed and cached there);
TEST.tsv is only read because the recipe's ``Run`` loads it, never scored.  Writes -o: {plan: {dev_acc,
layers_at_bits, avg_bits, bits}} plus the measured errors and the seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "bert"))

import table  # noqa: E402  (recipes/bert/table.py)

from quantnoise import compress_, hf  # noqa: E402
from quantnoise.compress.bitplan import BitPlan, allocate_bits, quant_errors  # noqa: E402
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
    scores, _, _ = run.sensitivity()
    sizes = {k: v.numel for k, v in scores.items()}
    s = {k: v.score for k, v in scores.items()}
    ranked = sorted(s, key=lambda k: -s[k])
    inverted = {ranked[i]: s[ranked[-1 - i]] for i in range(len(ranked))}
    rows = run.head_rows() if a.qkv_rows is None else a.qkv_rows
    rps = {k: rows for k in sizes if re.search(table.QKV, k)}
    t = time.time()
    errors = {k: quant_errors(run.fp32().get_submodule(k).weight, table.QBERT3_BITS, rps.get(k, 1), table.QBERT3_CLIP)
              for k in sizes}
    err_s = time.time() - t
    plans = {"uniform_int3": ({k: 3 for k in sizes}, {})}
    for cost, e in (("model", None), ("measured", errors)):
        for which, sc in (("hessian", s), ("inverted", inverted)):
            p = allocate_bits(sc, sizes, bits=table.QBERT3_BITS, avg_bits=table.QBERT3_AVG, bit_cost=pack_width, errors=e)
            plans[f"{which}_{cost}"] = (p.bits, rps)
    out = {"errors": {k: {str(b): v for b, v in e.items()} for k, e in errors.items()},
           "errors_seconds": round(err_s, 1), "clip": table.QBERT3_CLIP, "head_rows": rows, "plans": {}}
    for name, (bits, groups) in plans.items():
        model = copy.deepcopy(run.fp32())
        plan = BitPlan(bits=dict(bits), sizes=sizes, budget_bits=0, used_bits=0, objective=0.0)  # for to_ipq_plan
        compress_(model, plan.to_ipq_plan(seed=a.seed, rows_per_scale=groups, clip=table.QBERT3_CLIP))
        acc = hf.accuracy(hf.predict(model, run.dev)[0], run.ydev)
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
