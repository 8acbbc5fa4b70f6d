"""The Q8BERT table for a small fairseq RoBERTa trained from scratch with stock ``fairseq-train --task
sentence_prediction`` and the plugin (``recipes/bert/run.sh ... --model roberta``; see README.md here).

    python recipes/bert/roberta.py TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size tiny|small] [--jobs 2]

Same input (``label<TAB>text``) and the same OUTDIR/results.json keys as table.py.  No pretrained
fairseq RoBERTa is available offline, so all three models (fp32, int8 QAT with the Q8BERT flags,
Quant-Noise int4) are trained from scratch with the same budget on word-level tokens (lowercased,
punctuation split off).  The steps run on lm_recipe's engine: each one records OUTDIR/steps/NAME.json
when done (a rerun skips it), fairseq's logs go to OUTDIR/logs/.  DEV picks the PTQ calibration; TEST
only scores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import shutil
import sys
import threading
import time
from argparse import Namespace
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes" / "lm"), str(ROOT / "recipes" / "bert")]

import torch  # noqa: E402

from lm_recipe import (THRESHOLD, USER_DIR, Recipe, atomic_write_text, candidate_flags, fingerprint,  # noqa: E402
                       noise_flags)
from quantnoise import hf, ptq  # noqa: E402
from quantnoise.presets import q8bert  # noqa: E402
from table import ORDER, PTQ_CANDIDATES, torch_save_bytes  # noqa: E402

HEAD = "sentence_classification_head"
SIZES = {  # the same budget for fp32, int8 QAT and Quant-Noise int4; texts cut to max_len - 2 words
    "tiny": dict(layers=1, dim=32, ffn=64, heads=2, max_len=16, batch=4, epochs=1, lr=1e-3, calib_batches=1,
                 cont_epochs=1, cont_lr=1e-3, ipq_epochs=1, ipq_lr=1e-3, candidates=["pq_p0.5"]),
    "small": dict(layers=2, dim=128, ffn=512, heads=4, max_len=64, batch=32, epochs=5, lr=5e-4, calib_batches=8,
                  cont_epochs=1, cont_lr=1e-4, ipq_epochs=2, ipq_lr=2e-4, candidates=["pq_p0.3", "pq_p0.5", "pq_p0.8"]),
}
TRAININGS = {"fp32": [], "int8_qat": noise_flags("q8bert"), "qn_int4": noise_flags("scalar_int4")}
# The iPQ rows (issue 23 A), as table.py's for MiniLM but through fairseq-train: the fp32 model continued
# cont_epochs without noise (ipq_posthoc: equal compute) or with each Quant-Noise candidate, then
# ``fairseq-train --ipq-plan`` (the paper's order and blocks: FFN b=8 -> embeddings b=8 -> attention b=4, 256
# centroids, each stage followed by a third of ipq_epochs of fine-tuning of the centroids and the rest on the labels;
# fairseq-train has no teacher, so no distillation here), exported to .qnz (fp32 rest, as the fp32 row);
# ipq_qn = the candidate best on DEV from its .qnz; ipq_qn_int8 = the same checkpoint with int8 centroids.
IPQ_STAGES = [("FFN", r"layers\.\d+\.fc[12]$", 8), ("embeddings", r"embed_tokens$|embed_positions$", 8),
              ("attention", r"layers\.\d+\.self_attn\.(q|k|v|out)_proj$", 4)]
IPQ_ROWS = ["ipq_posthoc", "ipq_qn", "ipq_qn_int8"]
WORD = re.compile(r"\w+|[^\w\s]")
DEV_ACC = re.compile(r"valid on 'valid' subset \|.*?\| accuracy ([0-9.]+)")


def words(text: str, max_len: int) -> str:
    """The model's input line: lowercased words and punctuation, at most max_len - 2 (<s> and </s> added)."""
    return " ".join(WORD.findall(text.lower())[: max_len - 2])


def route_attention(model) -> None:
    """fairseq's attention fast path reads q/k/v/out_proj.weight directly; make it call the modules (the plugin's
    ``route_attention``), so that calibration hooks, fake quantization and torch's int8 Linear see them."""
    from quantnoise.qn_fairseq.args import route_attention as route  # the plugin, under its one name

    route(model)


