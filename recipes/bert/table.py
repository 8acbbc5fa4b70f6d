"""The Q8BERT table on any sentence-classification TSV (label<TAB>text): fp32, int8 QAT (Q8BERT),
dynamic int8 (DQ), static PTQ, int4 post-hoc and Quant-Noise int4 on all-MiniLM-L6-v2.

    python recipes/bert/table.py TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size small|base]

Every choice (the PTQ calibration method) is made on DEV; the table reports TEST accuracy.  Each
stage writes OUTDIR/stages/NAME.json when done, so a rerun skips finished stages (resumable);
progress goes to stderr and OUTDIR/log.txt.  Writes OUTDIR/results.json and OUTDIR/results.md.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import pathlib
import platform
import sys
import time

import torch
from torch import nn

from quantnoise import quantize_, unquantize_
from quantnoise import hf, ptq
from quantnoise.checkpoint import atomic_write
from quantnoise.export import ExportOptions, save_state_dict
from quantnoise.ipq import LayerRule, compress_module, set_submodule
from quantnoise.presets import Q8BERT_LAYERS, q8bert, qn_int4

log = logging.getLogger("recipes.bert")
SIZES = {  # fine-tune budget: the same for fp32, int8 QAT and Quant-Noise int4
    "small": dict(epochs=1, max_len=64, batch=32, lr=1e-4, calib_batches=8, qn_p=0.5),
    "base": dict(epochs=3, max_len=128, batch=32, lr=5e-5, calib_batches=32, qn_p=0.5),
}
PTQ_CANDIDATES = [("minmax", 100.0), ("percentile", 99.99), ("percentile", 99.9)]
ORDER = ["fp32", "int8_qat", "dq", "ptq", "int4_posthoc", "qn_int4"]  # rows of the table
STAGES = ["fp32", "dq", "ptq", "int4_posthoc", "int8_qat", "qn_int4"]  # run order: the cheap post-training rows first


def write_json(path: pathlib.Path, obj) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(str(path), lambda tmp: pathlib.Path(tmp).write_text(text))


def compressed(model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``model`` whose Q8BERT layers are int ``bits`` layers (one scale per row): the
    model a .qnz stores."""
    model = copy.deepcopy(model)
    unquantize_(model)
    rule = LayerRule(pattern=Q8BERT_LAYERS, scheme="scalar", bits=bits)
    for name, m in list(model.named_modules()):
        if name and isinstance(m, (nn.Linear, nn.Embedding)) and rule.matches(name):
            set_submodule(model, name, compress_module(m, rule, name))
    return model


def qnz_bytes(model: nn.Module, path: pathlib.Path, rest_dtype: str = "float32") -> int:
    save_state_dict(path, model.state_dict(), ExportOptions(rest_dtype=rest_dtype))
    return path.stat().st_size


def torch_save_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def timed(model: nn.Module, data, threads: int) -> float:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    with torch.no_grad():
        for b in data:
            hf.forward(model, b)
    return time.perf_counter() - t


