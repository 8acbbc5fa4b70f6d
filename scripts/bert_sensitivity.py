"""Q-BERT sensitivity of every Linear / Embedding layer of all-MiniLM-L6-v2 with a classification
head, on a few batches of a ``label<TAB>text`` file; bit plans at the given averages; optionally the
DEV accuracy and .qnz bytes of uniform int4 and of the plans.

    python scripts/bert_sensitivity.py TRAIN.tsv OUT.json [--finetune-steps N | --state fp32.pt]
        [--batches 4] [--batch-size 8] [--max-len 64] [--iters 20] [--tol 1e-3] [--seed 0]
        [--avg-bits 4,3] [--eval DEV.tsv --eval-lines 400] [--save-state ft.pt]

``--finetune-steps N``: fine-tune first (batch 16, lr 1e-4, on the TRAIN lines after the scored ones).
``--state``: a fine-tuned BertForSequenceClassification state dict (recipes/bert writes
OUTDIR/ckpt/fp32.pt); with neither, the pretrained encoder gets a new head seeded by ``--seed``.
Plans cover the layers recipes/bert quantizes (``presets.Q8BERT_LAYERS``) and count bits as a .qnz
stores them (``pack_width``: b bits since .qnz format version 2; the widths stay 2, 4, 8 as in the recipe's
``qbert_mixed`` row, whose results were measured when int3 took 4 bits).  Prints the per-layer
table (most sensitive first) and writes OUT.json: {"scores": {layer: {numel, eigs, mean, std,
score}}, "plans": {avg_bits: {layer: bits}}, "eval": {...}, "seconds", "threads", "command"}.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import sys
import tempfile
import time

import torch

from quantnoise import hf
from quantnoise.compress.bitplan import allocate_bits
from quantnoise.checkpoint import atomic_write
from quantnoise.export import ExportOptions, pack_width, save_state_dict
from quantnoise.compress.layers import LayerRule
from quantnoise.compress.plan import IPQPlan, quantize_state_dict
from quantnoise.presets import Q8BERT_LAYERS
from quantnoise.compress.sensitivity import format_table, hessian_sensitivity

log = logging.getLogger("bert_sensitivity")


def evaluate(model, state, plan, data, gold, tmp) -> dict:
    """DEV accuracy and .qnz bytes of ``model`` with its layers quantized by ``plan`` (an IPQPlan)."""
    qstate, _ = quantize_state_dict(state, plan)
    path = pathlib.Path(tmp) / "m.qnz"
    save_state_dict(path, qstate, ExportOptions(rest_dtype="float32"))
    decoded = {k: v for k, v in state.items()}
    for k in list(qstate):
        if k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            decoded[f"{name}.weight"] = (qstate[k].float().reshape(qstate[f"{name}.qscale"].shape[0], -1)
                                         * qstate[f"{name}.qscale"]).reshape(state[f"{name}.weight"].shape)
    model.load_state_dict(decoded)
    acc = hf.accuracy(hf.predict(model, data)[0], gold)
    model.load_state_dict(state)
    return {"acc": round(acc, 4), "bytes": path.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", help="label<TAB>text file (the scored batches are its first lines)")
    ap.add_argument("output", help="JSON file to write")
    ap.add_argument("--state", help="fine-tuned BertForSequenceClassification state dict (.pt)")
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--save-state", help="write the (fine-tuned) state dict here")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--avg-bits", default="4,3", help="comma-separated average bits of the plans")
    ap.add_argument("--eval", help="DEV label<TAB>text file: accuracy of uniform int4 and of the plans")
    ap.add_argument("--eval-lines", type=int, default=400)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ys, xs = hf.read_tsv(args.train)
    labels = sorted(set(ys))
    lid = {y: i for i, y in enumerate(labels)}
    model = hf.load_classifier(len(labels), seed=args.seed)
    if args.state:
        model.load_state_dict(torch.load(args.state, weights_only=True))
    tok = hf.load_tokenizer()
    n = args.batches * args.batch_size
    if args.finetune_steps:
        rest = hf.batches(tok, xs[n:], [lid[y] for y in ys[n:]], 16, args.max_len, seed=args.seed)
        t = time.perf_counter()
        hf.finetune_(model, rest[: args.finetune_steps], 1, 1e-4, seed=args.seed, tag="fine-tune")
        log.info("fine-tuned %d steps in %.0f s", min(args.finetune_steps, len(rest)), time.perf_counter() - t)
    if args.save_state:
        atomic_write(args.save_state, lambda tmp: torch.save(model.state_dict(), tmp))
    model.eval()  # no dropout: each batch's loss is a fixed function of the weights
    data = hf.batches(tok, xs[:n], [lid[y] for y in ys[:n]], args.batch_size, args.max_len)

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    t = time.perf_counter()
    scores = hessian_sensitivity(model, loss_fn, data, iters=args.iters, tol=args.tol, seed=args.seed)
    seconds = time.perf_counter() - t
    planned = {k: s for k, s in scores.items() if re.search(Q8BERT_LAYERS, k)}
    plans = {}
    for avg in [float(v) for v in args.avg_bits.split(",") if v]:
        plans[avg] = allocate_bits({k: s.score for k, s in planned.items()}, {k: s.numel for k, s in planned.items()},
                                   bits=(2, 4, 8), avg_bits=avg, bit_cost=pack_width)
    first = next(iter(plans.values()), None)
    print(format_table(scores, first.bits if first else None))
    print(f"{len(scores)} layers, {len(data)} batches of {args.batch_size} x <= {args.max_len} tokens, "
          f"{seconds:.0f} s on {torch.get_num_threads()} threads")
    out = {"scores": {k: {"numel": s.numel, "eigs": list(s.eigs), "mean": s.mean, "std": s.std, "score": s.score}
                      for k, s in scores.items()},
           "plans": {str(a): p.bits for a, p in plans.items()}, "seconds": round(seconds, 1),
           "threads": torch.get_num_threads(), "command": " ".join(["python", *sys.argv])}
    if args.eval:
        yd, xd = hf.read_tsv(args.eval, labels)
        dev = hf.batches(tok, xd[: args.eval_lines], [lid[y] for y in yd[: args.eval_lines]], 64, args.max_len)
        gold = [lid[y] for y in yd[: args.eval_lines]]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        res = {"fp32": {"acc": round(hf.accuracy(hf.predict(model, dev)[0], gold), 4)}}
        with tempfile.TemporaryDirectory() as tmp:
            res["int4_uniform"] = evaluate(model, state, IPQPlan([LayerRule(Q8BERT_LAYERS, "scalar", bits=4)]),
                                           dev, gold, tmp)
            for a, p in plans.items():
                res[f"mixed_{a:g}"] = {**evaluate(model, state, p.to_ipq_plan(), dev, gold, tmp),
                                       "avg_bits": round(p.avg_bits, 3)}
        for k, v in res.items():
            print(f"{k:<14} DEV acc {v['acc']:.4f}" + (f"  {v['bytes']:>10} bytes" if "bytes" in v else ""))
        out["eval"] = {"lines": len(gold), **res}
    text = json.dumps(out, indent=1)
    atomic_write(args.output, lambda tmp: pathlib.Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