class RobertaRecipe(Recipe):
    def __init__(self, a):
        super().__init__(a.train, a.dev, a.test, a.outdir, a.size, a.jobs)
        self.args, self.load0 = a, os.getloadavg()[0]
        ytr, xtr = hf.read_tsv(a.train)
        self.labels = sorted(set(ytr))
        self.tsv = {"train": (ytr, xtr), "dev": hf.read_tsv(a.dev, self.labels), "test": hf.read_tsv(a.test, self.labels)}
        s = {**SIZES[a.size], **{k: v for k, v in (("epochs", a.epochs), ("lr", a.lr)) if v is not None}}
        epoch = math.ceil(len(xtr) / s["batch"])
        updates = s["epochs"] * epoch
        self.s, self.seed = {**s, "updates": updates, "warmup": max(1, updates // 10), "cont_updates": s["cont_epochs"] * epoch,
                             "ipq_updates": max(3, s["ipq_epochs"] * epoch)}, a.seed
        self._n_params, self.load_lock = None, threading.Lock()
        torch.set_num_threads(1)
        from fairseq import utils  # the plugin, before the steps' threads: it allowlists argparse.Namespace in

        utils.import_user_module(Namespace(user_dir=str(USER_DIR)))  # torch.load for good (no per-load race)

    # ------------------------------------------------------------------ fairseq
    def model_flags(self, seed: Optional[int] = None):
        """The LM recipe's hook (its fairseq_train passes a seed): RoBERTa's flags, with this run's --seed unless given."""
        s = self.s
        return ["--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", len(self.labels),
                "--init-token", "0", "--separator-token", "2", "--max-positions", s["max_len"],
                "--arch", "qn_roberta", "--encoder-layers", s["layers"], "--encoder-embed-dim", s["dim"],
                "--encoder-ffn-embed-dim", s["ffn"], "--encoder-attention-heads", s["heads"], "--dropout", "0.1",
                "--attention-dropout", "0.1", "--batch-size", s["batch"], "--required-batch-size-multiple", "1",
                "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
                "--lr-scheduler", "polynomial_decay", "--total-num-update", self.s["updates"], "--seed", self.seed if seed is None else seed,
                "--num-workers", "0", "--log-format", "simple", "--log-interval", max(1, self.s["updates"] // 10),
                "--no-epoch-checkpoints", "--save-interval", "1000", "--no-progress-bar"]

    def preprocess(self) -> dict:
        """input0 (words) and label files of TRAIN, binarized with ``fairseq-preprocess --only-source``
        into data-bin/input0 (dictionary: TRAIN words seen THRESHOLD times) and data-bin/label."""
        txt = self.out / "text"
        for split in ("train", "dev"):
            ys, xs = self.tsv[split]
            atomic_write_text(txt / f"{split}.input0", "".join(words(x, self.s["max_len"]) + "\n" for x in xs))
            atomic_write_text(txt / f"{split}.label", "".join(y + "\n" for y in ys))
        tmp = self.out / "data-bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for field, thr in (("input0", THRESHOLD), ("label", 0)):  # DEV as fairseq's valid: its accuracy per epoch
            self.sh("preprocess", ["fairseq-preprocess", "--only-source", "--trainpref", txt / f"train.{field}",
                                   "--validpref", txt / f"dev.{field}", "--destdir", tmp / field, "--workers", "1",
                                   "--thresholdsrc", thr], "preprocess")
        shutil.rmtree(self.data, ignore_errors=True)
        tmp.replace(self.data)
        return {"vocab": sum(1 for _ in open(self.data / "input0" / "dict.txt", encoding="utf-8")),
                "labels": len(self.labels), "updates": self.s["updates"]}

    def load(self, path: pathlib.Path):
        """(model, task) of a checkpoint or .qnz, with the plugin; eval mode, attention routed."""
        from fairseq import checkpoint_utils

        with self.load_lock:  # building a .qnz's model on the meta device is not thread-safe
            models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(self.data)})
        route_attention(models[0])
        return models[0].eval(), task

    def batches(self, task, split: str, size: int = 64):
        """Padded token batches of a split, shortest first: [(line indices, (B, T) tokens)]."""
        from fairseq.data import data_utils

        d = task.source_dictionary
        toks = [torch.cat([torch.tensor([d.bos()]), d.encode_line(words(x, self.s["max_len"]), add_if_not_exist=False,
                                                                   append_eos=True).long()]) for x in self.tsv[split][1]]
        order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
        return [(idx, data_utils.collate_tokens([toks[i] for i in idx], d.pad()))
                for idx in (order[i:i + size] for i in range(0, len(order), size))]

    def accuracy(self, model, task, split: str) -> float:
        pred = [None] * len(self.tsv[split][0])
        lab = task.label_dictionary
        with torch.no_grad():
            for idx, x in self.batches(task, split):
                for i, p in zip(idx, run(model, x).argmax(-1).tolist()):
                    pred[i] = lab[p + lab.nspecial]
        return sum(p == y for p, y in zip(pred, self.tsv[split][0])) / len(pred)

    def dev_curve(self, name: str) -> list:
        """DEV accuracy after each epoch of a training (fairseq-train's validation, last run in its log)."""
        text = (self.out / "logs" / f"train_{name}.log").read_text(errors="replace").rsplit("\n$ ", 1)[-1]
        return [round(float(a) / 100, 4) for a in DEV_ACC.findall(text)]

    def score(self, model, task, nbytes: int, dev: bool = False) -> dict:
        res = {"acc": self.accuracy(model, task, "test"), "bytes": nbytes,
               "avg_bits": round(8.0 * nbytes / self.n_params(), 3)}
        if dev:
            res["dev_acc"] = self.accuracy(model, task, "dev")
        return res

    def n_params(self) -> int:
        if self._n_params is None:  # of the fp32 model (tied weights once), the denominator of avg_bits
            self._n_params = hf.n_params(self.load(self.ckpt("fp32"))[0])
        return self._n_params

    def ckpt(self, name: str) -> pathlib.Path:
        return pathlib.Path(self.r(f"train_{name}")["checkpoint"])

    def qnz(self, step: str, name: str, bits=None) -> pathlib.Path:
        """``quantnoise quantize --scheme scalar --bits N`` (per row) of a training's checkpoint, then
        ``quantnoise export``; bits None: the checkpoint as it is, exported with an fp32 rest."""
        out = self.out / "qnz" / f"{step}.qnz"
        if bits is None:
            self.qn(step, "export", self.ckpt(name), "-o", out, "--rest", "float32", log="export")
            return out
        q = self.out / "scalar" / f"{step}.pt"
        q.parent.mkdir(parents=True, exist_ok=True)
        self.qn(step, "quantize", self.ckpt(name), "-o", q, "--scheme", "scalar", "--bits", bits, log=step)
        self.qn(step, "export", q, "-o", out, log="export")
        return out

    # ------------------------------------------------------------------ the steps
    def define(self) -> None:
        @self.step("preprocess")
        def _():
            return self.preprocess()

        for name, flags in TRAININGS.items():
            self.add_train(name, flags)
        rows = {"fp32": self.row_fp32, "int8_qat": self.row_int8_qat, "dq": self.row_dq, "ptq": self.row_ptq,
                "int4_posthoc": self.row_int4_posthoc, "qn_int4": self.row_qn_int4}
        for row, fn in rows.items():
            self.step(row, deps=[f"train_{row if row in TRAININGS else 'fp32'}"])(fn)
        sources = ["plain", *self.s["candidates"]]
        for name in sources:
            self.add_ipq_source(name)
        self.step("ipq_posthoc", deps=["ipq_plain"])(lambda: self.ipq_row("plain"))
        self.step("ipq_qn", deps=[f"ipq_{n}" for n in self.s["candidates"]])(self.row_ipq_qn)
        self.step("ipq_qn_int8", deps=["ipq_qn"])(self.row_ipq_qn_int8)
        self.step("report", deps=list(rows) + IPQ_ROWS)(self.report)

    def add_ipq_source(self, name: str) -> None:
        """cont_<name>: the fp32 model continued cont_updates (plain, or with the noise candidate ``name``);
        ipq_<name>: its staged iPQ + fine-tune by fairseq-train --ipq-plan, exported, DEV accuracy from the .qnz."""
        s = self.s
        flags = [] if name == "plain" else candidate_flags(name, max(1, s["cont_updates"] // 4))
        resets = ["--reset-optimizer", "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters"]

        @self.step(f"cont_{name}", deps=["train_fp32"])
        def _():
            n = s["cont_updates"]
            ckpt = self.fairseq_train(f"cont_{name}", self.out / "cont" / name,
                                      ["--restore-file", self.ckpt("fp32"), *resets, "--total-num-update", n, *flags],
                                      f"cont_{name}", n, s["cont_lr"], max(1, n // 10))
            return {"checkpoint": str(ckpt), "flags": flags, "dev_acc": self.accuracy(*self.load(ckpt), "dev")}

        @self.step(f"ipq_{name}", deps=[f"cont_{name}"])
        def _():
            n, d = s["ipq_updates"], self.out / "ipq" / name
            d.mkdir(parents=True, exist_ok=True)
            per = [n // 3, n // 3, n - 2 * (n // 3)]
            plan = {"seed": self.seed, "stages": [{"pattern": pat, "block_size": bs, "n_centroids": 256, "updates": u}
                                                  for (_, pat, bs), u in zip(IPQ_STAGES, per)]}
            atomic_write_text(d / "plan.yaml", json.dumps(plan))  # JSON is YAML
            ckpt = self.fairseq_train(f"ipq_{name}", d / "ft",
                                      ["--restore-file", self.r(f"cont_{name}")["checkpoint"], *resets,
                                       "--total-num-update", n, "--ipq-plan", d / "plan.yaml"], f"ipq_{name}", n,
                                      s["ipq_lr"], max(1, n // 10))
            qnz = self.out / "qnz" / f"ipq_{name}.qnz"
            self.qn(f"ipq_{name}", "export", ckpt, "-o", qnz, "--rest", "float32", log="export")
            return {"checkpoint": str(ckpt), "qnz": str(qnz), "dev_acc": self.accuracy(*self.load(qnz), "dev"),
                    "dev_acc_before_ipq": self.r(f"cont_{name}")["dev_acc"]}

    def ipq_row(self, name: str, int8: bool = False) -> dict:
        r = self.r(f"ipq_{name}")
        qnz = pathlib.Path(r["qnz"])
        if int8:
            qnz = self.out / "qnz" / f"ipq_{name}_int8.qnz"
            self.qn("ipq_qn_int8", "export", r["checkpoint"], "-o", qnz, "--rest", "float32", "--centroids", "int8",
                    log="export")
        model, task = self.load(qnz)
        res = self.score(model, task, qnz.stat().st_size, dev=int8)  # ipq_<name> scored this .qnz on DEV already
        res.setdefault("dev_acc", r["dev_acc"])
        plan = " -> ".join(f"{what} b={bs}" for what, _, bs in IPQ_STAGES)
        cont = "plain" if name == "plain" else f"Quant-Noise {name}"
        res.update(source=name, dev_acc_before_ipq=r["dev_acc_before_ipq"], file=qnz.name,
                   note=f"fp32 + {self.s['cont_updates']} {cont} updates, staged iPQ ({plan}; k=256) + "
                        f"{self.s['ipq_updates']} fine-tune updates" + (", int8 centroids" if int8 else ""))
        return res

    def row_ipq_qn(self) -> dict:
        cands = {n: self.r(f"ipq_{n}") for n in self.s["candidates"]}
        best = max(cands, key=lambda n: cands[n]["dev_acc"])  # DEV after iPQ, from each .qnz
        res = self.ipq_row(best)
        res["candidates"] = {n: {"dev_acc": c["dev_acc"], "dev_acc_before_ipq": c["dev_acc_before_ipq"]}
                             for n, c in cands.items()}
        return res

    def row_ipq_qn_int8(self) -> dict:
        return self.ipq_row(self.r("ipq_qn")["source"], int8=True)

    def row_fp32(self) -> dict:
        qnz = self.qnz("fp32", "fp32")
        return {**self.score(*self.load(qnz), qnz.stat().st_size, dev=True), "dev_curve": self.dev_curve("fp32"),
                "note": "the fp32 .qnz (fp32 rest) evaluated"}

    def row_int8_qat(self) -> dict:
        qnz = self.qnz("int8_qat", "int8_qat", 8)
        res = self.score(*self.load(self.ckpt("int8_qat")), qnz.stat().st_size, dev=True)
        res.update(qnz_acc=self.accuracy(*self.load(qnz), "test"), dev_curve=self.dev_curve("int8_qat"))
        res["note"] = "Q8BERT flags (int8 weights + int8 Linear inputs, EMA ranges) evaluated; bytes of its int8 .qnz"
        return res

    def row_dq(self) -> dict:
        model, task = self.load(self.ckpt("fp32"))
        dq = ptq.dynamic_int8(model)
        return {**self.score(dq, task, torch_save_bytes(dq)),
                "note": "torch.ao quantize_dynamic (real int8 kernels); bytes = torch.save of its state dict"}

    def row_ptq(self) -> dict:
        model, task = self.load(self.ckpt("fp32"))
        calib = [x for _, x in self.batches(task, "train", self.s["batch"])]
        calib = [calib[i] for i in torch.randperm(len(calib), generator=torch.Generator().manual_seed(self.seed))
                 [: self.s["calib_batches"]].tolist()]
        best = None
        for method, pct in PTQ_CANDIDATES:
            q = ptq.static_int8(model, calib, run, q8bert(seed=self.seed), method=method, percentile=pct)
            dev = self.accuracy(q, task, "dev")
            if best is None or dev > best[0]:
                best = (dev, method, pct, q)
        dev, method, pct, q = best
        res = self.score(q, task, self.qnz("ptq", "fp32", 8).stat().st_size)
        res.update(dev_acc=dev, method=method, percentile=pct, calib_batches=len(calib),
                   note="static calibration (int8 weights + int8 Linear inputs) of the fp32 model; method chosen on DEV")
        return res

    def row_int4_posthoc(self) -> dict:
        qnz = self.qnz("int4_posthoc", "fp32", 4)
        return {**self.score(*self.load(qnz), qnz.stat().st_size), "note": "round-to-nearest int4 per row of the fp32 model"}

    def row_qn_int4(self) -> dict:
        qnz = self.qnz("qn_int4", "qn_int4", 4)
        return {**self.score(*self.load(qnz), qnz.stat().st_size, dev=True), "dev_curve": self.dev_curve("qn_int4"),
                "note": "Quant-Noise scalar int4 p=0.5 training, then its int4 .qnz"}

    # ------------------------------------------------------------------ results
    @staticmethod
    def summary(name: str, r: dict) -> str:
        if "acc" in r:
            return f"test acc {r['acc']:.4f}, {r['bytes']:,} bytes"
        return ", ".join(f"{k} {v}" for k, v in r.items() if not isinstance(v, (list, dict)))[:80] or "ok"

    def report(self) -> dict:
        res = {k: dict(self.r(k)) for k in ORDER + IPQ_ROWS if k in self.steps}
        fp = res["fp32"]["acc"]
        for r in res.values():
            r["rel_err"] = round((fp - r["acc"]) / fp, 5) if fp else None
        atomic_write_text(self.out / "results.json", json.dumps(res, indent=1, sort_keys=True))
        s, p = self.s, self.r("preprocess")
        rows = ["| scheme | test acc | rel. error vs fp32 | bytes | avg bits/param | note |", "|---|---|---|---|---|---|"]
        rows += [f"| {k} | {r['acc']:.4f} | {100 * r['rel_err']:+.2f}% | {r['bytes']:,} | {r['avg_bits']:.2f} | "
                 f"{r.get('note', '')} |" for k, r in res.items()]
        cpu, a = self.cpu_account(), self.args
        extra = "".join(f" --{k} {getattr(a, k)}" for k in ("epochs", "lr") if getattr(a, k) is not None)
        dev = "; ".join(f"{k} {res[k]['dev_acc']:.4f}" + (f" (after each epoch: {', '.join(f'{v:.3f}' for v in res[k]['dev_curve'])})"
                                                         if "dev_curve" in res[k] else "") for k in res if "dev_acc" in res[k])
        text = (f"# Q8BERT table: fairseq RoBERTa from scratch (sentence_prediction), size={self.size}\n\n"
                f"`recipes/bert/run.sh {a.train} {a.dev} {a.test} {a.outdir} --model roberta --size {a.size} "
                f"--jobs {a.jobs} --seed {a.seed}{extra}`\n\n"
                f"{s['layers']} layers, {s['dim']}-d, FFN {s['ffn']}, {s['heads']} heads, {self.n_params():,} parameters; "
                f"vocabulary {p['vocab']} words, {len(self.labels)} labels; {len(self.tsv['train'][0])} train / "
                f"{len(self.tsv['dev'][0])} dev / {len(self.tsv['test'][0])} test lines; {self.s['updates']} updates of "
                f"batch {s['batch']} (lr {s['lr']}) per training.\n\n" + "\n".join(rows) +
                f"\n\nDEV accuracy: {dev}; PTQ calibration chosen on DEV: {res['ptq']['method']} {res['ptq']['percentile']} "
                f"({res['ptq']['calib_batches']} TRAIN batches).\n\n" + self.ipq_text(res) +
                f"\n\nThis invocation: {time.time() - self.t0:.0f} s wall; CPU seconds of the fairseq processes "
                f"{cpu['fairseq_total_s']} (all runs of this OUTDIR), of this driver {cpu['driver_s']} (evaluation, "
                f"quantize, export); 1-min load average {self.load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
                f"host {platform.node()}, torch {torch.__version__}, {os.cpu_count()} CPUs.\n")
        atomic_write_text(self.out / "results.md", text)
        return {"results": str(self.out / "results.json")}

    def ipq_text(self, res: dict) -> str:
        """The iPQ rows against fp32 (DEV before / after iPQ of every continuation, the choice, the loss cut)."""
        fp, post, qn = res["fp32"]["acc"], res["ipq_posthoc"], res["ipq_qn"]
        cands = "; ".join(f"{n}: DEV {c['dev_acc_before_ipq']:.4f} before iPQ, {c['dev_acc']:.4f} after"
                          for n, c in qn["candidates"].items())
        lost = fp - post["acc"]
        cut = f"{100 * (1 - (fp - qn['acc']) / lost):+.0f} %" if lost > 0 else "n/a (no iPQ loss)"
        return (f"iPQ rows: plain continuation DEV {post['dev_acc_before_ipq']:.4f} before iPQ, {post['dev_acc']:.4f} "
                f"after; Quant-Noise candidates: {cands}; chosen on DEV: **{qn['source']}**. iPQ loss (TEST, fp32 minus "
                f"iPQ): ipq_posthoc {lost:+.4f}, ipq_qn {fp - qn['acc']:+.4f}: cut {cut}; fp32 .qnz / ipq_qn .qnz "
                f"{res['fp32']['bytes'] / qn['bytes']:.1f}x.")


def run(model, tokens):
    """Class logits (B, labels) of a fairseq RoBERTa with its sentence_prediction head."""
    return model(tokens, features_only=True, classification_head_name=HEAD)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="run.sh --model roberta", description=__doc__.splitlines()[0])
    for name in ("train", "dev", "test", "outdir"):
        ap.add_argument(name, type=pathlib.Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--jobs", type=int, default=2, help="steps at once (one thread each)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1, help="1 only: seeds and intervals are the MiniLM table's (table.py)")
    ap.add_argument("--epochs", type=int, default=None, help="override the size's training epochs")
    ap.add_argument("--lr", type=float, default=None, help="override the size's peak learning rate")
    a = ap.parse_args(argv)
    try:
        if a.seeds != 1:
            raise ValueError(f"--seeds {a.seeds}: the roberta recipe runs one seed (--seed N); the MiniLM table "
                             f"(--model minilm, the default) runs several with their intervals")
        if a.jobs < 1 or (a.epochs is not None and a.epochs < 1) or (a.lr is not None and not a.lr > 0):
            raise ValueError(f"--jobs {a.jobs} / --epochs {a.epochs} / --lr {a.lr}: jobs and epochs must be >= 1, lr > 0")
        recipe = RobertaRecipe(a)  # reads and checks the three TSVs before anything is written
        stamp, fp = a.outdir / "recipe.json", {"model": "roberta", "seed": a.seed, "epochs": a.epochs, "lr": a.lr,
                                                **fingerprint((a.train, a.dev, a.test), a.size)}
        if stamp.is_file() and json.loads(stamp.read_text()) != fp:
            raise ValueError(f"OUTDIR {a.outdir} holds a run with other inputs, size or seed ({stamp}); pass a new OUTDIR")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(fp, indent=1))
    return recipe.run()


if __name__ == "__main__":
    sys.exit(main())