class Run:
    def __init__(self, args):
        self.args, self.cfg = args, dict(SIZES[args.size])
        self.cfg.update({k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None})
        self.out = pathlib.Path(args.outdir)
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        (self.out / "ckpt").mkdir(exist_ok=True)
        ytr, xtr = hf.read_tsv(args.train)
        self.labels = sorted(set(ytr))
        ydev, xdev = hf.read_tsv(args.dev, self.labels)
        yte, xte = hf.read_tsv(args.test, self.labels)
        lid = {y: i for i, y in enumerate(self.labels)}
        self.ydev, self.yte = [lid[y] for y in ydev], [lid[y] for y in yte]
        self.tok = hf.load_tokenizer()
        c = self.cfg
        self.train = hf.batches(self.tok, xtr, [lid[y] for y in ytr], c["batch"], c["max_len"], seed=args.seed)
        self.dev = hf.batches(self.tok, xdev, self.ydev, 64, c["max_len"])
        self.test = hf.batches(self.tok, xte, self.yte, 64, c["max_len"])
        log.info("data: %d train / %d dev / %d test lines, %d labels, size=%s %s", len(xtr), len(xdev), len(xte),
                 len(self.labels), args.size, c)
        self._fp32 = None
        self.n_params = hf.n_params(self.new_model())

    # ------------------------------------------------------------------ helpers
    def stage(self, name: str, fn):
        path = self.out / "stages" / f"{name}.json"
        if path.exists():
            log.info("[%s] done earlier: %s", name, path)
            return json.loads(path.read_text())
        t = time.time()
        log.info("[%s] start", name)
        res = fn()
        res["seconds"] = round(time.time() - t, 1)
        write_json(path, res)
        log.info("[%s] done in %.0f s: %s", name, res["seconds"], {k: v for k, v in res.items() if k != "speed"})
        return res

    def new_model(self) -> nn.Module:
        return hf.load_classifier(len(self.labels), seed=self.args.seed)

    def finetune(self, model: nn.Module, tag: str) -> None:
        c = self.cfg
        hf.finetune_(model, self.train, c["epochs"], c["lr"], seed=self.args.seed, tag=tag)

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
        return self.score("fp32", self.fp32(), qnz_bytes(self.fp32(), self.out / "ckpt" / "fp32.qnz"), dev=True)

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
        threads0, speed = torch.get_num_threads(), {}
        data = self.test[: min(len(self.test), 4)]
        for threads in (1, 2):
            t_fp, t_dq = [], []
            for _ in range(3):  # interleaved, best of 3
                t_fp.append(timed(base, data, threads))
                t_dq.append(timed(dq, data, threads))
            speed[f"{threads}t"] = {"fp32_s": round(min(t_fp), 3), "dq_s": round(min(t_dq), 3),
                                   "speedup": round(min(t_fp) / min(t_dq), 3)}
            log.info("[dq] %d thread(s): fp32 %.2f s, dq %.2f s, speed-up %.2fx", threads, min(t_fp), min(t_dq),
                     min(t_fp) / min(t_dq))
        torch.set_num_threads(threads0)
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
                "int8_weights_only": hf.cosine(emb(compressed(enc, 8)), ref),
                "int4_weights_only": hf.cosine(emb(compressed(enc, 4)), ref)}

    def report(self, results: dict, cos: dict) -> None:
        fp = results["fp32"]["acc"]
        ref = torch.load(self.out / "ckpt" / "fp32_test_emb.pt", weights_only=True)
        for name, r in results.items():
            r["rel_err"] = round((fp - r["acc"]) / fp, 5) if fp else None
            emb = torch.load(self.out / "ckpt" / f"{name}_test_emb.pt", weights_only=True)
            r["cos"] = round(hf.cosine(emb, ref), 5)
        write_json(self.out / "results.json", results)
        rows = ["| scheme | test acc | rel. error vs fp32 | bytes | avg bits/param | emb. cosine to fp32 | note |",
                "|---|---|---|---|---|---|---|"]
        for k in ORDER:
            r = results[k]
            rows.append(f"| {k} | {r['acc']:.4f} | {100 * r['rel_err']:+.2f}% | {r['bytes']:,} | {r['avg_bits']:.2f} | "
                        f"{r['cos']:.4f} | {r.get('note', '')} |")
        sp = results["dq"].get("speed", {})
        speed = "; ".join(f"{k}: fp32 {v['fp32_s']} s, DQ {v['dq_s']} s, speed-up {v['speedup']}x" for k, v in sp.items())
        a = self.args
        text = (f"# Q8BERT table: all-MiniLM-L6-v2, size={a.size}\n\n"
                f"`recipes/bert/run.sh {a.train} {a.dev} {a.test} {a.outdir} --size {a.size}`\n\n"
                f"{len(self.labels)} labels; {sum(len(b['index']) for b in self.train)} train / {len(self.ydev)} dev / "
                f"{len(self.yte)} test lines; budget {self.cfg}; host {platform.node()}, "
                f"torch {torch.__version__}, {os.cpu_count()} CPUs\n\n" + "\n".join(rows) +
                "\n\nSentence embeddings of the pretrained all-MiniLM-L6-v2 (no fine-tuning), mean cosine to fp32 on the TEST "
                f"sentences: " + ", ".join(f"{k} {v:.4f}" for k, v in cos.items() if k != "seconds") +
                f"\n\nDQ forward time on {min(len(self.test), 4)} test batches (best of 3, interleaved): {speed}\n")
        atomic_write(str(self.out / "results.md"), lambda tmp: pathlib.Path(tmp).write_text(text))

    def main(self) -> dict:
        results = {}
        for name in self.args.stages or STAGES + ["pretrained_cosine"]:
            results[name] = self.stage(name, getattr(self, f"run_{name}"))
        if self.args.stages:  # a partial run (e.g. stages in parallel processes): the report comes with a full one
            return results
        cos = results.pop("pretrained_cosine")
        self.report(results, cos)
        log.info("wrote %s and %s", self.out / "results.md", self.out / "results.json")
        return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("dev")
    ap.add_argument("test")
    ap.add_argument("outdir")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override the size's fine-tune epochs")
    ap.add_argument("--lr", type=float, default=None, help="override the size's peak learning rate")
    ap.add_argument("--stages", type=lambda v: v.split(","), default=None,
                    help=f"comma-separated subset of {','.join(STAGES)},pretrained_cosine to run now (no report); "
                         f"stages after fp32 need fp32 done, except int8_qat and qn_int4, which can run beside it")
    args = ap.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stderr),
                                  logging.FileHandler(os.path.join(args.outdir, "log.txt"))])
    try:
        Run(args).main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
