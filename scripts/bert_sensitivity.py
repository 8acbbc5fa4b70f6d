"""Q-BERT sensitivity of every Linear / Embedding layer of all-MiniLM-L6-v2 with a classification
head, on a few batches of a ``label<TAB>text`` file, then bit plans at the given averages.

    python scripts/bert_sensitivity.py TRAIN.tsv OUT.json [--state fp32.pt] [--batches 4]
        [--batch-size 8] [--max-len 64] [--iters 20] [--tol 1e-3] [--seed 0] [--avg-bits 4,3]

``--finetune-steps N``: fine-tune first (on the lines after the scored ones).  ``--state``: a fine-tuned BertForSequenceClassification state dict (recipes/bert writes
OUTDIR/ckpt/fp32.pt); without it the pretrained encoder gets a new head seeded by ``--seed``.
Prints the per-layer table (most sensitive first) and writes OUT.json: {"scores": {layer: {numel,
eigs, mean, std, score}}, "plans": {avg_bits: {layer: bits}}, "seconds", "threads", "command"}.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import torch

from quantnoise import hf
from quantnoise.bitplan import allocate_bits
from quantnoise.checkpoint import atomic_write
from quantnoise.sensitivity import format_table, hessian_sensitivity


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", help="label<TAB>text file (the batches are its first lines, shortest first)")
    ap.add_argument("output", help="JSON file to write")
    ap.add_argument("--state", help="fine-tuned BertForSequenceClassification state dict (.pt)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="first fine-tune this many steps (batch 16, lr 1e-4) on the lines after the scored ones")
    ap.add_argument("--avg-bits", default="4,3", help="comma-separated average bits of the plans")
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
        logging.info("fine-tuned %d steps in %.0f s", min(args.finetune_steps, len(rest)), time.perf_counter() - t)
    model.eval()  # no dropout: each batch's loss is a fixed function of the weights
    data = hf.batches(tok, xs[:n], [lid[y] for y in ys[:n]], args.batch_size, args.max_len)

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    t = time.perf_counter()
    scores = hessian_sensitivity(model, loss_fn, data, iters=args.iters, tol=args.tol, seed=args.seed)
    seconds = time.perf_counter() - t
    plans = {}
    for avg in [float(v) for v in args.avg_bits.split(",") if v]:
        plan = allocate_bits({k: s.score for k, s in scores.items()}, {k: s.numel for k, s in scores.items()},
                             avg_bits=avg)
        plans[str(avg)] = plan.bits
    print(format_table(scores, plans.get(next(iter(plans), ""))))
    print(f"{len(scores)} layers, {len(data)} batches of {args.batch_size}, {seconds:.0f} s on "
          f"{torch.get_num_threads()} threads")
    out = {"scores": {k: {"numel": s.numel, "eigs": list(s.eigs), "mean": s.mean, "std": s.std, "score": s.score}
                      for k, s in scores.items()},
           "plans": plans, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
           "command": " ".join(["python", *sys.argv])}
    text = json.dumps(out, indent=1)
    atomic_write(args.output, lambda tmp: pathlib.Path(tmp).write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
