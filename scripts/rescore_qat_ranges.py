"""The int8_qat row of ``recipes/bert/run.sh --model roberta`` scored two ways from its trained checkpoint:
with the EMA activation ranges the checkpoint holds (what the row scores since issue 22 item 5 made them
persistent), and with them removed (per-batch ranges: what the row measured before).  The recipe's own
load and accuracy code; DEV and TEST accuracy.

    python scripts/rescore_qat_ranges.py FORTUNES_DIR OUTDIR   # OUTDIR: a --model roberta --size small run
"""
import json
import pathlib
import sys
from argparse import Namespace

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes" / "lm"), str(ROOT / "recipes" / "bert")]

import roberta as RB  # noqa: E402


def main(data: str, outdir: str) -> dict:
    d, out = pathlib.Path(data), pathlib.Path(outdir)
    rec = RB.RobertaRecipe(Namespace(train=d / "train.tsv", dev=d / "dev.tsv", test=d / "test.tsv", outdir=out,
                                     size="small", jobs=1, seed=1, epochs=None, lr=None))
    rec.results = {n: json.loads((out / "steps" / f"{n}.json").read_text())["result"]
                   for n in ("train_fp32", "train_int8_qat")}
    model, task = rec.load(rec.ckpt("int8_qat"))
    ranges = [m for m in model.modules() if getattr(m, "qn_act_hi", None) is not None]
    res = {"layers_with_ranges": len(ranges), "ema": {s: rec.accuracy(model, task, s) for s in ("dev", "test")}}
    for m in ranges:
        m.qn_act_lo = m.qn_act_hi = None
    res["per_batch"] = {s: rec.accuracy(model, task, s) for s in ("dev", "test")}
    return res


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
