"""The Q8BERT table on any sentence-classification TSV (label<TAB>text): fp32, int8 QAT (Q8BERT),
dynamic int8 (DQ), static PTQ, int4 post-hoc, Quant-Noise int4 and Q-BERT's Hessian mixed precision
on all-MiniLM-L6-v2; and the iPQ table (Quant-Noise's extreme compression): ipq_posthoc (the fp32 model
continued plainly, then iPQ + fine-tuning), ipq_qn (continued with Quant-Noise, the rate chosen on DEV
among the size's candidates, then the same iPQ) and ipq_qn_int8 (its int8-centroid file); and issue 34's rows
from a task-agnostic distillation of the pretrained encoder towards its frozen self on unlabelled text (encoder.py):
ipq_qn_encoder (with Quant-Noise on the iPQ layers, the rate chosen on DEV sentences), ipq_posthoc_encoder (the
same steps without noise), each then fine-tuned on the task and iPQ'd as the rows above, and enc_sentence (the
encoders' sentence embeddings after post-hoc iPQ, no task).

    python recipes/bert/table.py TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size tiny|small|base] [--jobs 2] [--threads 1]
        [--seed 1] [--seeds N] [--encoder-noise-steps N] [--encoder-noise-p P,P,P] [--encoder-noise-kind pq|drop]
        [--encoder-distill last|all] [--text FILE]

Every choice (the PTQ calibration method) is made on DEV; the table reports TEST accuracy.  Each
stage writes OUTDIR/stages/NAME.json when done, so a rerun skips finished stages (resumable);
progress goes to stderr and OUTDIR/log.txt.  Writes OUTDIR/results.json and OUTDIR/results.md.
``--jobs N`` runs the stages in N processes of ``--threads`` torch threads each: the fp32 chain
(fp32, then the post-training rows) in one, the int8 QAT and Quant-Noise trainings in the others.
``--seeds N`` reruns the rows of SEEDED_ROWS with seeds SEED+1 .. SEED+N-1 (each in OUTDIR/seeds/S/, every random
choice from that seed) and reports each row's mean TEST accuracy with its 90 % interval over the seeds and the paired
differences of PAIRS; OUTDIR/record.json (benchmarks.harness) and OUTDIR/quality_vs_size.png come with the table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.harness, the project's one interval and record

import torch
from torch import nn

from quantnoise import IPQPlan, LayerBits, MixedPrecisionConfig, QuantNoiseConfig, compress_, quantize_, unquantize_
from quantnoise import hf, ptq
from quantnoise.compress.bitplan import allocate_bits, quant_errors
from quantnoise.checkpoint import atomic_write
from quantnoise.export import ExportOptions, load_state_dict, pack_width, save_state_dict
from quantnoise.compress.layers import LayerRule, compress_module, set_submodule
from quantnoise.presets import Q8BERT_LAYERS, q8bert, qn_int4
from quantnoise.compress.sensitivity import format_table, hessian_sensitivity
from benchmarks.harness import interval, write_record

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import encoder  # noqa: E402  (recipes/bert/encoder.py: the task-agnostic noise distillation of the encoder)

log = logging.getLogger("recipes.bert")
SIZES = {  # fine-tune budget: the same for fp32, int8 QAT and Quant-Noise int4 (texts truncated to max_len tokens)
    # tiny: the tests' smoke size (a few sentences); small: ~1 epoch of 5,000 lines in ~20 min on 2 cores
    # iPQ rows: cont_steps plain (ipq_posthoc) or noise (ipq_qn) steps from the fp32 model at cont_lr, then
    # iPQ and ipq_steps of fine-tuning at ipq_lr (k-means: kmeans_iters); qn_candidates: (noise kind, p) tried on DEV
    # ~3-bit rows: qat3_steps of fine-tuning from the fp32 model at qat3_lr with the quantizers in place (not tuned on
    # DEV; small measured once at these settings: BENCHMARKS.md, issue 20: ~3-bit rows)
    # seeds: how many seeds the rows of SEEDED_ROWS run with by default (--seeds); tiny: one, the tests pass --seeds 2
    # encoder distillation (issue 34, recipes/bert/encoder.py): enc_steps steps at enc_lr (batch / max_len of the size)
    # of the pretrained encoder towards its frozen self on unlabelled sentences (enc_corpus of make_corpus.py, or
    # enc_text = --text FILE), with enc_kind noise at each rate of enc_ps (one stage each, the rate chosen on DEV
    # sentences) and once without (the control); enc_distill: last | all hidden states; enc_eval_lines: DEV / TEST
    # sentences held out of the distillation (each); small's enc_steps from a measured ~0.7 CPU s a step (README)
    "tiny": dict(epochs=1, max_len=16, batch=4, lr=1e-4, calib_batches=1, qn_p=0.5,
                 sens_batches=1, sens_batch=4, sens_iters=2, speed_batches=1,
                 cont_steps=2, cont_lr=5e-5, ipq_steps=3, ipq_lr=1e-4, kmeans_iters=2,
                 qn_candidates=[("pq", 0.1), ("pq_ffn", 0.2), ("drop", 0.1)], qat3_steps=2, qat3_lr=5e-5, seeds=1,
                 enc_steps=2, enc_lr=5e-5, enc_kind="pq", enc_ps=[0.1, 0.3, 0.5], enc_distill="last",
                 enc_corpus="stdlib", enc_text=None, enc_eval_lines=8),
    "small": dict(epochs=1, max_len=64, batch=16, lr=1e-4, calib_batches=8, qn_p=0.5,
                  sens_batches=4, sens_batch=8, sens_iters=20, speed_batches=4,
                  cont_steps=300, cont_lr=5e-5, ipq_steps=450, ipq_lr=1e-4, kmeans_iters=20,
                  qn_candidates=[("pq", 0.3), ("pq", 0.5), ("pq", 0.8), ("pq_ffn", 0.8)], qat3_steps=200, qat3_lr=5e-5,
                  seeds=3, enc_steps=300, enc_lr=5e-5, enc_kind="pq", enc_ps=[0.1, 0.3, 0.5], enc_distill="last",
                  enc_corpus="all-stdlib", enc_text=None, enc_eval_lines=256),
    "base": dict(epochs=3, max_len=128, batch=32, lr=5e-5, calib_batches=32, qn_p=0.5,
                 sens_batches=8, sens_batch=8, sens_iters=20, speed_batches=4,
                 cont_steps=300, cont_lr=5e-5, ipq_steps=600, ipq_lr=1e-4, kmeans_iters=20,
                 qn_candidates=[("pq", 0.1), ("pq", 0.2), ("pq", 0.4)], qat3_steps=600, qat3_lr=5e-5, seeds=3,
                 enc_steps=300, enc_lr=5e-5, enc_kind="pq", enc_ps=[0.1, 0.3, 0.5], enc_distill="last",
                 enc_corpus="all-stdlib", enc_text=None, enc_eval_lines=256),
}
# iPQ as Quant-Noise (Fan et al. 2020) compresses RoBERTa: blocks of 8 weights for the FFN and the
# embeddings, 4 for attention, 256 centroids; stages in this order (FFN -> embeddings -> attention)
IPQ_GROUPS = [("ffn", r"layer\.\d+\.(intermediate|output)\.dense$", 8),
              ("emb", r"embeddings\.(word|position)_embeddings$", 8),
              ("attn", r"attention\.(self\.(query|key|value)|output\.dense)$", 4)]
IPQ_K = 256
IPQ_STAGED = True       # chosen on DEV (results.md, recipes/bert/README.md): stages vs all at once
IPQ_DISTILL = 2.0       # chosen on DEV: KL to the fp32 model's logits at this temperature (None: the labels)
IPQ_TRAIN_ALL = True    # chosen on DEV: fine-tune LayerNorms, biases, pooler and head with the centroids
PTQ_CANDIDATES = [("minmax", 100.0), ("percentile", 99.99), ("percentile", 99.9)]
ORDER = ["fp32", "int8_qat", "dq", "ptq", "int4_posthoc", "qn_int4", "qbert_mixed"]  # rows of the table
IPQ_ROWS = ["ipq_posthoc", "ipq_qn", "ipq_qn_int8"]  # the iPQ table (ipq_qn picks among the candidate stages)
# Q-BERT at ~3 bits (issue 20): uniform int3 post hoc and QAT, the Hessian plan over 2/3/4/8 at int3's weight bits
# with group-wise q/k/v scales (one per head) under QAT and under Quant-Noise, and the inverted-ranking control
QBERT3_ROWS = ["int3_posthoc", "int3_qat", "qbert3_mixed", "qbert3_qn", "qbert3_inverted"]
QBERT3_STAGES = ["qbert3_plan"] + QBERT3_ROWS  # the plans first (they need the fp32 model)
QBERT3_BITS, QBERT3_AVG = (2, 3, 4, 8), 3.0
# every ~3-bit row (uniform and plans, post hoc and QAT): MSE-clipped scales (functional.mse_clip); min-max int2
# is ternary with s = max|w| and rounds nearly every weight to 0 (BENCHMARKS.md, issue 20)
QBERT3_CLIP = "mse"
# the ~3-bit plans' knapsack cost: "measured" = score * ||W - Q_b(W)||^2 of the quantizer the rows use (QBERT3_CLIP,
# one scale per head on q/k/v; Q-BERT / HAWQ-V2), "model" = score * n * 4^-b (runs 1 and 2); chosen on post-hoc DEV
# (BENCHMARKS.md, issue 20, run 3)
QBERT3_COST = "measured"
QKV = r"attention\.self\.(query|key|value)$"  # group-wise: one scale per attention head
FP32_CHAIN = ["fp32", "dq", "ptq", "int4_posthoc", "qbert_mixed", "pretrained_cosine"]  # need fp32 (but the last)
TRAININGS = ["int8_qat", "qn_int4"]  # independent of fp32: fine-tuned from the pretrained model
STAGES = FP32_CHAIN[:-1] + TRAININGS  # run order in one process: the cheap post-training rows first
# --seeds: the rows rerun with every seed (each seed its own fp32 fine-tune, head init, data order, k-means and noise
# masks; the other rows are of the first seed's fp32 model only), and the paired differences reported: (row, baseline)
SEEDED_ROWS = ["fp32", "ipq_posthoc", "ipq_qn", "int3_qat", "qbert3_mixed"]
# issue 34: the task rows from the distilled encoders (ipq_posthoc_encoder: the no-noise control) and the
# sentence-embedding stage; enc_plain and the enc_KIND_P candidates are the distillations (OUTDIR/ckpt/NAME.pt)
ENC_PLAIN, ENC_SENTENCE = "enc_plain", "enc_sentence"
ENCODER_ROWS = ["ipq_posthoc_encoder", "ipq_qn_encoder"]
SEEDED_ROWS += ENCODER_ROWS
PAIRS = ([("ipq_qn", "ipq_posthoc"), ("qbert3_mixed", "int3_qat"), ("ipq_qn_encoder", "ipq_posthoc_encoder")]
         + [(r, "fp32") for r in SEEDED_ROWS[1:]])
RECORD = "recipe_bert"  # OUTDIR/record.json's name (benchmarks.harness.write_record)


def candidate_name(kind: str, p: float) -> str:
    return f"ipq_qn_{kind}_{p:g}"


def enc_candidate_name(kind: str, p: float) -> str:
    return f"enc_{kind}_{p:g}"


def enc_candidates(cfg: dict) -> List[str]:
    return [enc_candidate_name(cfg["enc_kind"], p) for p in cfg["enc_ps"]]


def encoder_stages(cfg: dict) -> List[str]:
    """issue 34's stages in run order: the control distillation, one noise distillation per rate, the two task rows
    from them (ipq_qn_encoder from the candidate best on DEV sentences after iPQ) and the sentence-embedding row."""
    return [ENC_PLAIN] + enc_candidates(cfg) + ENCODER_ROWS + [ENC_SENTENCE]


def size_cfg(size: str, args) -> dict:
    """The size's settings with the command line's overrides (--epochs, --lr, --encoder-*, --text)."""
    cfg = dict(SIZES[size])
    over = {"epochs": getattr(args, "epochs", None), "lr": getattr(args, "lr", None),
            "enc_steps": getattr(args, "encoder_noise_steps", None), "enc_ps": getattr(args, "encoder_noise_p", None),
            "enc_kind": getattr(args, "encoder_noise_kind", None), "enc_distill": getattr(args, "encoder_distill", None),
            "enc_text": getattr(args, "text", None)}
    cfg.update({k: v for k, v in over.items() if v is not None})
    return cfg


def ipq_stages(cfg: dict):
    """Every stage of the iPQ rows, in run order (they need fp32): the post-hoc row, one per noise
    candidate, then ipq_qn (the DEV-best candidate's file on TEST) and its int8-centroid export."""
    return ["ipq_posthoc"] + [candidate_name(k, p) for k, p in cfg["qn_candidates"]] + ["ipq_qn", "ipq_qn_int8"]


def job_groups(jobs: int, cfg: dict):
    """The stages of each of ``jobs`` processes: the fp32 chain in the first, the independent
    trainings spread over the others (all in one process when jobs == 1); the iPQ rows (which need
    fp32, and ipq_qn every candidate: a job waits for them) after them, the post-hoc row and the first
    half of the candidates in the first job, the other candidates and the choice in the last."""
    ipq = ipq_stages(cfg)
    enc = encoder_stages(cfg)
    if jobs <= 1:
        return [STAGES + ["pretrained_cosine"] + ipq + QBERT3_STAGES + enc]
    groups = [list(FP32_CHAIN)] + [[] for _ in range(min(jobs, 1 + len(TRAININGS)) - 1)]
    for i, name in enumerate(TRAININGS):
        groups[1 + i % (len(groups) - 1)].append(name)
    half = 1 + (len(ipq) - 2) // 2  # the post-hoc row and the first half of the candidates (~equal CPU per job)
    groups[0] += ipq[:half]
    groups[-1] += ipq[half:-2]
    groups[-1 if len(groups) < 3 else 1] += QBERT3_STAGES  # after its trainings; waits for fp32
    cands, h = enc_candidates(cfg), len(cfg["enc_ps"]) // 2  # the distillations: the control and half the rates here
    groups[0] += [ENC_PLAIN] + cands[:h] + ["ipq_posthoc_encoder"]
    groups[-1] += cands[h:] + ["ipq_qn_encoder", ENC_SENTENCE]  # they wait for the other job's distillations
    groups[-1] += ipq[-2:]  # the choice last: it waits for the first job's candidates
    return groups


def seed_stages(cfg: dict) -> List[str]:
    """The stages another seed runs (in OUTDIR/seeds/S/) for SEEDED_ROWS: its own fp32 fine-tune, the iPQ post-hoc
    row and every noise candidate (ipq_qn is chosen and scored in OUTDIR, by the mean over seeds on DEV), its own
    ~3-bit plan (the sensitivity of its fp32 model) and the two ~3-bit QAT rows."""
    return (["fp32", "ipq_posthoc"] + [candidate_name(k, p) for k, p in cfg["qn_candidates"]]
            + ["qbert3_plan", "int3_qat", "qbert3_mixed"] + encoder_stages(cfg))


def seed_list(first: int, n: int) -> List[int]:
    return [first + i for i in range(n)]


def excludes_zero(iv: dict) -> Optional[bool]:
    """Whether a paired difference's interval lies on one side of 0 (None: one seed, no interval)."""
    if iv.get("lo90") is None:
        return None
    return iv["lo90"] > 0 or iv["hi90"] < 0


def seed_summary(accs: Dict[str, Dict[int, float]], seeds: Sequence[int], pairs=PAIRS) -> dict:
    """Per row of ``accs`` ({row: {seed: TEST accuracy}}): its per-seed list, the mean with its 90 % interval over
    the seeds (``benchmarks.harness.interval``), and for each (row, baseline) of ``pairs`` the interval of the
    paired differences row - baseline, seed by seed (the same seed: the same fp32 model, data order and masks)."""
    out = {r: {"seeds": [{"seed": s, "acc": a[s]} for s in seeds], "acc": interval([a[s] for s in seeds])}
           for r, a in accs.items()}
    for row, base in pairs:
        if row in accs and base in accs:
            d = [accs[row][s] - accs[base][s] for s in seeds]
            iv = interval(d)
            out[row].setdefault("diff", {})[base] = {**iv, "seeds": d, "excludes_0": excludes_zero(iv)}
    return out


def acc_of(r: dict) -> float:
    """A row's TEST accuracy: the mean over seeds for a seeded row (``acc`` an interval), else its one value."""
    return r["acc"]["mean"] if isinstance(r["acc"], dict) else r["acc"]


def dev_of(r: dict) -> float:
    """A row's DEV accuracy: the mean over its seeds for a seeded row (``acc`` an interval), else its one value."""
    devs = [e.get("dev_acc") for e in r.get("seeds", [])] if isinstance(r["acc"], dict) else []
    return statistics.fmean(devs) if devs and None not in devs else r["dev_acc"]


def fp32_base(results: dict, row: str) -> float:
    """The fp32 accuracy a row's loss is measured from: the mean over seeds for a seeded row, the first seed's fp32
    model (the one it was made from) for a row of one seed."""
    fp = results["fp32"]
    return acc_of(fp) if row in SEEDED_ROWS or "seeds" not in fp else fp["seeds"][0]["acc"]


def fmt_interval(r: dict) -> str:
    """`` [0.7501, 0.7739]``: a seeded row's 90 % interval over the seeds; empty for one value or one seed."""
    a = r["acc"]
    return f" [{a['lo90']:.4f}, {a['hi90']:.4f}]" if isinstance(a, dict) and a.get("lo90") is not None else ""


def fmt_acc(r: dict) -> str:
    """``0.7620`` for one value, ``0.7620 [0.7501, 0.7739]`` for a mean over seeds with its 90 % interval."""
    return f"{acc_of(r):.4f}{fmt_interval(r)}"


def plot_quality_vs_size(results: dict, path: pathlib.Path, title: str = "") -> pathlib.Path:
    """OUTDIR/quality_vs_size.png: TEST accuracy against file bytes (log x), one point per row, the seeds' 90 %
    interval as error bars where a row has one, fp32 as a horizontal line (its interval a band).  Atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    fp = results["fp32"]
    ax.axhline(acc_of(fp), color="k", ls="--", lw=1, label=f"fp32 ({fp['bytes'] / 1e6:.1f} MB, the star)")
    ax.plot([fp["bytes"]], [acc_of(fp)], "k*", ms=9)
    if isinstance(fp["acc"], dict) and fp["acc"].get("lo90") is not None:
        ax.axhspan(fp["acc"]["lo90"], fp["acc"]["hi90"], color="k", alpha=0.08, label="fp32's 90% interval")
    rows = sorted((r["bytes"], name, r) for name, r in results.items()
                  if name != "fp32" and "bytes" in r and "acc" in r)
    for i, (nbytes, name, r) in enumerate(rows):
        y, a = acc_of(r), r["acc"]
        seeded = isinstance(a, dict) and a.get("lo90") is not None
        yerr = [[y - a["lo90"]], [a["hi90"] - y]] if seeded else None
        ax.errorbar([nbytes], [y], yerr=yerr, fmt="o" if seeded else "s", capsize=3, ms=5,
                    color="C0" if seeded else "C1")
        ax.annotate(name, (nbytes, y), textcoords="offset points", xytext=(5, 3 + 8 * (i % 5)), fontsize=7)  # staggered
    ax.set_xscale("log")
    ax.set_xlabel("file bytes (.qnz; dq: torch.save), log scale")
    ax.set_ylabel("TEST accuracy")
    n = max((r["acc"].get("n", 1) for r in results.values() if isinstance(r.get("acc"), dict)), default=1)
    ax.set_title((title + "\n" if title else "")
                 + f"circles: mean over {n} seed(s) with the seeds' 90% interval; squares: the first seed only", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return pathlib.Path(path)


def weights_id(state: dict) -> str:
    """The first 16 hex digits of the SHA-256 of a state dict's names and tensor bytes: equal for equal weights
    (a torch.save file's own hash is not: each file carries a random serialization id)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: pathlib.Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(str(path), lambda tmp: pathlib.Path(tmp).write_text(text))


def compressed(model: nn.Module, bits, clip: str = "minmax") -> nn.Module:
    """A copy of ``model`` whose Q8BERT layers are int ``bits`` layers (one scale per row): the
    model a .qnz stores.  ``bits``: one width for every such layer, or {layer name: width} (a bit plan);
    ``clip``: the scales' range (minmax | mse, ``scalar_quantize``)."""
    model = copy.deepcopy(model)
    unquantize_(model)
    rule = LayerRule(pattern=Q8BERT_LAYERS, scheme="scalar", bits=bits if isinstance(bits, int) else 8, clip=clip)
    for name, m in list(model.named_modules()):
        if name and isinstance(m, (nn.Linear, nn.Embedding)) and rule.matches(name):
            r = rule if isinstance(bits, int) else LayerRule(pattern=rule.pattern, scheme="scalar", bits=bits[name],
                                                             clip=clip)
            set_submodule(model, name, compress_module(m, r, name))
    return model


def plan_layers(plan: dict, which: str) -> dict:
    """{layer: LayerBits} of ``Run.qbert3_plans``' result ``plan`` ("hessian" | "inverted"): each layer at its
    width, one scale per head (plan["head_rows"] rows) on q/k/v, per row elsewhere."""
    rows = plan["head_rows"]
    return {k: LayerBits(bits=b, rows_per_scale=rows if re.search(QKV, k) else 1) for k, b in plan[which]["bits"].items()}


def qnz_bytes(model: nn.Module, path: pathlib.Path, rest_dtype: str = "float32") -> int:
    save_state_dict(path, model.state_dict(), ExportOptions(rest_dtype=rest_dtype))
    return path.stat().st_size


def torch_save_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count ``n`` inside, the caller's again after (also when the block raises)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sensitivity_lines(n_lines: int, n: int, seed: int) -> List[int]:
    """Indices of ``n`` TRAIN lines for Q-BERT's Hessian batches: a seeded random subset, not the first lines in
    file order (a TSV sorted by label would give the Hessians of one class)."""
    return torch.randperm(n_lines, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def timed(model: nn.Module, data, threads: int) -> float:
    with torch_threads(threads), torch.no_grad():
        t = time.perf_counter()
        for b in data:
            hf.forward(model, b)
        return time.perf_counter() - t


class Run:
    def __init__(self, args):
        self.args, self.cfg = args, size_cfg(args.size, args)
        self.cfg.pop("seeds")  # the default of --seeds (main); this run's seeds are self.seeds
        self.out = pathlib.Path(args.outdir)
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        (self.out / "ckpt").mkdir(exist_ok=True)
        ytr, xtr = hf.read_tsv(args.train)
        self.xtr = xtr
        self.labels = sorted(set(ytr))
        ydev, xdev = hf.read_tsv(args.dev, self.labels)
        yte, xte = hf.read_tsv(args.test, self.labels)
        lid = {y: i for i, y in enumerate(self.labels)}
        self.ytr, self.ydev, self.yte = [lid[y] for y in ytr], [lid[y] for y in ydev], [lid[y] for y in yte]
        self.tok = hf.load_tokenizer()
        c = self.cfg
        self.train = hf.batches(self.tok, xtr, self.ytr, c["batch"], c["max_len"], seed=args.seed)
        self.dev = hf.batches(self.tok, xdev, self.ydev, 64, c["max_len"])
        self.test = hf.batches(self.tok, xte, self.yte, 64, c["max_len"])
        cut = sum(len(e) > c["max_len"] for e in self.tok(list(xtr), truncation=False)["input_ids"])
        log.info("data: %d train / %d dev / %d test lines, %d labels, size=%s %s; %d train texts (%.1f%%) truncated "
                 "to %d tokens", len(xtr), len(xdev), len(xte), len(self.labels), args.size, c, cut,
                 100.0 * cut / len(xtr), c["max_len"])
        self.truncated = cut
        self._fp32, self._fp32_id = None, None
        self._corpus, self._teacher_enc, self._ref_emb = None, None, {}
        self.seeds = seed_list(args.seed, getattr(args, "seeds", None) or 1)  # [args.seed]: this seed only
        self.n_params = hf.n_params(self.new_model())

    # ------------------------------------------------------------------ helpers
    def stage(self, name: str, fn):
        path = self.out / "stages" / f"{name}.json"
        if path.exists():
            log.info("[%s] done earlier: %s", name, path)
            res = json.loads(path.read_text())
            if not self.stale_encoder_stage(name, res):
                return res
            log.info("[%s] chosen among other candidates than %s: redoing it", name, ",".join(enc_candidates(self.cfg)))
        t = time.time()
        log.info("[%s] start", name)
        res = fn()
        if name in encoder_stages(self.cfg):  # what a rerun checks (stale_encoder_stage)
            res.update(enc_settings=self.enc_settings(), candidates_run=enc_candidates(self.cfg))
        res["seconds"] = round(time.time() - t, 1)
        write_json(path, res)
        log.info("[%s] done in %.0f s: %s", name, res["seconds"],
                 {k: v for k, v in res.items() if k not in ("speed", "errors")})  # errors: 4 numbers a layer, in the json
        return res

    def new_model(self) -> nn.Module:
        return hf.load_classifier(len(self.labels), seed=self.args.seed)

    def finetune(self, model: nn.Module, tag: str) -> None:
        c = self.cfg
        hf.finetune_(model, self.train, c["epochs"], c["lr"], seed=self.args.seed, tag=tag)

    def fp32_info(self) -> dict:
        """This run's seed and its fp32 model's identity (``weights_id``): each row built from the fp32 model records
        it, so the pairing of rows over seeds can be checked."""
        if self._fp32_id is None:
            self._fp32_id = weights_id(self.fp32().state_dict())
        return {"seed": self.args.seed, "fp32_id": self._fp32_id}

    def seed_dir(self, seed: int) -> pathlib.Path:
        """Where seed ``seed``'s stages live: OUTDIR for this run's own seed, OUTDIR/seeds/SEED for the others."""
        return self.out if seed == self.args.seed else self.out / "seeds" / str(seed)

    def fp32(self) -> nn.Module:
        if self._fp32 is None:
            model = self.new_model()
            model.load_state_dict(torch.load(self.out / "ckpt" / "fp32.pt", weights_only=True))
            self._fp32 = model.eval()
        return self._fp32

    def score(self, name: str, model: nn.Module, nbytes: int, dev: bool = False) -> dict:
        """TEST accuracy, bytes, bits per parameter (of the fp32 model's count); the TEST sentence
        embeddings are saved for the cosine to fp32, computed in ``report`` (stages may run in parallel)."""
        pred, emb = hf.predict(model, self.test)
        atomic_write(str(self.out / "ckpt" / f"{name}_test_emb.pt"), lambda tmp: torch.save(emb, tmp))
        res = {"acc": hf.accuracy(pred, self.yte), "bytes": nbytes, "avg_bits": round(8.0 * nbytes / self.n_params, 3)}
        if dev:
            res["dev_acc"] = hf.accuracy(hf.predict(model, self.dev)[0], self.ydev)
        return res

    # ------------------------------------------------------------------- stages
    def run_fp32(self) -> dict:
        ck = self.out / "ckpt" / "fp32.pt"
        if not ck.exists():
            model = self.new_model()
            self.finetune(model, "fp32")
            atomic_write(str(ck), lambda tmp: torch.save(model.state_dict(), tmp))
        res = self.score("fp32", self.fp32(), qnz_bytes(self.fp32(), self.out / "ckpt" / "fp32.qnz"), dev=True)
        return {**res, **self.fp32_info()}

    def run_int8_qat(self) -> dict:
        model = self.new_model()
        quantize_(model, q8bert(seed=self.args.seed))
        self.finetune(model, "int8_qat")
        res = self.score("int8_qat", model, qnz_bytes(compressed(model, 8), self.out / "ckpt" / "int8.qnz"), dev=True)
        res["note"] = "Q8BERT fake quant (int8 weights + int8 Linear inputs, EMA ranges) evaluated; bytes of its int8 .qnz"
        return res

    def run_dq(self) -> dict:
        base = self.fp32()
        dq = ptq.dynamic_int8(base)
        res = self.score("dq", dq, torch_save_bytes(dq))
        res["note"] = "torch.ao quantize_dynamic (real int8 kernels); bytes = torch.save of its state dict"
        speed = {}
        data = self.test[: min(len(self.test), self.cfg["speed_batches"])]
        for threads in (1, 2):
            t_fp, t_dq = [], []
            for _ in range(3):  # interleaved, best of 3
                t_fp.append(timed(base, data, threads))
                t_dq.append(timed(dq, data, threads))
            speed[f"{threads}t"] = {"fp32_s": round(min(t_fp), 3), "dq_s": round(min(t_dq), 3),
                                   "speedup": round(min(t_fp) / min(t_dq), 3)}
            log.info("[dq] %d thread(s): fp32 %.2f s, dq %.2f s, speed-up %.2fx", threads, min(t_fp), min(t_dq),
                     min(t_fp) / min(t_dq))
        res["speed"] = speed
        return res

    def run_ptq(self) -> dict:
        base, calib = self.fp32(), self.train[: self.cfg["calib_batches"]]
        best = None
        for method, pct in PTQ_CANDIDATES:
            model = ptq.static_int8(base, calib, hf.forward, q8bert(), method=method, percentile=pct)
            dev = hf.accuracy(hf.predict(model, self.dev)[0], self.ydev)
            log.info("[ptq] %s %s: dev acc %.4f", method, pct, dev)
            if best is None or dev > best[0]:
                best = (dev, method, pct, model)
        dev, method, pct, model = best
        res = self.score("ptq", model, qnz_bytes(compressed(model, 8), self.out / "ckpt" / "ptq.qnz"))
        res.update(dev_acc=dev, method=method, percentile=pct, calib_batches=len(calib),
                   note="static calibration (fake quant: int8 weights + int8 Linear inputs); method chosen on DEV")
        return res

    def run_int4_posthoc(self) -> dict:
        model = compressed(self.fp32(), 4)
        res = self.score("int4_posthoc", model, qnz_bytes(model, self.out / "ckpt" / "int4_posthoc.qnz"))
        res["note"] = "round-to-nearest int4, one scale per row, Q8BERT layers of the fp32 model"
        return res

    def run_qn_int4(self) -> dict:
        model = self.new_model()
        quantize_(model, qn_int4(self.cfg["qn_p"], seed=self.args.seed))
        self.finetune(model, "qn_int4")
        model = compressed(model, 4)
        res = self.score("qn_int4", model, qnz_bytes(model, self.out / "ckpt" / "qn_int4.qnz"), dev=True)
        res["note"] = f"Quant-Noise scalar int4 p={self.cfg['qn_p']} fine-tune, then the int4 model"
        return res

    def run_qbert_mixed(self) -> dict:
        """Q-BERT: Hessian sensitivity of each Q8BERT layer of the fine-tuned fp32 model on a seeded random subset
        of TRAIN lines (``sensitivity_lines``; no DEV, no TEST), an exact bit plan over widths 2/4/8 at their .qnz cost with the weight
        bits of uniform int4 as the budget (so never more bytes than int4_posthoc), then post-hoc int-N."""
        base = self.fp32()
        scores, sens_s, n_batches = self.sensitivity()
        plan = allocate_bits({k: v.score for k, v in scores.items()}, {k: v.numel for k, v in scores.items()},
                             bits=(2, 4, 8), avg_bits=4.0, bit_cost=pack_width)
        table = format_table(scores, plan.bits)
        atomic_write(str(self.out / "sensitivity.txt"), lambda tmp: pathlib.Path(tmp).write_text(table + "\n"))
        plan.save_yaml(str(self.out / "ckpt" / "qbert_plan.yaml"), {k: v.score for k, v in scores.items()})
        log.info("[qbert_mixed] sensitivity of %d layers on %d batches in %.0f s; plan:\n%s", len(scores), n_batches,
                 sens_s, table)
        model = compressed(base, plan.bits)
        res = self.score("qbert_mixed", model, qnz_bytes(model, self.out / "ckpt" / "qbert_mixed.qnz"))
        widths = {str(b): sum(1 for v in plan.bits.values() if v == b) for b in (2, 4, 8)}
        top = sorted(scores.values(), key=lambda v: -v.score)[:5]
        res.update(plan_avg_bits=round(plan.avg_bits, 4), layers_at_bits=widths, plan_method=plan.method,
                   uniform_int4=all(v == 4 for v in plan.bits.values()), sens_seconds=round(sens_s, 1),
                   sens_batches=n_batches, most_sensitive=[[v.name, round(v.score, 4)] for v in top],
                   note=f"Hessian plan over 2/4/8 bits at the weight bits of uniform int4 "
                        f"(layers at 2/4/8: {widths['2']}/{widths['4']}/{widths['8']}); post-hoc, per row")
        return res

    def sensitivity(self):
        """(scores {layer: SensitivityScore}, seconds, batches): Q-BERT's Hessian sensitivity of each Q8BERT layer
        of the fine-tuned fp32 model on a seeded random subset of TRAIN lines (``sensitivity_lines``; no DEV, no TEST);
        computed once, cached in ckpt/."""
        from quantnoise.compress.sensitivity import SensitivityScore

        path = self.out / "ckpt" / "sensitivity.json"
        if path.exists():
            d = json.loads(path.read_text())
            return ({k: SensitivityScore(name=v["name"], numel=v["numel"], eigs=tuple(v["eigs"])) for k, v in d["scores"].items()},
                    d["seconds"], d["batches"])
        c = self.cfg
        n = c["sens_batches"] * c["sens_batch"]
        lines = sensitivity_lines(len(self.xtr), n, self.args.seed)
        data = hf.batches(self.tok, [self.xtr[i] for i in lines], [self.ytr[i] for i in lines], c["sens_batch"],
                          c["max_len"])
        model = copy.deepcopy(self.fp32()).eval()  # eval: no dropout, each batch's loss a fixed function of the weights

        def loss_fn(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

        t = time.time()
        scores = hessian_sensitivity(model, loss_fn, data, layers=Q8BERT_LAYERS, iters=c["sens_iters"], tol=1e-3,
                                     seed=self.args.seed)
        secs = time.time() - t
        write_json(path, {"scores": {k: dataclasses.asdict(v) for k, v in scores.items()}, "seconds": secs,
                          "batches": len(data)})
        return scores, secs, len(data)

    # ------------------------------------------------------------- ~3-bit rows
    def run_qbert3_plan(self) -> dict:
        """The Hessian plan over widths 2/3/4/8 at uniform int3's weight bits (each width at its .qnz cost: int3
        3 bits), and the control: the same knapsack on the reversed ranking (the i-th most sensitive layer given
        the i-th least sensitive's score).  Cost QBERT3_COST: "measured" weighs each score by the squared error of
        the rows' own quantizer on the fp32 weights (``quant_errors``: QBERT3_CLIP, one scale per head on q/k/v),
        "model" by n * 4^-b.  Both written to ckpt/ as plan YAMLs with one scale per head on q/k/v."""
        self.wait_for(["fp32"])
        return self.qbert3_plans()

    def qbert3_plans(self, avg_bits: float = QBERT3_AVG, prefix: str = "qbert3", cost: str = QBERT3_COST,
                     qkv_rows: Optional[int] = None) -> dict:
        """``run_qbert3_plan``'s plans at a budget of ``avg_bits`` stored weight bits (the recipe: QBERT3_AVG),
        the YAMLs written to ckpt/PREFIX_{hessian,inverted}_plan.yaml (``cost``: the 4^-b model or the measured
        error; ``qkv_rows``: rows per scale on q/k/v instead of a head's)."""
        scores, secs, n_batches = self.sensitivity()
        sizes = {k: v.numel for k, v in scores.items()}
        ranked = sorted(scores, key=lambda k: -scores[k].score)
        inverted = {ranked[i]: scores[ranked[-1 - i]].score for i in range(len(ranked))}
        res = {"sens_seconds": round(secs, 1), "sens_batches": n_batches, "cost": cost,
               "head_rows": self.head_rows() if qkv_rows is None else qkv_rows}
        rps = {k: res["head_rows"] for k in sizes if re.search(QKV, k)}
        errors = None
        if cost == "measured":
            t = time.time()
            errors = {k: quant_errors(self.fp32().get_submodule(k).weight, QBERT3_BITS, rps.get(k, 1), QBERT3_CLIP)
                      for k in sizes}
            res["errors"] = {k: {str(b): e for b, e in v.items()} for k, v in errors.items()}
            res["errors_seconds"] = round(time.time() - t, 1)
        for name, s in (("hessian", {k: v.score for k, v in scores.items()}), ("inverted", inverted)):
            plan = allocate_bits(s, sizes, bits=QBERT3_BITS, avg_bits=avg_bits, bit_cost=pack_width, errors=errors)
            plan.save_yaml(str(self.out / "ckpt" / f"{prefix}_{name}_plan.yaml"), s, rows_per_scale=rps, clip=QBERT3_CLIP)
            res[name] = {"bits": plan.bits, "avg_bits": round(plan.avg_bits, 4), "method": plan.method,
                         "layers_at_bits": {str(b): sum(1 for v in plan.bits.values() if v == b) for b in QBERT3_BITS}}
        return res

    def head_rows(self) -> int:
        c = self.new_model().config
        return c.hidden_size // c.num_attention_heads

    def qat3_row(self, name: str, layers: dict, p: float, note: str) -> dict:
        """The fp32 model fine-tuned qat3_steps with ``layers``' quantizers in place (p=1: QAT, else Quant-Noise),
        compressed at their widths (the QAT model's own integers), exported to ckpt/NAME.qnz; DEV and TEST
        accuracy of the model read back from the file."""
        self.wait_for(["fp32"])
        c = self.cfg
        model, losses = self.qat3_model(name, layers, p)
        path = self.out / "ckpt" / f"{name}.qnz"
        qnz_bytes(model, path)
        res = self.test_from_qnz(name, path)
        res.update(self.fp32_info())
        res.update(dev_acc=self.dev_acc(self.from_qnz(path)), p=p, steps=c["qat3_steps"], lr=c["qat3_lr"],
                   last_loss=round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4), note=note,
                   weight_bits=round(sum(self.numel(n) * s.bits for n, s in layers.items()) /
                                     sum(self.numel(n) for n in layers), 4))
        return res

    def qat3_model(self, name: str, layers: dict, p: float):
        """(model, losses): ``qat3_row``'s model before export, the fp32 model fine-tuned qat3_steps at qat3_lr with
        ``layers``' quantizers in place (QBERT3_CLIP; p=1: QAT, else Quant-Noise), then compressed at their widths."""
        model = copy.deepcopy(self.fp32())
        cfg = MixedPrecisionConfig(layers=layers, p=p, seed=self.args.seed, clip=QBERT3_CLIP)
        quantize_(model, cfg)
        losses = self.train_steps_(model, self.cfg["qat3_steps"], self.cfg["qat3_lr"], name)
        compress_(model, cfg.to_ipq_plan(seed=self.args.seed))
        return model, losses

    def posthoc3_model(self, layers: dict) -> nn.Module:
        """The fp32 model compressed round-to-nearest with ``layers``' quantizers (widths, scale groups, QBERT3_CLIP),
        no fine-tuning: the post-hoc twin of ``qat3_model`` (uniform per-row int3: ``run_int3_posthoc``'s model)."""
        model = copy.deepcopy(self.fp32())
        compress_(model, MixedPrecisionConfig(layers=layers, seed=self.args.seed, clip=QBERT3_CLIP).to_ipq_plan(seed=self.args.seed))
        return model.eval()

    def numel(self, name: str) -> int:
        return self.fp32().get_submodule(name).weight.numel()

    def plan3(self, which: str) -> dict:
        if "qbert3_plan" in (self.args.stages or QBERT3_STAGES):
            self.wait_for(["qbert3_plan"])  # this process or another job runs it
        else:  # --stages int3_qat,... without the plan: make it here (its sensitivity is cached in ckpt/)
            self.stage("qbert3_plan", self.run_qbert3_plan)
        return plan_layers(json.loads((self.out / "stages" / "qbert3_plan.json").read_text()), which)

    def run_int3_posthoc(self) -> dict:
        self.wait_for(["fp32"])
        model = compressed(self.fp32(), 3, clip=QBERT3_CLIP)
        path = self.out / "ckpt" / "int3_posthoc.qnz"
        qnz_bytes(model, path)
        res = self.test_from_qnz("int3_posthoc", path)
        res.update(dev_acc=self.dev_acc(self.from_qnz(path)), weight_bits=3.0,
                   note=f"round-to-nearest int3, one scale per row ({QBERT3_CLIP} clip), the Q8BERT layers of the fp32 model")
        return res

    def run_int3_qat(self) -> dict:
        names = [n for n in self.plan3("hessian")]  # the same layers as the plans
        return self.qat3_row("int3_qat", {n: LayerBits(bits=3) for n in names}, 1.0,
                             "uniform int3 QAT (one scale per row) from the fp32 model")

    def run_qbert3_mixed(self) -> dict:
        return self.qat3_row("qbert3_mixed", self.plan3("hessian"), 1.0,
                             "Hessian plan over 2/3/4/8 at int3's weight bits, one scale per head on q/k/v, QAT")

    def run_qbert3_qn(self) -> dict:
        p = self.cfg["qn_p"]
        return self.qat3_row("qbert3_qn", self.plan3("hessian"), p, f"the qbert3_mixed plan, Quant-Noise p={p:g}")

    def run_qbert3_inverted(self) -> dict:
        return self.qat3_row("qbert3_inverted", self.plan3("inverted"), 1.0,
                             "control: the plan of the reversed sensitivity ranking, same budget, QAT")

    def qbert3_report(self, results: dict) -> str:
        """The ~3-bit table: DEV / TEST accuracy of each row's .qnz, one standard error of TEST accuracy, bytes."""
        fp, plan = results["fp32"], json.loads((self.out / "stages" / "qbert3_plan.json").read_text())
        n = len(self.yte)
        rows = ["## Q-BERT at ~3 bits: every row's .qnz read back and scored", "",
                "| row | DEV acc | test acc (± 1 s.e. of one TEST pass) [90% interval over seeds] | weight bits | bytes | "
                "fp32 .qnz / this | bits/param | vs int3_posthoc bytes | note |",
                "|---|---|---|---|---|---|---|---|---|",
                f"| fp32 | {dev_of(fp):.4f} | {fmt_acc(fp)} | 32 | {fp['bytes']:,} | 1.0x | {fp['avg_bits']:.2f} | | |"]
        ref = results["int3_posthoc"]["bytes"]
        for k in QBERT3_ROWS:
            r = results[k]
            a = acc_of(r)
            se = math.sqrt(max(a * (1 - a), 0.0) / max(n, 1))
            rows.append(f"| {k} | {dev_of(r):.4f} | {a:.4f} ± {se:.4f}{fmt_interval(r)} | {r['weight_bits']:.3f} | {r['bytes']:,} | "
                        f"{fp['bytes'] / r['bytes']:.1f}x | {r['avg_bits']:.2f} | {r['bytes'] - ref:+,} | {r['note']} |")
        c = self.cfg
        return "\n".join(rows) + (
            f"\n\nPlans (widths {'/'.join(map(str, QBERT3_BITS))} at {QBERT3_AVG} weight bits, .qnz cost; sensitivity on "
            f"{plan['sens_batches']} TRAIN batches): Hessian layers at 2/3/4/8 {plan['hessian']['layers_at_bits']}, "
            f"inverted {plan['inverted']['layers_at_bits']}; knapsack cost {plan.get('cost', 'model')} "
            f"({'score x measured squared error of the quantizer' if plan.get('cost') == 'measured' else 'score x n x 4^-b'}); "
            f"q/k/v one scale per {plan['head_rows']} rows (a head). "
            f"Scales: {QBERT3_CLIP} clip on every row. "
            f"Fine-tuning: {c['qat3_steps']} steps at lr {c['qat3_lr']:g} from the fp32 model (not tuned on DEV).")

    # ------------------------------------------------------------------ iPQ rows
    def runner(self, name: str):
        kinds = {candidate_name(k, p): (k, p) for k, p in self.cfg["qn_candidates"]}
        if name in kinds:
            return lambda: self.run_ipq_candidate(*kinds[name])
        rates = {enc_candidate_name(self.cfg["enc_kind"], p): p for p in self.cfg["enc_ps"]}
        if name in rates:
            return lambda: self.run_encoder(self.cfg["enc_kind"], rates[name])
        return getattr(self, f"run_{name}")

    def wait_for(self, names) -> None:
        """Block until the stages ``names`` are done (another ``--jobs`` process runs them)."""
        t = time.time()
        while not all((self.out / "stages" / f"{n}.json").exists() for n in names):
            if (self.args.child and os.getppid() == 1) or time.time() - t > 4 * 3600:  # orphaned, or waited too long
                raise SystemExit(f"error: stages {names} are not done; run them (`--stages {','.join(names)}`)")
            time.sleep(5)

    def teacher(self):
        """The fp32 model's logits on every TRAIN batch (eval mode), cached: the distillation targets."""
        path = self.out / "ckpt" / "teacher_logits.pt"
        if not path.exists():
            with torch.no_grad():
                logits = [hf.forward(self.fp32(), b).logits for b in self.train]
            atomic_write(str(path), lambda tmp: torch.save(logits, tmp))
        return torch.load(path, weights_only=True)

    def train_steps_(self, model: nn.Module, steps: int, lr: float, tag: str, params=None, distill=None) -> list:
        """``steps`` AdamW steps on TRAIN batches in a seeded order (cycling), linear warm-up 10 % then
        decay, clip 1.0; loss: cross-entropy on the labels, or with ``distill`` = T the KL divergence to the
        fp32 model's logits at temperature T (times T^2, Hinton et al.)."""
        params = [q for q in (model.parameters() if params is None else params) if q.requires_grad]
        torch.manual_seed(self.args.seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        teacher = self.teacher() if distill else None
        order, losses, rng = [], [], random.Random(self.args.seed)
        model.train()
        for step in range(steps):
            if not order:
                order = list(range(len(self.train)))
                rng.shuffle(order)
            i = order.pop()
            b = self.train[i]
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            if distill:
                t = distill
                loss = nn.functional.kl_div(nn.functional.log_softmax(logits / t, -1),
                                            nn.functional.log_softmax(teacher[i] / t, -1),
                                            log_target=True, reduction="batchmean") * t * t
            else:
                loss = nn.functional.cross_entropy(logits, b["labels"])
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if (step + 1) % 20 == 0 or step + 1 == steps:
                log.info("%s step %d/%d loss %.4f", tag, step + 1, steps, sum(losses[-20:]) / len(losses[-20:]))
        model.eval()
        return losses

    def ipq_(self, model: nn.Module, tag: str, staged: bool = IPQ_STAGED, distill=IPQ_DISTILL,
             train_all: bool = IPQ_TRAIN_ALL, steps=None, lr=None, groups=None) -> dict:
        """iPQ of ``model`` in place through ``quantnoise.compress_`` (IPQ_GROUPS: FFN and embeddings in
        blocks of 8, attention in blocks of 4, 256 centroids), then ``ipq_steps`` of fine-tuning: after each
        stage (``staged``, the steps split evenly) or once after all.  ``train_all``: the centroids and
        every parameter iPQ leaves (LayerNorms, biases, pooler, head); else the centroids only."""
        c = self.cfg
        steps = c["ipq_steps"] if steps is None else steps
        lr = c["ipq_lr"] if lr is None else lr
        rules = [LayerRule(pattern=pat, scheme="pq", block_size=bs, n_centroids=IPQ_K, kmeans_iters=c["kmeans_iters"])
                 for g, pat, bs in IPQ_GROUPS if groups is None or g in groups]
        unquantize_(model)  # a noise fine-tune ends here: every row gets the same iPQ of plain layers
        phases = [[r] for r in rules] if staged else [rules]
        t_km, n, losses = 0.0, 0, []
        for i, phase in enumerate(phases):
            t = time.time()
            n += len(compress_(model, IPQPlan(stages=phase, seed=self.args.seed)))
            t_km += time.time() - t
            k = steps // len(phases) + (1 if i < steps % len(phases) else 0)
            params = None if train_all else [q for name, q in model.named_parameters() if name.endswith(".centroids")]
            if k:
                losses += self.train_steps_(model, k, lr, f"{tag} iPQ {i + 1}/{len(phases)}", params, distill)
        return {"layers": n, "kmeans_seconds": round(t_km, 1), "ipq_steps": steps, "ipq_lr": lr, "staged": staged,
                "distill_T": distill, "train_all": train_all, "last_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)}

    def noise_(self, model: nn.Module, kind: str, p: float) -> None:
        """Quant-Noise on the iPQ layers in place, with iPQ's block sizes (``kind``: drop | pq, on every iPQ
        group, or drop_G | pq_G: on the IPQ_GROUPS group G only, e.g. pq_ffn; pq noise's codebooks are k-means
        of the current weights, refreshed every 50 training forwards)."""
        scheme, _, only = kind.partition("_")
        if only and only not in [g for g, _, _ in IPQ_GROUPS]:
            raise ValueError(f"noise kind {kind!r}: the group after '_' must be one of "
                             f"{', '.join(g for g, _, _ in IPQ_GROUPS)} (e.g. pq_ffn), or none (pq: every iPQ layer)")
        for g, pat, bs in IPQ_GROUPS:
            if not only or g == only:
                quantize_(model, QuantNoiseConfig(scheme=scheme, p=p, block_size=bs, n_centroids=IPQ_K, include=pat,
                                                  kmeans_iters=self.cfg["kmeans_iters"], refresh_every=50,
                                                  seed=self.args.seed))

    def dev_acc(self, model: nn.Module) -> float:
        return hf.accuracy(hf.predict(model, self.dev)[0], self.ydev)

    def ipq_row(self, name: str, kind=None, p: float = 0.0) -> dict:
        """The fp32 model continued ``cont_steps`` (plainly, or with ``kind`` noise at rate ``p``), DEV, then
        iPQ + fine-tuning, exported to ckpt/NAME.qnz; DEV accuracy of the model read back from the file."""
        self.wait_for(["fp32"])
        c = self.cfg
        model = copy.deepcopy(self.fp32())
        if kind:
            self.noise_(model, kind, p)
        self.train_steps_(model, c["cont_steps"], c["cont_lr"], f"{name} {'noise' if kind else 'plain'} continuation")
        res = {"noise": kind, "p": p, "cont_steps": c["cont_steps"], "cont_lr": c["cont_lr"],
               "cont_dev_acc": self.dev_acc(model), **self.fp32_info()}
        res.update(self.ipq_(model, name))
        path = self.out / "ckpt" / f"{name}.qnz"
        res["bytes"] = qnz_bytes(model, path)
        res["dev_acc"] = self.dev_acc(self.from_qnz(path))
        int8 = self.out / "ckpt" / f"{name}_int8.qnz"  # the same codes, int8 centroids: the iPQ + int8 row
        save_state_dict(int8, model.state_dict(), ExportOptions(rest_dtype="float32", centroids_dtype="int8"))
        return res

    def from_qnz(self, path) -> nn.Module:
        model = self.new_model()
        model.load_state_dict(load_state_dict(path))
        return model.eval()

    def test_from_qnz(self, name: str, path) -> dict:
        res = self.score(name, self.from_qnz(path), path.stat().st_size)
        res["file"] = path.name
        return res

    def run_ipq_posthoc(self) -> dict:
        res = self.ipq_row("ipq_posthoc")
        res.update(self.test_from_qnz("ipq_posthoc", self.out / "ckpt" / "ipq_posthoc.qnz"))
        res["note"] = (f"fp32 + {res['cont_steps']} plain steps, iPQ {res['layers']} layers "
                       f"({'staged' if res['staged'] else 'all at once'}) + {res['ipq_steps']} fine-tune steps")
        return res

    def run_ipq_candidate(self, kind: str, p: float) -> dict:
        return self.ipq_row(candidate_name(kind, p), kind, p)  # DEV only: the choice of ipq_qn

    def seed_stage(self, seed: int, name: str) -> dict:
        """Stage ``name`` of seed ``seed`` (OUTDIR/seeds/SEED/stages/NAME.json); SystemExit naming it when missing."""
        path = self.seed_dir(seed) / "stages" / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"error: seed {seed}'s stage {name} is not done ({path}): run the recipe without --stages "
                             f"(it runs the other seeds first), or pass --seeds 1")
        return json.loads(path.read_text())

    def run_ipq_qn(self) -> dict:
        """The noise candidate best on DEV by the mean over the seeds (each seed's candidates: its own fp32 model,
        continuation, noise masks and iPQ), its .qnz of every seed scored on TEST (``seeds``)."""
        names = [candidate_name(k, p) for k, p in self.cfg["qn_candidates"]]
        self.wait_for(names)  # this seed's: this process or another job; the other seeds' ran before
        cands = {s: {n: self.seed_stage(s, n) for n in names} for s in self.seeds}
        mean = {n: statistics.fmean(cands[s][n]["dev_acc"] for s in self.seeds) for n in names}
        best = max(names, key=lambda n: mean[n])  # the first of equals: the order of qn_candidates
        res = dict(cands[self.args.seed][best])
        res.update(self.test_from_qnz("ipq_qn", self.out / "ckpt" / f"{best}.qnz"))
        res["chosen"] = best
        res["candidates"] = {n: {**{k: cands[self.args.seed][n][k] for k in ("noise", "p", "cont_dev_acc", "seconds")},
                                 "dev_acc": mean[n], "dev_acc_seeds": [cands[s][n]["dev_acc"] for s in self.seeds]}
                             for n in names}
        res["seeds"] = [{"seed": s, "dev_acc": cands[s][best]["dev_acc"], "fp32_id": cands[s][best].get("fp32_id"),
                         "acc": res["acc"] if s == self.args.seed else
                         hf.accuracy(hf.predict(self.from_qnz(self.seed_dir(s) / "ckpt" / f"{best}.qnz"), self.test)[0],
                                     self.yte)} for s in self.seeds]
        res["note"] = (f"fp32 + {res['cont_steps']} steps of {res['noise']} noise p={res['p']:g} (chosen on DEV"
                       f"{f', mean of {len(self.seeds)} seeds' if len(self.seeds) > 1 else ''}), then the iPQ of ipq_posthoc")
        return res

    def run_ipq_qn_int8(self) -> dict:
        self.wait_for(["ipq_qn"])
        chosen = json.loads((self.out / "stages" / "ipq_qn.json").read_text())["chosen"]
        path = self.out / "ckpt" / f"{chosen}_int8.qnz"
        res = self.test_from_qnz("ipq_qn_int8", path)
        res["dev_acc"] = self.dev_acc(self.from_qnz(path))
        res.update(chosen=chosen, note=f"ipq_qn ({chosen}) exported with int8 centroids (one scale per layer)")
        return res

    # ------------------------------------------- issue 34: task-agnostic noise distillation of the encoder
    def need(self, names) -> None:
        """Wait for the distillation stages ``names``; ValueError naming them when this run (with --stages, not a
        job of a full run) neither lists them nor finds them done."""
        missing = [n for n in names if not (self.out / "stages" / f"{n}.json").exists()]
        if self.args.stages and not self.args.child and any(n not in self.args.stages for n in missing):
            raise ValueError(f"stage(s) {','.join(missing)} not done: add them to --stages (or run without --stages)")
        self.wait_for(names)

    def corpus(self) -> dict:
        """The unlabelled sentences (``encoder.corpus_lines``: --text FILE or the size's make_corpus.py corpus), split
        by ``encoder.split_lines``: distillation batches (the size's batch and max_len, in a seeded order), DEV and TEST
        batches of held-out sentences.  Built once per process."""
        if self._corpus is None:
            c = self.cfg
            lines = encoder.corpus_lines(c["enc_text"], c["enc_corpus"])
            tr, dev, te = encoder.split_lines(lines, c["enc_eval_lines"])
            self._corpus = {"train": hf.batches(self.tok, tr, None, c["batch"], c["max_len"], seed=self.args.seed),
                            "dev": hf.batches(self.tok, dev, None, 64, c["max_len"]),
                            "test": hf.batches(self.tok, te, None, 64, c["max_len"]), "lines": [len(tr), len(dev), len(te)]}
            log.info("encoder distillation text: %s, %d distillation / %d DEV / %d TEST sentences",
                     c["enc_text"] or f"make_corpus.py {c['enc_corpus']}", *self._corpus["lines"])
        return self._corpus

    def teacher_encoder(self) -> nn.Module:
        """The frozen fp32 pretrained all-MiniLM-L6-v2 (eval mode): the distillation's teacher, the embeddings' reference."""
        if self._teacher_enc is None:
            self._teacher_enc = hf.load_encoder().eval().requires_grad_(False)
        return self._teacher_enc

    def enc_cos(self, model: nn.Module, split: str) -> float:
        """Mean cosine of ``model``'s mean-pooled embeddings of the held-out ``split`` (dev | test) sentences to the
        fp32 pretrained encoder's."""
        if split not in self._ref_emb:
            self._ref_emb[split] = encoder.sentence_embeddings(self.teacher_encoder(), self.corpus()[split])
        return round(hf.cosine(encoder.sentence_embeddings(model, self.corpus()[split]), self._ref_emb[split]), 5)

    def enc_ipq(self, model: nn.Module, only=None) -> nn.Module:
        """Post-hoc iPQ of an encoder (no fine-tuning): IPQ_GROUPS (or the groups ``only``), IPQ_K centroids."""
        return encoder.ipq_copy(model, IPQ_GROUPS, IPQ_K, self.cfg["kmeans_iters"], self.args.seed, only)

    def enc_settings(self) -> dict:
        c = self.cfg
        return {"steps": c["enc_steps"], "lr": c["enc_lr"], "distill": c["enc_distill"],
                "text": c["enc_text"] or c["enc_corpus"]}

    def stale_encoder_stage(self, name: str, res: dict) -> bool:
        """For a finished issue-34 stage: ValueError when it was made with other distillation settings than this run's
        (the stage names hold only the noise kind and rate); True (redo it) for the choice stages ipq_qn_encoder and
        enc_sentence when they chose among other candidates (another --encoder-noise-p / -kind in the same OUTDIR)."""
        if name not in encoder_stages(self.cfg):
            return False
        now, old = self.enc_settings(), res.get("enc_settings", {})
        diff = {k: (old.get(k), v) for k, v in now.items() if old.get(k) != v}
        if diff:
            k, (old, new) = next(iter(diff.items()))
            raise ValueError(f"stage {name} in {self.out / 'stages'} was made with encoder distillation {k}={old!r}, "
                             f"this run asks {k}={new!r}: use another OUTDIR, or delete its stages/enc_*.json, "
                             f"stages/{ENCODER_ROWS[0]}.json and stages/{ENCODER_ROWS[1]}.json")
        return name in ("ipq_qn_encoder", ENC_SENTENCE) and res.get("candidates_run") != enc_candidates(self.cfg)

    def load_encoder_ckpt(self, name: str) -> nn.Module:
        enc = hf.load_encoder()
        enc.load_state_dict(torch.load(self.out / "ckpt" / f"{name}.pt", weights_only=True))
        return enc.eval()

    def run_encoder(self, kind: Optional[str] = None, p: float = 0.0) -> dict:
        """The pretrained encoder distilled ``enc_steps`` towards its frozen self (``encoder.distill_encoder_``) with
        ``kind`` Quant-Noise at rate ``p`` on the iPQ layers (iPQ's block sizes; ``noise_``), or without (kind None:
        the control, equal compute); saved to ckpt/NAME.pt (plain layers); the cosine of its sentence embeddings
        to the fp32 encoder's on the DEV sentences, as it is and after post-hoc iPQ (the choice of the rate)."""
        name = ENC_PLAIN if kind is None else enc_candidate_name(kind, p)
        c, data = self.cfg, self.corpus()
        student = hf.load_encoder()
        if kind:
            self.noise_(student, kind, p)
        t, cpu = time.time(), time.process_time()
        losses = encoder.distill_encoder_(student, self.teacher_encoder(), data["train"], c["enc_steps"], c["enc_lr"],
                                          self.args.seed, c["enc_distill"], tag=f"[{name}] distillation")
        secs, cpu = time.time() - t, time.process_time() - cpu
        unquantize_(student)
        state = student.state_dict()
        atomic_write(str(self.out / "ckpt" / f"{name}.pt"), lambda tmp: torch.save(state, tmp))
        tail = losses[-20:]
        return {**self.enc_settings(), "steps_run": len(losses), "noise": kind, "p": p, "seed": self.args.seed,
                "lines": data["lines"],
                "encoder_id": weights_id(state), "distill_seconds": round(secs, 1), "distill_cpu_seconds": round(cpu, 1),
                "cpu_s_per_step": round(cpu / max(1, c["enc_steps"]), 4), "first_loss": round(losses[0], 6),
                "last_loss": round(sum(tail) / len(tail), 6), "dev_cos": self.enc_cos(student, "dev"),
                "dev_cos_ipq": self.enc_cos(self.enc_ipq(student), "dev")}

    def run_enc_plain(self) -> dict:
        return self.run_encoder()

    def chosen_encoder(self) -> str:
        """The noise distillation whose sentence embeddings after post-hoc iPQ are closest to the fp32 encoder's on
        the DEV sentences (this seed's candidates; the first of equals); never TEST."""
        names = enc_candidates(self.cfg)
        self.need(names)
        dev = {n: json.loads((self.out / "stages" / f"{n}.json").read_text())["dev_cos_ipq"] for n in names}
        return max(names, key=lambda n: dev[n])

    def encoder_row(self, name: str, enc: str) -> dict:
        """The recipe's task fine-tune from the distilled encoder ``enc`` (ckpt/ENC.pt; the head initialized as the
        fp32 row's, same batches), its DEV accuracy, then ``ipq_`` (the iPQ of every row: staged, centroids and the
        rest fine-tuned with the fp32 model's logits as the teacher), exported to ckpt/NAME.qnz; DEV and TEST from it."""
        self.need([enc])
        self.wait_for(["fp32"])
        model = self.new_model()
        model.bert.load_state_dict(torch.load(self.out / "ckpt" / f"{enc}.pt", weights_only=True))
        self.finetune(model, name)
        info = json.loads((self.out / "stages" / f"{enc}.json").read_text())
        res = {"encoder": enc, "noise": info["noise"], "p": info["p"], "encoder_id": info["encoder_id"],
               "enc_steps": info["steps"], "enc_distill": info["distill"], "ft_dev_acc": self.dev_acc(model),
               **self.fp32_info()}
        res.update(self.ipq_(model, name))
        path = self.out / "ckpt" / f"{name}.qnz"
        qnz_bytes(model, path)
        res["dev_acc"] = self.dev_acc(self.from_qnz(path))
        res.update(self.test_from_qnz(name, path))
        return res

    def run_ipq_posthoc_encoder(self) -> dict:
        res = self.encoder_row("ipq_posthoc_encoder", ENC_PLAIN)
        res["note"] = (f"encoder distilled {res['enc_steps']} steps without noise (the control), task fine-tune, "
                       f"iPQ {res['layers']} layers + {res['ipq_steps']} fine-tune steps")
        return res

    def run_ipq_qn_encoder(self) -> dict:
        chosen = self.chosen_encoder()
        res = self.encoder_row("ipq_qn_encoder", chosen)
        res["chosen"] = chosen
        res["candidates"] = {n: {k: json.loads((self.out / "stages" / f"{n}.json").read_text())[k]
                                 for k in ("p", "dev_cos", "dev_cos_ipq", "last_loss", "seconds")}
                             for n in enc_candidates(self.cfg)}
        res["note"] = (f"encoder distilled {res['enc_steps']} steps with {res['noise']} noise p={res['p']:g} (chosen on "
                       f"DEV sentences after iPQ), task fine-tune, the iPQ of ipq_posthoc_encoder")
        return res

    def run_enc_sentence(self) -> dict:
        """The sentence-embedding row, no task: for the pretrained encoder, the control and the chosen noise
        distillation, the cosine to the fp32 pretrained encoder's mean-pooled embeddings of the TEST sentences (held
        out of the distillation) as it is and after post-hoc iPQ, and on DEV after iPQ of each IPQ_GROUPS group alone
        (where the loss sits)."""
        chosen = self.chosen_encoder()
        self.need([ENC_PLAIN])
        out = {"chosen": chosen, "seed": self.args.seed, "lines": self.corpus()["lines"], "encoders": {}}
        for role, build in (("pretrained", hf.load_encoder), ("control", lambda: self.load_encoder_ckpt(ENC_PLAIN)),
                            ("noise", lambda: self.load_encoder_ckpt(chosen))):
            enc = build().eval()
            out["encoders"][role] = {"test_cos": self.enc_cos(enc, "test"), "test_cos_ipq": self.enc_cos(self.enc_ipq(enc), "test"),
                                     "dev_cos_ipq_group": {g: self.enc_cos(self.enc_ipq(enc, [g]), "dev")
                                                           for g, _, _ in IPQ_GROUPS}}
            log.info("[%s] %s: %s", ENC_SENTENCE, role, out["encoders"][role])
        return out

    def sentence_summary(self) -> dict:
        """``enc_sentence`` over the seeds: per encoder the TEST cosine before / after iPQ (mean with its 90 %
        interval), and the paired differences of the iPQ cosine noise - control and noise - pretrained."""
        per = {s: self.seed_stage(s, ENC_SENTENCE) for s in self.seeds}
        out = {"seeds": [{"seed": s, "chosen": per[s]["chosen"], **{r: per[s]["encoders"][r] for r in per[s]["encoders"]}}
                         for s in self.seeds], "lines": per[self.args.seed]["lines"]}
        for role in ("pretrained", "control", "noise"):
            out[role] = {k: interval([per[s]["encoders"][role][k] for s in self.seeds]) for k in ("test_cos", "test_cos_ipq")}
            out[role]["dev_cos_ipq_group"] = {g: statistics.fmean(per[s]["encoders"][role]["dev_cos_ipq_group"][g]
                                                                  for s in self.seeds) for g, _, _ in IPQ_GROUPS}
        for base in ("control", "pretrained"):
            d = [per[s]["encoders"]["noise"]["test_cos_ipq"] - per[s]["encoders"][base]["test_cos_ipq"] for s in self.seeds]
            iv = interval(d)
            out.setdefault("diff", {})[base] = {**iv, "seeds": d, "excludes_0": excludes_zero(iv)}
        return out

    def encoder_report(self, results: dict) -> str:
        """The issue-34 section of results.md: the two task rows, the candidates, and the sentence-embedding row."""
        fp, c, sent = results["fp32"], self.cfg, results["sentence_emb"]
        n = len(self.seeds)
        rows = ["## A task-agnostic Quant-Noise distillation of the encoder, then the task and iPQ (issue 34)", "",
                "| row | DEV acc before iPQ | DEV acc | test acc | iPQ loss vs fp32 (test) | bytes | fp32 .qnz / this | note |",
                "|---|---|---|---|---|---|---|---|",
                f"| fp32 | | {dev_of(fp):.4f} | {fmt_acc(fp)} | 0 | {fp['bytes']:,} | 1.0x | the pretrained encoder fine-tuned |"]
        for k in ENCODER_ROWS:
            r = results[k]
            ft = statistics.fmean(e["ft_dev_acc"] for e in r["seeds"]) if "seeds" in r else r["ft_dev_acc"]
            rows.append(f"| {k} | {ft:.4f} | {dev_of(r):.4f} | {fmt_acc(r)} | {fp32_base(results, k) - acc_of(r):+.4f} | "
                        f"{r['bytes']:,} | {fp['bytes'] / r['bytes']:.1f}x | {r['note']} |")
        q, ph = results["ipq_qn_encoder"], results["ipq_posthoc_encoder"]
        loss_ph, loss_qn = fp32_base(results, "ipq_posthoc_encoder") - acc_of(ph), fp32_base(results, "ipq_qn_encoder") - acc_of(q)
        cut = f"{100 * (1 - loss_qn / loss_ph):.0f} %" if loss_ph > 0 else "n/a (the control loses nothing)"
        cands = "; ".join(f"{name}: DEV cosine {v['dev_cos']:.4f} before iPQ, {v['dev_cos_ipq']:.4f} after"
                          for name, v in q["candidates"].items())
        text = "\n".join(rows) + (
            f"\n\nDistillation (seed {self.args.seed}; every seed distils its own): {c['enc_steps']} steps at lr "
            f"{c['enc_lr']:g}, batch {c['batch']}, max_len {c['max_len']}, MSE of the "
            f"{'last hidden state' if c['enc_distill'] == 'last' else 'hidden states of every layer'} to the frozen "
            f"pretrained encoder's, on {sent['lines'][0]} unlabelled sentences ({c['enc_text'] or 'make_corpus.py ' + c['enc_corpus']}; "
            f"{sent['lines'][1]} DEV / {sent['lines'][2]} TEST sentences held out). Noise {c['enc_kind']} on the iPQ "
            f"layers (iPQ's block sizes), the rate chosen on DEV sentences (cosine after post-hoc iPQ): {cands}; chosen "
            f"**{q['chosen']}**" + (f" (seed {self.args.seed}; per seed: {', '.join(e['chosen'] for e in sent['seeds'])})" if n > 1 else "")
            + f". Control: the same steps without noise. iPQ loss (fp32 minus iPQ, TEST"
            f"{f', means over {n} seeds' if n > 1 else ''}): ipq_posthoc_encoder {loss_ph:+.4f}, ipq_qn_encoder "
            f"{loss_qn:+.4f}: cut {cut}.")
        f = lambda iv: f"{iv['mean']:.4f}" + (f" [{iv['lo90']:.4f}, {iv['hi90']:.4f}]" if iv.get("lo90") is not None else "")  # noqa: E731
        srows = ["", f"### Sentence embeddings, no task: cosine to the fp32 pretrained encoder's on {sent['lines'][2]} "
                 f"held-out TEST sentences ({n} seed(s); iPQ post hoc: FFN / embeddings b=8, attention b=4, k={IPQ_K})", "",
                 "| encoder | cosine, fp32 | cosine after iPQ | DEV after iPQ of FFN / embeddings / attention alone |",
                 "|---|---|---|---|"]
        for role, what in (("pretrained", "pretrained (post hoc)"), ("control", "control (no-noise distillation)"),
                           ("noise", "noise-distilled")):
            e = sent[role]
            srows.append(f"| {what} | {f(e['test_cos'])} | {f(e['test_cos_ipq'])} | "
                         + " / ".join(f"{e['dev_cos_ipq_group'][g]:.4f}" for g, _, _ in IPQ_GROUPS) + " |")
        for base, d in sent["diff"].items():
            srows.append(f"\nnoise-distilled minus {base}, cosine after iPQ, per seed "
                         f"{', '.join(f'{x:+.4f}' for x in d['seeds'])}: mean {d['mean']:+.4f}"
                         + (f" [{d['lo90']:+.4f}, {d['hi90']:+.4f}], {'outside' if d['excludes_0'] else 'inside'} the "
                            f"seed spread" if d["lo90"] is not None else " (1 seed: no interval)"))
        return text + "\n\n" + "\n".join(srows[1:])

    def encoder_partial_report(self) -> None:
        """A --stages run of issue 34's stages (not a job): once fp32, the two encoder rows and enc_sentence are done
        for every seed of --seeds (each seed's own --stages run in OUTDIR/seeds/S), OUTDIR/results_encoder.md: their
        section of results.md with the seeds' intervals and paired differences."""
        names, rows = ["fp32"] + ENCODER_ROWS + [ENC_SENTENCE], ["fp32"] + ENCODER_ROWS
        if (self.args.child or not set(self.args.stages) & set(encoder_stages(self.cfg))
                or not all((self.seed_dir(s) / "stages" / f"{n}.json").exists() for s in self.seeds for n in names)):
            return
        done = {n: json.loads((self.out / "stages" / f"{n}.json").read_text()) for n in rows}
        self.add_seeds(done, rows)
        done["sentence_emb"] = self.sentence_summary()
        text = (self.encoder_report(done) + "\n\n" + self.seeds_report(done, rows)
                + f"\n\nThis invocation (--stages {','.join(self.args.stages)}): {self.usage()}\n")
        atomic_write(str(self.out / "results_encoder.md"), lambda tmp: pathlib.Path(tmp).write_text(text))
        write_json(self.out / "results_encoder.json", done)
        log.info("wrote %s", self.out / "results_encoder.md")

    def run_pretrained_cosine(self) -> dict:
        """The sentence-embedding use of all-MiniLM-L6-v2 (no fine-tuning): cosine of each post-training
        scheme's mean-pooled embeddings to the fp32 encoder's, on the TEST sentences."""
        enc = hf.load_encoder().eval()

        def emb(model):
            with torch.no_grad():
                out = [hf.mean_pool(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
                                    b["attention_mask"]) for b in self.test]
            return torch.cat(out)[torch.cat([b["index"] for b in self.test]).argsort()]

        def run(model, b):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        ref = emb(enc)
        calib = self.train[: self.cfg["calib_batches"]]
        return {"dq": hf.cosine(emb(ptq.dynamic_int8(enc)), ref),
                "ptq_int8_minmax": hf.cosine(emb(ptq.static_int8(enc, calib, run, q8bert())), ref),
                "ptq_int8_act_per_token": hf.cosine(emb(ptq.static_int8(enc, calib, run, q8bert(act_granularity="token"))), ref),
                "int8_weights_only": hf.cosine(emb(compressed(enc, 8)), ref),
                "int4_weights_only": hf.cosine(emb(compressed(enc, 4)), ref)}

    def add_seeds(self, results: dict, rows: Sequence[str] = tuple(SEEDED_ROWS)) -> None:
        """SEEDED_ROWS' ``seeds`` (seed, TEST and DEV accuracy, fp32 identity of each seed's stage), ``acc`` (the mean
        and 90 % interval over the seeds) and ``diff`` (PAIRS' paired differences), in place."""
        per = {}
        for row in rows:
            if row == "ipq_qn":  # chosen over the seeds and scored in its own stage
                per[row] = {e["seed"]: e for e in results[row]["seeds"]}
            else:
                per[row] = {s: results[row] if s == self.args.seed else self.seed_stage(s, row) for s in self.seeds}
        summary = seed_summary({row: {s: e["acc"] for s, e in v.items()} for row, v in per.items()}, self.seeds)
        for row, v in per.items():
            r = results[row]
            r["seeds"] = [{"seed": s, "acc": v[s]["acc"], "dev_acc": v[s].get("dev_acc"), "fp32_id": v[s].get("fp32_id"),
                           **{k: v[s][k] for k in ("ft_dev_acc", "chosen", "encoder_id") if row in ENCODER_ROWS and k in v[s]}}
                          for s in self.seeds]
            r["acc"] = summary[row]["acc"]
            if "diff" in summary[row]:
                r["diff"] = summary[row]["diff"]

    def report(self, results: dict, cos: dict) -> None:
        self.add_seeds(results)
        ref = torch.load(self.out / "ckpt" / "fp32_test_emb.pt", weights_only=True)
        for name, r in results.items():
            base = fp32_base(results, name)
            r["rel_err"] = round((base - acc_of(r)) / base, 5) if base else None
            emb = torch.load(self.out / "ckpt" / f"{name}_test_emb.pt", weights_only=True)
            r["cos"] = round(hf.cosine(emb, ref), 5)
        results["sentence_emb"] = self.sentence_summary()  # no task: no accuracy, bytes or TEST-text cosine
        write_json(self.out / "results.json", results)
        seeded = len(self.seeds) > 1
        rows = [f"| scheme | test acc{' [90% interval over seeds]' if seeded else ''} | rel. error vs fp32 | bytes | "
                "avg bits/param | emb. cosine to fp32 | note |", "|---|---|---|---|---|---|---|"]
        for k in ORDER:
            r = results[k]
            rows.append(f"| {k} | {fmt_acc(r)} | {100 * r['rel_err']:+.2f}% | {r['bytes']:,} | {r['avg_bits']:.2f} | "
                        f"{r['cos']:.4f} | {r.get('note', '')} |")
        q = results["qbert_mixed"]
        qbert = (f"\n\nqbert_mixed: Hessian sensitivity on {q['sens_batches']} TRAIN batches in {q['sens_seconds']} s "
                 f"(OUTDIR/sensitivity.txt); most sensitive: "
                 + ", ".join(f"{n} {v:g}" for n, v in q["most_sensitive"]) + f"; plan at {q['plan_avg_bits']} bits "
                 f"({'identical to uniform int4' if q['uniform_int4'] else 'mixed'}), "
                 f"{q['bytes'] - results['int4_posthoc']['bytes']:+,} bytes vs int4_posthoc")
        sp = results["dq"].get("speed", {})
        speed = "; ".join(f"{k}: fp32 {v['fp32_s']} s, DQ {v['dq_s']} s, speed-up {v['speedup']}x" for k, v in sp.items())
        a = self.args
        secs = {k: r.get("seconds") for k, r in results.items() if k != "sentence_emb"}
        secs.update({n: c["seconds"] for n, c in results["ipq_qn"]["candidates"].items()})
        text = (f"# Q8BERT table: all-MiniLM-L6-v2, size={a.size}\n\n"
                f"`recipes/bert/run.sh {a.train} {a.dev} {a.test} {a.outdir} --size {a.size} --jobs {a.jobs} "
                f"--threads {a.threads} --seed {a.seed} --seeds {len(self.seeds)}`\n\n"
                f"{len(self.labels)} labels; {sum(len(b['index']) for b in self.train)} train / {len(self.ydev)} dev / "
                f"{len(self.yte)} test lines ({self.truncated} train texts truncated to {self.cfg['max_len']} tokens); "
                f"budget {self.cfg}; host {platform.node()}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
                f"stage seconds {secs}\n\n" + "\n".join(rows) + qbert +
                "\n\nSentence embeddings of the pretrained all-MiniLM-L6-v2 (no fine-tuning), mean cosine to fp32 on the TEST "
                f"sentences: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items() if k != "seconds") +
                f"\n\nDQ forward time on {min(len(self.test), self.cfg['speed_batches'])} test batches (best of 3, "
                f"interleaved): {speed}\n\n" + self.ipq_report(results) + "\n\n" + self.qbert3_report(results) +
                "\n\n" + self.encoder_report(results) + "\n\n" + self.seeds_report(results) +
                f"\n\nThis invocation: {self.usage()}\n")
        atomic_write(str(self.out / "results.md"), lambda tmp: pathlib.Path(tmp).write_text(text))
        plot_quality_vs_size(results, self.out / "quality_vs_size.png",
                             f"all-MiniLM-L6-v2, size={a.size}: TEST accuracy vs file bytes ({len(self.yte)} TEST lines)")

    def seeds_report(self, results: dict, seeded: Sequence[str] = tuple(SEEDED_ROWS)) -> str:
        """The seeds section of results.md: SEEDED_ROWS' accuracy per seed with the mean and 90 % interval, and
        PAIRS' paired differences, each said to be outside the seed spread (its interval excludes 0) or not."""
        n = len(self.seeds)
        f = lambda v: "" if v is None else f"{v:+.4f}"  # noqa: E731
        rows = [f"## Seeds: {', '.join(seeded)} over {n} seed(s) ({', '.join(map(str, self.seeds))})", "",
                "Each seed reruns every random choice of these rows (the fp32 fine-tune's head init and data order, "
                "the continuations' order, k-means, the noise masks, the ~3-bit plan's sensitivity lines); seed "
                f"{self.args.seed} is in OUTDIR, the others in OUTDIR/seeds/SEED/. The other rows are of seed "
                f"{self.args.seed} only.", "",
                "| row | TEST acc per seed | mean | 90% interval |", "|---|---|---|---|"]
        for k in seeded:
            r = results[k]
            iv = r["acc"]
            rows.append(f"| {k} | {', '.join('%.4f' % e['acc'] for e in r['seeds'])} | {iv['mean']:.4f} | "
                        + (f"[{iv['lo90']:.4f}, {iv['hi90']:.4f}] |" if iv["lo90"] is not None else "n/a (1 seed) |"))
        rows += ["", "| row | minus | difference per seed | mean | 90% interval | outside the seed spread? |",
                 "|---|---|---|---|---|---|"]
        for row, base in [(r, b) for r, b in PAIRS if r in seeded and b in seeded]:
            d = results[row]["diff"][base]
            out = {True: "**yes** (the interval excludes 0)", False: "no (the interval contains 0)",
                   None: "n/a (1 seed: no interval)"}[d["excludes_0"]]
            rows.append(f"| {row} | {base} | {', '.join(f(x) for x in d['seeds'])} | {f(d['mean'])} | "
                        + (f"[{f(d['lo90'])}, {f(d['hi90'])}]" if d["lo90"] is not None else "n/a") + f" | {out} |")
        return "\n".join(rows) + (
            "\n\nIntervals: mean ± t(0.95, n-1) · sd / √n over the n seeds (Student's t, 90 %; "
            "`benchmarks.harness.interval`); a difference is paired, the interval of the per-seed differences "
            "(the same seed: the same fp32 model, data order, k-means and noise seeds, only the method differs), and "
            "it is outside the seed spread when that interval excludes 0. The noise candidate of ipq_qn is chosen by "
            "its mean DEV accuracy over the seeds.")

    def ipq_report(self, results: dict) -> str:
        """The iPQ table: TEST accuracy of each row read back from its .qnz, bytes, ratio to fp32's .qnz."""
        fp, c = results["fp32"], self.cfg
        rows = ["## iPQ (Quant-Noise's extreme compression): every row's .qnz read back and scored on TEST", "",
                "| row | DEV acc | test acc | iPQ loss vs fp32 (test) | bytes | fp32 .qnz / this | note |",
                "|---|---|---|---|---|---|---|",
                f"| fp32 | {dev_of(fp):.4f} | {fmt_acc(fp)} | 0 | {fp['bytes']:,} | 1.0x | |"]
        for k in IPQ_ROWS:
            r = results[k]
            rows.append(f"| {k} | {dev_of(r):.4f} | {fmt_acc(r)} | {fp32_base(results, k) - acc_of(r):+.4f} | "
                        f"{r['bytes']:,} | {fp['bytes'] / r['bytes']:.1f}x | {r['note']} |")
        q, ph = results["ipq_qn"], results["ipq_posthoc"]
        n = len(q.get("seeds", [])) or 1
        cands = "; ".join(f"{n}: DEV {v['dev_acc']:.4f} after iPQ ({v['cont_dev_acc']:.4f} before)"
                          for n, v in q["candidates"].items())
        loss_ph, loss_qn = fp32_base(results, "ipq_posthoc") - acc_of(ph), fp32_base(results, "ipq_qn") - acc_of(q)
        cut = f"{100 * (1 - loss_qn / loss_ph):.0f} %" if loss_ph > 0 else "n/a (ipq_posthoc loses nothing)"
        return "\n".join(rows) + (
            f"\n\nNoise candidates (from the fp32 model, {c['cont_steps']} steps at lr {c['cont_lr']:g}; "
            f"chosen on DEV after the same iPQ{f', by the mean over {n} seeds' if n > 1 else ''}; before iPQ: seed "
            f"{self.args.seed}): {cands}; chosen **{q['chosen']}**. ipq_posthoc: the same "
            f"{c['cont_steps']} steps without noise (equal compute; DEV {ph['cont_dev_acc']:.4f} before iPQ).\n\n"
            f"iPQ of every row alike: {ph['layers']} layers (FFN and word / position embeddings in blocks of 8, "
            f"attention in blocks of 4, {IPQ_K} centroids, k-means {c['kmeans_iters']} iterations), "
            f"{'in stages FFN -> embeddings -> attention, each followed by' if ph['staged'] else 'all at once, then'} "
            f"fine-tuning ({c['ipq_steps']} steps in all, lr {c['ipq_lr']:g}, "
            f"{'the centroids and every other parameter' if ph['train_all'] else 'the centroids only'}, "
            + (f"distillation from the fp32 model at T={ph['distill_T']:g}" if ph["distill_T"] else "the labels")
            + f"). iPQ loss (fp32 minus iPQ, TEST{f', means over {n} seeds' if n > 1 else ''}): ipq_posthoc "
            f"{loss_ph:+.4f}, ipq_qn {loss_qn:+.4f}: cut {cut}.")

    def usage(self) -> str:
        """Wall and CPU seconds of this invocation (this process and its jobs) and the load average."""
        cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return (f"{time.time() - self.t0:.0f} s wall, {cpu:.0f} CPU s (all processes), 1-min load average "
                f"{self.load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")

    def spawn(self) -> None:
        """Run the unfinished stages in ``--jobs`` child processes (this script with ``--stages``), each
        on ``--threads`` threads; wait for all.  SystemExit when one fails."""
        a, done = self.args, lambda n: (self.out / "stages" / f"{n}.json").exists()
        groups = [g for g in job_groups(a.jobs, self.cfg) if not all(done(n) for n in g)]
        if a.jobs <= 1 or not groups:
            return
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        procs = []
        for g in groups:
            log.info("job %d: stages %s (%d thread(s))", len(procs), ",".join(g), a.threads)
            procs.append(subprocess.Popen(self.child_command(a.outdir, a.seed, len(self.seeds), g), env=env))
        failed = [i for i, p in enumerate(procs) if p.wait() != 0]
        if failed:
            raise SystemExit(f"error: job(s) {failed} failed (see {self.out / 'log.txt'}); rerun the same command to resume")

    def child_command(self, outdir, seed: int, seeds: int, stages: List[str]) -> List[str]:
        """This script on ``stages`` of seed ``seed`` in ``outdir``, in one process (a job of ``spawn`` or a seed)."""
        a = self.args
        cmd = [sys.executable, os.path.abspath(__file__), a.train, a.dev, a.test, str(outdir), "--size", a.size,
               "--seed", str(seed), "--seeds", str(seeds), "--threads", str(a.threads), "--jobs", "1"]
        cmd += [v for k in ("epochs", "lr") if getattr(a, k) is not None for v in (f"--{k}", str(getattr(a, k)))]
        for k in ("encoder_noise_steps", "encoder_noise_kind", "encoder_distill", "text"):
            if getattr(a, k, None) is not None:
                cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
        if getattr(a, "encoder_noise_p", None) is not None:
            cmd += ["--encoder-noise-p", ",".join(f"{p:g}" for p in a.encoder_noise_p)]
        return cmd + ["--stages", ",".join(stages), "--child"]

    def run_seeds(self) -> None:
        """The other seeds' stages (``seed_stages``), each seed in OUTDIR/seeds/SEED/ with ``--seed SEED``: up to
        ``--jobs`` seeds at a time, one process of ``--threads`` threads each (``--jobs 1``: in this process, in
        order).  Before this seed's stages, so that ipq_qn can choose by the mean over every seed.  SystemExit when
        one fails."""
        a, stages = self.args, seed_stages(self.cfg)
        todo = [s for s in self.seeds if s != a.seed
                and not all((self.seed_dir(s) / "stages" / f"{n}.json").exists() for n in stages)]
        if not todo:
            return
        if a.jobs <= 1:
            for s in todo:
                log.info("seed %d: stages %s in %s", s, ",".join(stages), self.seed_dir(s))
                Run(argparse.Namespace(**{**vars(a), "seed": s, "seeds": 1, "outdir": str(self.seed_dir(s)),
                                          "stages": stages, "child": True})).main()
            return
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
        for i in range(0, len(todo), a.jobs):
            procs = []
            for s in todo[i:i + a.jobs]:
                log.info("seed %d: stages %s in %s (one process, %d thread(s))", s, ",".join(stages),
                         self.seed_dir(s), a.threads)
                procs.append((s, subprocess.Popen(self.child_command(self.seed_dir(s), s, 1, stages), env=env)))
            failed = [s for s, p in procs if p.wait() != 0]
            if failed:
                raise SystemExit(f"error: seed(s) {failed} failed (see {self.seed_dir(failed[0]) / 'log.txt'}); rerun the "
                                 f"same command to resume")

    def drop_stale_choice(self) -> None:
        """ipq_qn (and its int8 export) chosen over other seeds than this run's: removed, so that they are redone."""
        path = self.out / "stages" / "ipq_qn.json"
        if path.exists() and [e["seed"] for e in json.loads(path.read_text()).get("seeds", [])] != self.seeds:
            log.info("ipq_qn was chosen over other seeds than %s: redoing ipq_qn and ipq_qn_int8", self.seeds)
            for n in ("ipq_qn", "ipq_qn_int8"):
                (self.out / "stages" / f"{n}.json").unlink(missing_ok=True)

    def main(self) -> dict:
        results, self.t0, self.load0 = {}, time.time(), os.getloadavg()[0]
        if not self.args.child and (not self.args.stages or "ipq_qn" in self.args.stages):
            self.drop_stale_choice()
        if not self.args.stages:
            self.run_seeds()
            self.spawn()
        for name in self.args.stages or (STAGES + ["pretrained_cosine"] + ipq_stages(self.cfg) + QBERT3_STAGES
                                         + encoder_stages(self.cfg)):
            results[name] = self.stage(name, self.runner(name))
        if self.args.stages:  # a partial run (e.g. stages in parallel processes): the report comes with a full one
            if not self.args.child and all((self.out / "stages" / f"{n}.json").exists() for n in ["fp32"] + IPQ_ROWS):
                done = {n: json.loads((self.out / "stages" / f"{n}.json").read_text()) for n in ["fp32"] + IPQ_ROWS}
                text = self.ipq_report(done) + f"\n\nThis invocation (--stages {','.join(self.args.stages)}): {self.usage()}\n"
                atomic_write(str(self.out / "results_ipq.md"), lambda tmp: pathlib.Path(tmp).write_text(text))
                log.info("wrote %s", self.out / "results_ipq.md")
            if (not self.args.child and set(self.args.stages) & set(QBERT3_STAGES)
                    and all((self.out / "stages" / f"{n}.json").exists() for n in ["fp32"] + QBERT3_STAGES)):
                done = {n: json.loads((self.out / "stages" / f"{n}.json").read_text()) for n in ["fp32"] + QBERT3_ROWS}
                text = self.qbert3_report(done) + f"\n\nThis invocation (--stages {','.join(self.args.stages)}): {self.usage()}\n"
                atomic_write(str(self.out / "results_qbert3.md"), lambda tmp: pathlib.Path(tmp).write_text(text))
                log.info("wrote %s", self.out / "results_qbert3.md")
            self.encoder_partial_report()
            return results
        cos = results.pop("pretrained_cosine")
        results.pop("qbert3_plan")  # the plans: in stages/qbert3_plan.json and the ~3-bit table
        for name in ipq_stages(self.cfg) + encoder_stages(self.cfg):
            if name not in IPQ_ROWS + ENCODER_ROWS:
                results.pop(name)  # a candidate (listed in ipq_qn / ipq_qn_encoder["candidates"]) or enc_sentence
        self.report(results, cos)
        log.info("wrote %s and %s; %s", self.out / "results.md", self.out / "results.json", self.usage())
        return results


def rates(text: str) -> Optional[List[float]]:
    """--encoder-noise-p: comma-separated distinct noise rates, each in (0, 1]; None when ``text`` is not that."""
    try:
        ps = [float(v) for v in text.split(",")]
    except ValueError:
        return None
    return ps if all(0.0 < p <= 1.0 for p in ps) and len(set(ps)) == len(ps) else None


def encoder_option_error(args) -> Optional[str]:
    """One line naming a bad --encoder-* / --text value and the fix, or None; --encoder-noise-p becomes its list."""
    if isinstance(args.encoder_noise_p, str):
        ps = rates(args.encoder_noise_p)
        if ps is None:
            return f"--encoder-noise-p {args.encoder_noise_p!r}: give distinct rates in (0, 1], comma-separated, e.g. 0.1,0.3,0.5"
        args.encoder_noise_p = ps
    if args.encoder_noise_steps is not None and args.encoder_noise_steps < 1:
        return f"--encoder-noise-steps {args.encoder_noise_steps}: must be >= 1 (the control gets the same steps)"
    if args.encoder_noise_kind is not None and args.encoder_noise_kind not in ("pq", "drop"):
        return f"--encoder-noise-kind {args.encoder_noise_kind!r}: choose pq (true pq noise) or drop"
    if args.encoder_distill is not None and args.encoder_distill not in encoder.DISTILL_LAYERS:
        return f"--encoder-distill {args.encoder_distill!r}: choose last (the last hidden state) or all (every layer's output)"
    if args.text is not None and not os.path.isfile(args.text):
        return f"--text {args.text!r} is not a file: pass a plain-text file, one sentence a line"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("dev")
    ap.add_argument("test")
    ap.add_argument("outdir")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=1, help="the first seed (its rows in OUTDIR; every row of the table)")
    ap.add_argument("--seeds", type=int, default=None,
                    help=f"seeds for {', '.join(SEEDED_ROWS)}: SEED .. SEED+N-1, the others in OUTDIR/seeds/S/ (default: "
                         f"the size's, " + ", ".join(f"{k} {v['seeds']}" for k, v in SIZES.items()) + ")")
    ap.add_argument("--epochs", type=int, default=None, help="override the size's fine-tune epochs")
    ap.add_argument("--lr", type=float, default=None, help="override the size's peak learning rate")
    ap.add_argument("--stages", type=lambda v: v.split(","), default=None,
                    help=f"comma-separated subset of {','.join(STAGES)},pretrained_cosine,{','.join(ipq_stages(SIZES['small']))},"
                         f"{','.join(QBERT3_STAGES)} "
                         f"(the candidates ipq_qn_KIND_P follow the size's qn_candidates) to run now, in this process "
                         f"(no report); stages after fp32 need fp32 done, except int8_qat and qn_int4")
    ap.add_argument("--jobs", type=int, default=2,
                    help="processes for a full run: the fp32 chain in one, the int8 QAT / Quant-Noise trainings in the "
                         "others (1: all stages in this process, in order)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1 per job is fastest on a shared 2-core machine)")
    ap.add_argument("--encoder-noise-steps", type=int, default=None, metavar="N",
                    help="steps of each encoder distillation, the noise candidates' and the control's (default: the "
                         "size's, " + ", ".join(f"{k} {v['enc_steps']}" for k, v in SIZES.items()) + ")")
    ap.add_argument("--encoder-noise-p", default=None, metavar="P[,P...]",
                    help="the noise rates of the encoder distillation, one stage each, the rate chosen on DEV sentences "
                         "(default: the size's, small " + ",".join(f"{p:g}" for p in SIZES["small"]["enc_ps"]) + ")")
    ap.add_argument("--encoder-noise-kind", default=None, metavar="pq|drop",
                    help="the encoder distillation's noise: pq (true pq noise, the default) or drop; on every iPQ layer")
    ap.add_argument("--encoder-distill", default=None, metavar="last|all",
                    help="distil the last hidden state (the default) or every layer's output")
    ap.add_argument("--text", default=None, metavar="FILE",
                    help="unlabelled sentences for the encoder distillation, one a line (default: make_corpus.py's "
                         "standard-library docstrings)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = encoder_option_error(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    if args.jobs < 1 or args.threads < 1:
        print(f"error: --jobs {args.jobs} / --threads {args.threads}: both must be >= 1", file=sys.stderr)
        return 2
    if args.seeds is None:
        args.seeds = SIZES[args.size]["seeds"]
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds}: must be >= 1 (1: the first seed only, no interval)", file=sys.stderr)
        return 2
    known = STAGES + ["pretrained_cosine"] + ipq_stages(SIZES[args.size]) + QBERT3_STAGES + encoder_stages(size_cfg(args.size, args))
    unknown = [n for n in args.stages or [] if n not in known]
    if unknown:
        print(f"error: unknown stage {unknown[0]!r}; choose from {','.join(known)}", file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    fmt = "%(asctime)s " + (f"(seed {args.seed} {args.stages[0]} job) " if args.child else "") + "%(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(os.path.join(args.outdir, "log.txt"))])
    try:
        with torch_threads(args.threads):  # restored after, whatever happens (the tests run main in process)
            results = Run(args).main()
        if not args.stages:  # a full run: its record, for the project's report (scripts/report.py)
            argv = sys.argv[1:] if argv is None else list(argv)
            path = write_record(RECORD, results, command=["recipes/bert/run.sh", *argv],
                                out=pathlib.Path(args.outdir) / "record.json", threads=args.threads)
            log.info("wrote %s", path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
