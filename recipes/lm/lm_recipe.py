"""The Quant-Noise table on any plain-text corpus (driver of ``recipes/lm/run.sh``; see README.md here).

    python recipes/lm/lm_recipe.py TRAIN.txt VALID.txt TEST.txt OUTDIR [--size small|base] [--jobs N]
        [--only table|finetune] [--from CKPT] [--ft-base-updates U] [--ft-updates N] [--ft-candidates LIST]

Two parts: the from-scratch table (Fan et al. 2020, Table 1/2), and the noise fine-tune of a trained
model (a baseline, the recipe's or ``--from CKPT``, continued N updates without and with Quant-Noise,
then the same iPQ + centroid fine-tuning; the noise chosen on VALID).

Every step is a stock fairseq command (``fairseq-preprocess``, ``fairseq-train``,
``fairseq-hydra-train -m``, ``fairseq-eval-lm``) with the plugin, or a ``quantnoise`` command
(``quantize``, ``export``, ``sweep-report``).  A step records its result in ``OUTDIR/steps/<step>.json``
(written atomically once the step has succeeded); a rerun skips the steps that have one, so a killed run
loses at most the steps in flight.  fairseq's logs go to ``OUTDIR/logs/``.  Noise rates are chosen on
VALID (the Hydra sweep); TEST is only read by the final evaluations of the exported ``.qnz`` files.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's quantnoise (for the in-process commands and the subprocesses)
from benchmarks.harness import interval, write_record  # noqa: E402  the project's record and seeds' interval
BIN = pathlib.Path(sys.executable).parent
USER_DIR = ROOT / "quantnoise" / "qn_fairseq"
THRESHOLD = 2  # fairseq-preprocess --thresholdsrc: a word needs this many occurrences in TRAIN

# Model sizes (recipes/lm/README.md).  rates: the Hydra sweep of the drop noise rate (0 = the baseline).
SIZES = {
    "tiny": dict(layers=1, dim=32, ffn=64, heads=2, tokens=32, max_tokens=256, updates=12, ft_updates=4,
                 lr=0.003, warmup=4, rates=[0.0, 0.1, 0.2], refresh=4),  # tests only: the shortest real sweep
    "small": dict(layers=2, dim=128, ffn=512, heads=4, tokens=128, max_tokens=1024, updates=250, ft_updates=60,
                  lr=0.003, warmup=25, rates=[0.0, 0.05, 0.1, 0.2], refresh=25),
    "base": dict(layers=3, dim=256, ffn=1024, heads=4, tokens=128, max_tokens=1024, updates=1000, ft_updates=250,
                 lr=0.002, warmup=100, rates=[0.0, 0.05, 0.1, 0.2, 0.3], refresh=100),
}
IPQ = dict(block_size=8, centroids=256)  # post-hoc iPQ of every Linear and Embedding
# The noise fine-tune (recipes/lm/README.md, "Noise fine-tune"): a trained baseline (base_updates, or --from CKPT)
# continued `updates` updates without noise and with each noise candidate (peak lr `lr` of the continuation's
# inverse_sqrt schedule, restarted, after a warmup of a tenth of the updates), then iPQ + `centroid_updates` of centroid fine-tuning (lr centroid_lr) for all;
# the candidate with the lowest VALID perplexity after that is the `ipq_qn` row.  Candidates: <drop|pq>_p<rate>,
# with `_vocab` = noise on the input embedding and the output projection only.
# Seeds: `seeds` runs of everything after the baseline (continuations, k-means, centroid fine-tuning), paired; the
# baseline shared (`base_seeds` 1) or one per seed.  base_updates "auto": train until VALID has not improved for
# `base_patience` validations (every base_max / 20 updates), at most `base_max` updates, and continue from the best.
FINETUNE = {
    "tiny": dict(base_updates=16, base_max=16, base_patience=2, seeds=1, base_seeds=1, updates=8, lr=0.001,
                 centroid_updates=4, centroid_lr=0.001, candidates=["drop_p0.3", "pq_p0.3"]),
    "small": dict(base_updates="auto", base_max=8000, base_patience=3, seeds=3, base_seeds=1, updates=2000, lr=0.001,
                  centroid_updates=60, centroid_lr=0.001, candidates=["pq_p0.5", "pq_p0.75"]),
    "base": dict(base_updates="auto", base_max=8000, base_patience=3, seeds=3, base_seeds=1, updates=2000, lr=0.001,
                 centroid_updates=250, centroid_lr=0.0007, candidates=["drop_p0.1", "drop_p0.3", "pq_p0.3"]),
}
VOCAB_LAYERS = "embed_tokens|output_projection"  # the two vocabulary matrices (79% of the small model's weights)
# the models trained with fairseq-train: name -> (noise config in configs/quant_noise/, overrides)
SCALAR_RUNS = {"int4_qn": ("scalar_int4", {}), "int8_qn": ("scalar_int8", {}),
               "int4_qat": ("scalar_int4", {"quant_noise_p": 1.0}), "int8_qat": ("scalar_int8", {"quant_noise_p": 1.0})}


class RecipeError(Exception):
    """Bad input: one line naming the file or value and the fix."""


# ------------------------------------------------------------------------------------ input checks
def tokens_of(path: pathlib.Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            yield from line.split()


def check_inputs(train: pathlib.Path, valid: pathlib.Path, test: pathlib.Path, out: pathlib.Path) -> None:
    """Everything that can be wrong with the arguments, before anything is written."""
    for role, path in (("TRAIN", train), ("VALID", valid), ("TEST", test)):
        if not path.exists():
            raise RecipeError(f"{role} file '{path}' does not exist; pass a plain-text corpus file (one sentence or paragraph per line)")
        if not path.is_file():
            raise RecipeError(f"{role} '{path}' is not a file; pass a plain-text corpus file (one sentence or paragraph per line)")
        if next(tokens_of(path), None) is None:
            raise RecipeError(f"{role} file '{path}' is empty (no token); pass a non-empty plain-text corpus file")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"OUTDIR '{out}' is a file; pass a folder (a new one, or a previous run's OUTDIR to resume it)")
    counts = collections.Counter(tokens_of(train))
    vocab = {w for w, c in counts.items() if c >= THRESHOLD}
    if not vocab:
        raise RecipeError(f"TRAIN file '{train}' has no word that occurs {THRESHOLD} times (the vocabulary would be empty); "
                          f"pass a larger training text")
    for role, path in (("VALID", valid), ("TEST", test)):
        if not any(t in vocab for t in tokens_of(path)):
            raise RecipeError(f"{role} file '{path}' has no token of the vocabulary built from TRAIN '{train}' (words seen "
                              f">= {THRESHOLD} times), so every token would be <unk>; pass a {role} text in the language "
                              f"and tokenisation of TRAIN")


def fingerprint(paths, size: str) -> dict:
    def sha(p):
        return hashlib.sha1(p.read_bytes()).hexdigest()
    return {"size": size, **{role: {"path": str(p.resolve()), "sha1": sha(p)} for role, p in zip(("train", "valid", "test"), paths)}}


# ------------------------------------------------------------------------------------ helpers
def atomic_write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def noise_flags(config: str, **overrides) -> List[str]:
    """fairseq-train flags for a Hydra noise config of configs/quant_noise/ (one source for both launchers)."""
    import yaml

    values = yaml.safe_load((ROOT / "configs" / "quant_noise" / f"{config}.yaml").read_text()) or {}
    values.update(overrides)
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            out += [flag(key)] if value else []
        else:
            out += [flag(key), str(value)]
    return out


CANDIDATE = re.compile(r"(drop|pq)_p(0?\.[0-9]+|1(?:\.0*)?)(_vocab)?")


def candidate_flags(name: str, refresh: int) -> List[str]:
    """fairseq-train flags of a noise fine-tune candidate ``<drop|pq>_p<rate>[_vocab]``."""
    m = CANDIDATE.fullmatch(name)
    if not m or not 0 < float(m.group(2)) <= 1:
        raise RecipeError(f"noise candidate '{name}' is not <drop|pq>_p<rate>[_vocab] with 0 < rate <= 1; "
                          f"e.g. drop_p0.3, pq_p0.5, drop_p0.3_vocab")
    kind, p, vocab = m.group(1), float(m.group(2)), m.group(3)
    flags = noise_flags(kind, quant_noise_p=p, **({"quant_noise_refresh_every": refresh} if kind == "pq" else {}))
    return flags + (["--quant-noise-layers", VOCAB_LAYERS] if vocab else [])


def check_checkpoint(path: pathlib.Path, size: str, dict_words: Optional[int] = None) -> None:
    """A --from checkpoint must be a fairseq LM checkpoint of this --size (and, once the vocabulary is
    built, of its vocabulary): one line naming the mismatch otherwise.  Reads tensors only."""
    import torch

    if not path.is_file():
        raise RecipeError(f"--from checkpoint '{path}' does not exist; pass a fairseq-train checkpoint_last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise RecipeError(f"--from checkpoint '{path}' is not a readable fairseq checkpoint ({type(e).__name__}); "
                          f"pass a fairseq-train checkpoint_last.pt") from None
    model = state.get("model") if isinstance(state, dict) else None
    emb = model.get("decoder.embed_tokens.weight") if isinstance(model, dict) else None
    if emb is None:
        raise RecipeError(f"--from checkpoint '{path}' has no decoder.embed_tokens.weight: not a fairseq language model")
    s = SIZES[size]
    layers = len({k.split(".")[2] for k in model if k.startswith("decoder.layers.")})
    fc1 = model.get("decoder.layers.0.fc1.weight")
    shape = (layers, int(emb.shape[1]), int(fc1.shape[0]) if fc1 is not None else None)
    if shape != (s["layers"], s["dim"], s["ffn"]):
        raise RecipeError(f"--from checkpoint '{path}' is a {shape[0]}-layer, {shape[1]}-d, FFN {shape[2]} model, but "
                          f"--size {size} is {s['layers']} layers, {s['dim']}-d, FFN {s['ffn']}; pass the matching --size")
    if dict_words is not None and int(emb.shape[0]) != dict_words + 4:  # fairseq adds <s> <pad> </s> <unk>
        raise RecipeError(f"--from checkpoint '{path}' has a vocabulary of {int(emb.shape[0])} entries, the one "
                          f"fairseq-preprocess built from TRAIN has {dict_words + 4}; pass the checkpoint trained on "
                          f"this TRAIN file (same words, threshold {THRESHOLD})")


PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+|inf)")
VALID_PPL = re.compile(r"valid on 'valid' subset \| loss ([0-9.]+) \| .*?\bppl ([0-9.]+|inf)")
VALID_CURVE = re.compile(r"valid on 'valid' subset \| .*?\bppl ([0-9.]+|inf) \| .*?\bnum_updates ([0-9]+)")


class Recipe:
    def __init__(self, train, valid, test, out: pathlib.Path, size: str, jobs: int,
                 parts=("table", "finetune"), from_ckpt: Optional[pathlib.Path] = None, finetune: Optional[dict] = None):
        self.corpus = dict(train=train.resolve(), valid=valid.resolve(), test=test.resolve())
        self.out, self.size, self.s, self.jobs = out.resolve(), size, SIZES[size], jobs
        self.parts, self.from_ckpt = tuple(parts), from_ckpt.resolve() if from_ckpt else None
        self.f = {**FINETUNE[size], **(finetune or {})}  # the noise fine-tune's settings
        self.command, self.record = ["recipes/lm/run.sh", *sys.argv[1:]], None
        self.data = self.out / "data-bin"
        self.t0 = time.time()
        self.lock, self.qn_lock = threading.Lock(), threading.Lock()
        self.steps: Dict[str, dict] = {}  # name -> {"deps", "fn"}
        self.results: Dict[str, dict] = {}
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))
        self.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore",
                    "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
                    "QUANTNOISE_USER_DIR": str(USER_DIR), "HYDRA_FULL_ERROR": "1", "MPLBACKEND": "Agg"}
        os.environ["TQDM_DISABLE"] = "1"  # the in-process quantnoise commands: no progress bars on the console

    # ------------------------------------------------------------------ running commands
    def sh(self, step: str, cmd: List, log: str, cwd=None) -> str:
        """Run ``cmd`` (a venv tool name first) with its output appended to logs/<log>.log; returns that output.
        Adds the process' CPU seconds to the step's account.  ``log`` must not be shared by commands that
        run at the same time (the output is read back from the file): each step logs to its own file."""
        exe = str(cmd[0]) if os.sep in str(cmd[0]) else str(BIN / cmd[0])
        argv = [exe, *map(str, cmd[1:])]
        path = self.out / "logs" / f"{log}.log"
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(argv)}\n")
            f.flush()
            start = f.tell()
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        with self.lock:
            self.cpu[step] = self.cpu.get(step, 0.0) + usage.ru_utime + usage.ru_stime
        text = path.read_bytes()[start:].decode("utf-8", errors="replace")  # start: a byte offset
        if proc.returncode != 0:
            tail = [l for l in text.splitlines() if l.strip()][-1:] or ["(no output)"]
            raise RuntimeError(f"{pathlib.Path(exe).name} exited {proc.returncode} ({tail[0][:300]}); full log: {path}")
        return text

    def qn(self, step: str, *args, log: str) -> None:
        """A ``quantnoise`` command, run in this process (saves a Python start per call; its log
        lines go to logs/quantnoise.log).  Its CPU time is not counted in the step's account."""
        from quantnoise.cli import main as quantnoise_main

        argv = [str(a) for a in args]
        logging.getLogger(__name__).info("$ quantnoise %s", " ".join(argv))
        with self.qn_lock, open(self.out / "logs" / f"{log}.log", "a", encoding="utf-8") as f, \
                contextlib.redirect_stdout(f):  # progress lines go to sys.__stdout__, not here
            f.write(f"\n$ quantnoise {' '.join(argv)}\n")
            rc = quantnoise_main(argv)
        if rc:
            raise RuntimeError(f"quantnoise {' '.join(argv)} exited {rc}; see {self.out / 'logs' / 'quantnoise.log'}")

    def model_flags(self, seed: Optional[int] = None) -> List[str]:
        """fairseq-train's model and optimisation flags (``--seed``: ``seed``, default 1)."""
        s = self.s
        return ["--task", "language_modeling", "--arch", "qn_transformer_lm", "--decoder-layers", s["layers"],
                "--decoder-embed-dim", s["dim"], "--decoder-input-dim", s["dim"], "--decoder-output-dim", s["dim"],
                "--decoder-ffn-embed-dim", s["ffn"], "--decoder-attention-heads", s["heads"], "--decoder-normalize-before",
                "--dropout", "0.1", "--tokens-per-sample", s["tokens"], "--max-tokens", s["max_tokens"],
                "--sample-break-mode", "none", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "0.0",
                "--lr-scheduler", "inverse_sqrt", "--seed", 1 if seed is None else seed, "--num-workers", "0", "--log-format", "simple",
                "--log-interval", max(1, s["updates"] // 10), "--no-epoch-checkpoints", "--validate-interval", "1000",
                "--save-interval", "1000", "--no-progress-bar"]

    def fairseq_train(self, step: str, save_dir: pathlib.Path, extra: List, log: str, updates: int, lr: float, warmup: int,
                      seed: Optional[int] = None):
        if save_dir.exists():
            shutil.rmtree(save_dir)  # a killed run's leftovers: this step starts over
        self.sh(step, ["fairseq-train", self.data, "--user-dir", USER_DIR, *self.model_flags(seed), "--lr", lr,
                       "--warmup-updates", warmup, "--max-update", updates, "--save-dir", save_dir, *extra], log)
        ckpt = save_dir / "checkpoint_last.pt"
        if not ckpt.is_file():
            raise RuntimeError(f"fairseq-train wrote no {ckpt}; see {self.out / 'logs' / (log + '.log')}")
        return ckpt

    def valid_ppl(self, log: str) -> float:
        """fairseq-train's validation perplexity at the end of the run logged in logs/<log>.log."""
        m = VALID_PPL.findall((self.out / "logs" / f"{log}.log").read_text(errors="replace"))
        if not m:
            raise RuntimeError(f"no validation line in {self.out / 'logs' / (log + '.log')}")
        return float(m[-1][1])

    def eval_lm(self, step: str, path: pathlib.Path, subset: str, log: str) -> float:
        s = self.s
        text = self.sh(step, ["fairseq-eval-lm", self.data, "--user-dir", USER_DIR, "--path", path, "--gen-subset", subset,
                              "--tokens-per-sample", s["tokens"], "--max-tokens", s["max_tokens"], "--num-workers", "0",
                              "--sample-break-mode", "none"], log)
        m = PPL.findall(text)
        if not m:
            raise RuntimeError(f"fairseq-eval-lm printed no perplexity for {path}; see {self.out / 'logs' / (log + '.log')}")
        return float(m[-1][1])

    def preprocess(self) -> dict:
        """fairseq-preprocess TRAIN/VALID/TEST into OUTDIR/data-bin (built aside, then moved in place)."""
        tmp = self.out / "data-bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.sh("preprocess", ["fairseq-preprocess", "--only-source", "--trainpref", self.corpus["train"],
                               "--validpref", self.corpus["valid"], "--testpref", self.corpus["test"], "--destdir", tmp,
                               "--workers", "1", "--thresholdsrc", THRESHOLD], "preprocess")
        shutil.rmtree(self.data, ignore_errors=True)
        os.replace(tmp, self.data)
        return {"vocab": sum(1 for _ in open(self.data / "dict.txt", encoding="utf-8"))}

    # ------------------------------------------------------------------ the steps
    def step(self, name: str, deps=()):
        def deco(fn: Callable[[], dict]):
            self.steps[name] = {"deps": list(deps), "fn": fn}
            return fn
        return deco

    def r(self, name: str) -> dict:
        return self.results[name]

    def define(self) -> None:
        @self.step("preprocess")
        def _():
            return self.preprocess()

        if "table" in self.parts:
            self.define_table()
        if "finetune" in self.parts:
            self.define_finetune()

        @self.step("report", deps=[n for n in self.steps if n != "report"])
        def _():
            return self.report()

    def define_table(self) -> None:
        s, out = self.s, self.out
        rates = [p for p in s["rates"] if p > 0]

        @self.step("sweep", deps=["preprocess"])
        def _():
            return self.sweep()

        # fairseq-train: full QAT and the scalar Quant-Noise models, iPQ QAT (pq noise at p = 1)
        for name, (config, over) in SCALAR_RUNS.items():
            self.add_train(name, noise_flags(config, **over))
        self.add_train("ipq_qat", noise_flags("pq", quant_noise_p=1.0, quant_noise_refresh_every=s["refresh"]))
        self.add_train("pq_noise", lambda: noise_flags("pq", quant_noise_p=self.r("select_p")["p"],
                                                       quant_noise_refresh_every=s["refresh"]), deps=["select_p"])

        # post-hoc iPQ + centroid fine-tuning of every model the iPQ rows need, and of every sweep run
        for p in s["rates"]:
            self.add_ipq(f"drop_p{p:g}", lambda p=p: self.r("sweep")["checkpoints"][f"{p:g}"], deps=["sweep"])
        self.add_ipq("ipq_qat", lambda: self.r("train_ipq_qat")["checkpoint"], deps=["train_ipq_qat"])
        self.add_ipq("pq_noise", lambda: self.r("train_pq_noise")["checkpoint"], deps=["train_pq_noise"])

        @self.step("select_p", deps=[f"ipq_drop_p{p:g}" for p in s["rates"]])
        def _():
            fp32 = self.r("sweep")["valid_fp32"]
            sweep = [{"p": p, "ppl_valid_fp32": fp32.get(f"{p:g}"), "ppl_valid_ipq": self.r(f"ipq_drop_p{p:g}")["valid_ft"],
                      "ppl_valid_ipq_no_finetune": self.r(f"ipq_drop_p{p:g}")["valid_noft"]} for p in s["rates"]]
            best = min((e for e in sweep if e["p"] > 0), key=lambda e: e["ppl_valid_ipq"])
            for e in sweep:  # the iPQ figures go next to fairseq's validation in sweep-report
                folder = pathlib.Path(self.r("sweep")["checkpoints"][f"{e['p']:g}"]).parent.parent
                atomic_write_text(folder / "quantnoise_eval.json", json.dumps(
                    {"ppl_valid_ipq": e["ppl_valid_ipq"], "ppl_valid_ipq_no_finetune": e["ppl_valid_ipq_no_finetune"]}))
            self.qn("select_p", "sweep-report", out / "sweep", "--markdown", out / "sweep_report.md",
                    "--plot", out / "sweep.png", log="sweep_report")
            return {"p": best["p"], "sweep": sweep, "criterion": "lowest VALID perplexity after iPQ + fine-tuning"}

        # table rows: (row, model checkpoint step) ; each is exported and evaluated on TEST
        @self.step("fp32", deps=["sweep"])
        def _():
            return {**self.export_test("fp32", self.r("sweep")["checkpoints"]["0"], "fp32", "--rest", "float32"),
                    "ppl_valid": self.r("sweep")["valid_fp32"]["0"]}

        ipq_rows = {"ipq.posthoc": "ipq_drop_p0", "ipq.qat": "ipq_ipq_qat", "ipq.quant_noise": None, "ipq_pq_noise": "ipq_pq_noise"}
        for row, src in ipq_rows.items():
            deps = [src] if src else ["select_p"]
            self.add_export(row, (lambda src=src: self.r(src)["finetuned"]) if src else
                            (lambda: self.r(f"ipq_drop_p{self.r('select_p')['p']:g}")["finetuned"]),
                            deps=deps + ([] if src else [f"ipq_drop_p{p:g}" for p in rates]))
        for bits in (4, 8):
            for col, model in (("posthoc", None), ("qat", f"int{bits}_qat"), ("quant_noise", f"int{bits}_qn")):
                self.add_scalar(f"int{bits}.{col}", bits, model)

        # seeds 2..N of the fp32 and iPQ rows (seed 1: the models above, the sweep's).  A seed retrains every model
        # those rows quantize (the baseline, the drop model at the p chosen on seed 1's VALID sweep, iPQ QAT, pq noise)
        # with --seed s, then the same iPQ (k-means seed s) + centroid fine-tuning (seed s), export and TEST.
        for seed in self.seeds()[1:]:
            sfx = f".s{seed}"
            sel = lambda: self.r("select_p")["p"]  # noqa: E731
            self.add_train(f"drop_p0{sfx}", noise_flags("drop", quant_noise_p=0.0), seed=seed)
            self.add_train(f"drop_psel{sfx}", lambda: noise_flags("drop", quant_noise_p=sel()), deps=["select_p"], seed=seed)
            self.add_train(f"ipq_qat{sfx}", noise_flags("pq", quant_noise_p=1.0, quant_noise_refresh_every=s["refresh"]),
                           seed=seed)
            self.add_train(f"pq_noise{sfx}", lambda: noise_flags("pq", quant_noise_p=sel(), quant_noise_refresh_every=s["refresh"]),
                           deps=["select_p"], seed=seed)
            for model in ("drop_p0", "drop_psel", "ipq_qat", "pq_noise"):
                self.add_ipq(f"{model}{sfx}", lambda m=f"{model}{sfx}": self.r(f"train_{m}")["checkpoint"],
                             deps=[f"train_{model}{sfx}"], seed=seed)

            @self.step(f"fp32{sfx}", deps=[f"train_drop_p0{sfx}"])
            def _(sfx=sfx):
                return self.export_test(f"fp32{sfx}", self.r(f"train_drop_p0{sfx}")["checkpoint"], f"fp32{sfx}",
                                        "--rest", "float32")

            for row, model in (("ipq.posthoc", "drop_p0"), ("ipq.qat", "ipq_qat"), ("ipq.quant_noise", "drop_psel"),
                               ("ipq_pq_noise", "pq_noise")):
                self.add_export(f"{row}{sfx}", lambda m=f"{model}{sfx}": self.r(f"ipq_{m}")["finetuned"],
                                deps=[f"ipq_{model}{sfx}"])

    # ------------------------------------------------------------------ the noise fine-tune, over seeds
    def seeds(self) -> List[int]:
        return list(range(1, self.f["seeds"] + 1))

    def base_step(self, seed: int) -> str:
        """The baseline seed ``seed``'s continuations start from: one shared baseline, or one per seed (--base-seeds N)."""
        return "ft_baseline" if self.f["base_seeds"] == 1 else f"ft_baseline.s{seed}"

    def define_finetune(self) -> None:
        """The noise fine-tune, for each seed: baseline -> N plain updates | N updates with each noise candidate ->
        the same iPQ + centroid fine-tuning -> the candidate chosen on VALID (mean over seeds) -> export, TEST.
        A seed reseeds everything after the baseline (the continuations' data order, dropout and noise masks, the
        k-means, the centroid fine-tuning); the baseline is shared unless --base-seeds retrains it per seed."""
        f = self.f
        names = list(f["candidates"])
        bases = sorted({self.base_step(s) for s in self.seeds()})
        for b in bases:
            bseed = int(b.rsplit(".s", 1)[1]) if ".s" in b else 1

            @self.step(b, deps=["preprocess"])
            def _(b=b, bseed=bseed):
                return self.ft_baseline(b, bseed)

            @self.step(f"test_{b}.best", deps=[b])
            def _(b=b):  # the baseline at its best VALID, on TEST: a reference that is not past its best
                return self.export_test(f"test_{b}.best", self.r(b)["best"]["checkpoint"], f"{b}.best", "--rest", "float32")

        for seed in self.seeds():
            sfx = f".s{seed}"
            for name in ["plain", *names]:
                flags = [] if name == "plain" else candidate_flags(name, self.s["refresh"])
                self.add_continue(name, flags, seed)
                self.add_ipq(f"ft_{name}{sfx}", lambda name=name, sfx=sfx: self.r(f"ft_{name}{sfx}")["checkpoint"],
                             deps=[f"ft_{name}{sfx}"], updates=f["centroid_updates"], lr=f["centroid_lr"], seed=seed)

        @self.step("ft_select", deps=[f"ipq_ft_{n}.s{s}" for n in names for s in self.seeds()])
        def _():
            def mean(key, n, src):
                return sum(self.r(f"{src}_{n}.s{s}")[key] for s in self.seeds()) / len(self.seeds())
            rows = [{"candidate": n, "flags": self.r(f"ft_{n}.s1")["flags"], "ppl_valid_fp32": mean("valid", n, "ft"),
                     "ppl_valid_ipq_no_finetune": mean("valid_noft", n, "ipq_ft"),
                     "ppl_valid_ipq": mean("valid_ft", n, "ipq_ft"),
                     "ppl_valid_ipq_seeds": [self.r(f"ipq_ft_{n}.s{s}")["valid_ft"] for s in self.seeds()]} for n in names]
            best = min(rows, key=lambda e: e["ppl_valid_ipq"])
            return {"candidate": best["candidate"], "candidates": rows,
                    "criterion": f"lowest VALID perplexity after iPQ + centroid fine-tuning, mean over {len(self.seeds())} seed(s)"}

        for seed in self.seeds():
            sfx = f".s{seed}"

            @self.step(f"test_ft.fp32{sfx}", deps=[f"ft_plain{sfx}"])
            def _(sfx=sfx):
                return self.export_test(f"test_ft.fp32{sfx}", self.r(f"ft_plain{sfx}")["checkpoint"], f"ft.fp32{sfx}",
                                        "--rest", "float32")

            self.add_export(f"ft.ipq_plain{sfx}", lambda sfx=sfx: self.r(f"ipq_ft_plain{sfx}")["finetuned"],
                            deps=[f"ipq_ft_plain{sfx}"])
            # the plain row is the iPQ of the better plain model on VALID: also iPQ the baseline's best with this
            # seed, for the seeds whose plain continuation is past it (chosen in finetune_results, on VALID)
            b = self.base_step(seed)
            self.add_ipq(f"ft_base{sfx}", lambda b=b: self.r(b)["best"]["checkpoint"], deps=[b],
                         updates=f["centroid_updates"], lr=f["centroid_lr"], seed=seed)
            self.add_export(f"ft.ipq_base{sfx}", lambda sfx=sfx: self.r(f"ipq_ft_base{sfx}")["finetuned"],
                            deps=[f"ipq_ft_base{sfx}"])
            self.add_export(f"ft.ipq_qn{sfx}",
                            lambda sfx=sfx: self.r(f"ipq_ft_{self.r('ft_select')['candidate']}{sfx}")["finetuned"],
                            deps=["ft_select"])

    def ft_baseline(self, step: str = "ft_baseline", seed: int = 1) -> dict:
        """The model the noise fine-tune starts from: --from CKPT, or the recipe's own, validated every
        ``every`` updates.  base_updates "auto": trained until VALID has not improved for ``base_patience``
        validations (fairseq's --patience), at most ``base_max`` updates, and continued from its best VALID
        checkpoint; a fixed count: trained that long and continued from its last (the convergence check:
        < 2% better over the last fifth).  Either way its best VALID checkpoint is kept as the gap's reference."""
        f, s = self.f, self.s
        if self.from_ckpt:
            check_checkpoint(self.from_ckpt, self.size, self.r("preprocess")["vocab"])
            valid = self.eval_lm(step, self.from_ckpt, "valid", step)
            return {"checkpoint": str(self.from_ckpt), "given": True, "valid": valid,
                    "best": {"checkpoint": str(self.from_ckpt), "valid": valid, "updates": None}}
        auto = f["base_updates"] == "auto"
        cap = f["base_max"] if auto else f["base_updates"]
        every = max(1, cap // (20 if auto else 10))
        extra = ["--validate-interval-updates", every, "--save-interval-updates", every, "--keep-interval-updates", 1]
        if auto:
            extra += ["--patience", f["base_patience"]]
        save = self.out / "finetune" / ("baseline" if step == "ft_baseline" else step.replace("ft_", "", 1))
        last = self.fairseq_train(step, save, extra, step, cap, s["lr"], s["warmup"], seed=seed)
        curve = {int(u): float(p) for p, u in VALID_CURVE.findall((self.out / "logs" / f"{step}.log").read_text(errors="replace"))}
        curve = [[u, curve[u]] for u in sorted(curve)]
        trained = curve[-1][0] if curve else cap
        best_u, best_v = min(curve, key=lambda c: c[1]) if curve else (trained, self.valid_ppl(step))
        best_ckpt = save / "checkpoint_best.pt"
        res = {"given": False, "auto": auto, "cap": cap, "updates": trained, "valid_curve": curve,
               "valid": curve[-1][1] if curve else best_v, "seed": seed,
               "best": {"checkpoint": str(best_ckpt if best_ckpt.is_file() else last), "updates": best_u, "valid": best_v}}
        if auto:
            stopped = trained < cap
            return {**res, "checkpoint": res["best"]["checkpoint"], "stopped_early": stopped,
                    "patience": f["base_patience"], "converged": stopped, "last_fifth_gain": None}
        at = {u: p for u, p in curve}
        u4 = cap - 2 * every  # four fifths of the way (validated there: every tenth)
        gain = (at[u4] - at[cap]) / at[u4] if u4 in at and cap in at else None
        return {**res, "checkpoint": str(last), "last_fifth_gain": gain, "converged": gain is not None and gain < 0.02}

    def ft_warmup(self) -> int:
        return max(1, self.f["updates"] // 10)

    def add_continue(self, name: str, flags: List[str], seed: int = 1) -> None:
        """The baseline continued f["updates"] updates (optimizer, lr schedule, data order restarted) with ``flags``."""
        f, step = self.f, f"ft_{name}.s{seed}"

        @self.step(step, deps=[self.base_step(seed)])
        def _():
            ckpt = self.fairseq_train(step, self.out / "finetune" / f"{name}.s{seed}",
                                      ["--restore-file", self.r(self.base_step(seed))["checkpoint"], "--reset-optimizer",
                                       "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", *flags],
                                      step, f["updates"], f["lr"], self.ft_warmup(), seed=seed)
            return {"checkpoint": str(ckpt), "flags": flags, "valid": self.valid_ppl(step)}

    def add_train(self, name: str, noise, deps=("preprocess",), seed: Optional[int] = None) -> None:
        s = self.s

        @self.step(f"train_{name}", deps=deps)
        def _():
            flags = noise() if callable(noise) else noise
            ckpt = self.fairseq_train(f"train_{name}", self.out / "train" / name, flags, f"train_{name}",
                                      s["updates"], s["lr"], s["warmup"], seed=seed)
            return {"checkpoint": str(ckpt), "flags": flags}

    def add_ipq(self, name: str, source: Callable[[], str], deps, updates: Optional[int] = None,
                lr: Optional[float] = None, seed: Optional[int] = None) -> None:
        """quantize (iPQ b=8 k=256, every Linear/Embedding) -> VALID ppl -> fine-tune centroids -> VALID ppl
        (``updates`` at ``lr``: default the size's ft_updates at lr / 3)."""
        s, step = self.s, f"ipq_{name}"
        updates, lr = updates or s["ft_updates"], lr or s["lr"] / 3

        @self.step(step, deps=deps)
        def _():
            d = self.out / "ipq" / name
            d.mkdir(parents=True, exist_ok=True)
            q = d / "q.pt"
            self.qn(step, "quantize", source(), "-o", q, "--scheme", "pq", "--block-size", IPQ["block_size"],
                    "--centroids", IPQ["centroids"], "--seed", 0 if seed is None else seed, log=step)
            noft = self.eval_lm(step, q, "valid", step)
            ckpt = self.fairseq_train(step, d / "ft", ["--restore-file", q, "--reset-optimizer", "--reset-dataloader",
                                                       "--reset-lr-scheduler", "--reset-meters"], step,
                                      updates, lr, max(1, updates // 10), seed=seed)
            return {"quantized": str(q), "finetuned": str(ckpt), "valid_noft": noft,
                    "valid_ft": self.valid_ppl(step)}

    def export_test(self, step: str, ckpt, name: str, *flags) -> dict:
        """``quantnoise export`` of ``ckpt`` to qnz/<name>.qnz (with ``flags``), then its TEST perplexity."""
        qnz = self.out / "qnz" / f"{name}.qnz"
        qnz.parent.mkdir(parents=True, exist_ok=True)
        self.qn(step, "export", ckpt, "-o", qnz, *flags, log="export")
        return {"qnz": str(qnz), "bytes": qnz.stat().st_size, "ppl": self.eval_lm(step, qnz, "test", step)}

    def add_export(self, row: str, source: Callable[[], str], deps) -> None:
        step = f"test_{row}"

        @self.step(step, deps=deps)
        def _():
            return self.export_test(step, source(), row)

    def add_scalar(self, row: str, bits: int, model: Optional[str]) -> None:
        step = f"test_{row}"

        @self.step(step, deps=[f"train_{model}"] if model else ["sweep"])
        def _():
            src = self.r(f"train_{model}")["checkpoint"] if model else self.r("sweep")["checkpoints"]["0"]
            d = self.out / "scalar"
            d.mkdir(parents=True, exist_ok=True)
            q, qnz = d / f"{row}.pt", self.out / "qnz" / f"{row}.qnz"
            qnz.parent.mkdir(parents=True, exist_ok=True)
            self.qn(step, "quantize", src, "-o", q, "--scheme", "scalar", "--bits", bits, log=step)
            self.qn(step, "export", q, "-o", qnz, log="export")
            return {"qnz": str(qnz), "bytes": qnz.stat().st_size, "ppl": self.eval_lm(step, qnz, "test", step)}

    # ------------------------------------------------------------------ the Hydra sweep
    def sweep_overrides(self) -> List[str]:
        s = self.s
        return [f"task.data={self.data}", f"task.tokens_per_sample={s['tokens']}", "task.sample_break_mode=none",
                f"common.user_dir={USER_DIR}", f"common.log_interval={max(1, s['updates'] // 10)}",
                f"dataset.max_tokens={s['max_tokens']}", f"optimization.max_update={s['updates']}",
                f"optimization.lr=[{s['lr']}]", f"lr_scheduler.warmup_updates={s['warmup']}",
                f"model.decoder_layers={s['layers']}", f"model.decoder_embed_dim={s['dim']}",
                f"model.decoder_input_dim={s['dim']}", f"model.decoder_output_dim={s['dim']}",
                f"model.decoder_ffn_embed_dim={s['ffn']}", f"model.decoder_attention_heads={s['heads']}",
                f"hydra.sweep.dir={self.out / 'sweep'}", "hydra.sweep.subdir=p${model.quant_noise_p}", "quant_noise=drop"]

    def sweep(self) -> dict:
        """``fairseq-hydra-train -m ... model.quant_noise_p=<rates>``: one job per rate, each in
        sweep/p<rate>/.  Rates whose job finished in an earlier (killed) run are not trained again."""
        root = self.out / "sweep"
        done, todo = {}, []
        for p in self.s["rates"]:
            folder = root / f"p{p}"
            ckpt, log = folder / "checkpoints" / "checkpoint_last.pt", folder / "hydra_train.log"
            if ckpt.is_file() and log.is_file() and "done training" in log.read_text(errors="replace"):
                done[p] = folder
            else:
                shutil.rmtree(folder, ignore_errors=True)
                todo.append(p)
        # with --jobs 3 or more, the rates are split over concurrent multiruns (same sweep folder, one job
        # per rate either way); each of them is an ordinary `fairseq-hydra-train -m` with the basic launcher
        groups = [todo[i::max(1, min(len(todo), (self.jobs + 1) // 2))] for i in range(max(1, min(len(todo), (self.jobs + 1) // 2)))]
        with ThreadPoolExecutor(len(groups)) as pool:
            list(pool.map(lambda ig: self.sh("sweep", [
                "fairseq-hydra-train", "-m", "--config-dir", ROOT / "configs", "--config-name", "lm_recipe",
                *self.sweep_overrides(), "model.quant_noise_p=" + ",".join(str(p) for p in ig[1])],
                f"sweep{ig[0] if len(groups) > 1 else ''}", cwd=self.out), enumerate(g for g in groups if g)))
        ckpts, fp32 = {}, {}
        for p in self.s["rates"]:
            folder = root / f"p{p}"
            ckpt = folder / "checkpoints" / "checkpoint_last.pt"
            log = (folder / "hydra_train.log").read_text(errors="replace") if (folder / "hydra_train.log").is_file() else ""
            if not ckpt.is_file() or "done training" not in log:
                raise RuntimeError(f"sweep job p={p} did not finish; see {folder / 'hydra_train.log'} and {self.out / 'logs' / 'sweep.log'}")
            ckpts[f"{p:g}"] = str(ckpt)
            m = VALID_PPL.findall(log)
            fp32[f"{p:g}"] = float(m[-1][1]) if m else None
        return {"checkpoints": ckpts, "valid_fp32": fp32}

    # ------------------------------------------------------------------ scheduling
    def run(self) -> int:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out / "logs" / "quantnoise.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        (self.out / "steps").mkdir(parents=True, exist_ok=True)
        (self.out / "qnz").mkdir(parents=True, exist_ok=True)
        self.cpu: Dict[str, float] = {}
        self.define()
        for name in self.steps:
            marker = self.out / "steps" / f"{name}.json"
            if marker.is_file():
                self.results[name] = json.loads(marker.read_text())["result"]
        todo = [n for n in self.steps if n not in self.results]
        total = len(self.steps)
        skipped = total - len(todo)
        if skipped:
            self.progress(f"resuming: {skipped} of {total} steps already done (OUTDIR/steps/*.json)")
        failed = None
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            running = {}
            while todo or running:
                if failed is None:
                    for name in [n for n in todo if all(d in self.results for d in self.steps[n]["deps"])]:
                        if len(running) >= self.jobs:
                            break
                        todo.remove(name)
                        running[pool.submit(self.run_step, name)] = name
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    try:
                        fut.result()
                    except Exception as e:  # noqa: BLE001 -- reported as one line, the run stops
                        failed = failed or f"step {name} failed: {e}"
                        self.progress(f"FAILED {name}: {e}")
        if failed:
            print(f"run.sh: {failed}; fix it and rerun the same command (finished steps are kept)", file=sys.stderr)
            return 1
        self.progress(f"done: {self.out / 'results.md'}")
        return 0

    def run_step(self, name: str) -> None:
        start = time.time()
        result = self.steps[name]["fn"]() or {}
        wall = time.time() - start
        with self.lock:
            self.results[name] = result
            n = len(self.results)
        atomic_write_text(self.out / "steps" / f"{name}.json", json.dumps(
            {"result": result, "wall_s": round(wall, 1), "cpu_s": round(self.cpu.get(name, 0.0), 1)}, indent=1))
        self.progress(f"[{n:2d}/{len(self.steps)}] {name:24s} {self.summary(name, result)} ({wall:.0f} s, "
                      f"cpu {self.cpu.get(name, 0.0):.0f} s)")

    @staticmethod
    def summary(name: str, r: dict) -> str:
        if "ppl" in r:
            return f"test ppl {r['ppl']:.2f}, {r['bytes'] / 2**20:.3f} MiB"
        if "valid_ft" in r:
            return f"valid ppl iPQ {r['valid_noft']:.2f}, fine-tuned {r['valid_ft']:.2f}"
        if name == "select_p":
            return f"p = {r['p']:g} ({r['criterion']})"
        if name == "sweep":
            return "valid ppl fp32 " + ", ".join(f"p={p}: {v:.2f}" if v else f"p={p}: ?" for p, v in r["valid_fp32"].items())
        if name == "preprocess":
            return f"vocabulary {r['vocab']} words"
        if name == "ft_select":
            return f"noise {r['candidate']} ({r['criterion']})"
        if name.startswith("ft_baseline") and r.get("auto"):
            return (f"valid ppl best {r['best']['valid']:.2f} at {r['best']['updates']} updates, "
                    + (f"stopped at {r['updates']} (patience {r['patience']})" if r["stopped_early"] else
                       f"still improving at the cap of {r['cap']}"))
        if name.startswith("ft_baseline") and r.get("last_fifth_gain") is not None:
            return f"valid ppl {r['valid']:.2f}, {fifth(r['last_fifth_gain'])} ({verdict(r['converged'], r['last_fifth_gain'])})"
        if "valid" in r:
            return f"valid ppl {r['valid']:.2f}"
        return "ok"

    def progress(self, msg: str) -> None:
        el = int(time.time() - self.t0)
        print(f"[{el // 60:3d}m{el % 60:02d}s] {msg}", file=sys.__stdout__, flush=True)

    # ------------------------------------------------------------------ results
    def cpu_account(self) -> dict:
        """CPU seconds of the fairseq processes per step (from steps/*.json), their sum, and the longest
        dependency chain: on an idle machine with --jobs cores the run needs about max(sum / jobs, chain)
        seconds.  The in-process quantnoise commands (quantize, export) are in ``driver_s`` (this run only)."""
        import resource

        cpu = {}
        for n in self.steps:
            f = self.out / "steps" / f"{n}.json"
            cpu[n] = json.loads(f.read_text())["cpu_s"] if f.is_file() else 0.0
        chain: Dict[str, float] = {}

        def longest(n: str) -> float:
            if n not in chain:
                chain[n] = cpu[n] + max((longest(d) for d in self.steps[n]["deps"]), default=0.0)
            return chain[n]

        for n in self.steps:
            longest(n)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"per_step_s": cpu, "fairseq_total_s": round(sum(cpu.values()), 1),
                "critical_path_s": round(max(chain.values()), 1), "driver_s": round(ru.ru_utime + ru.ru_stime, 1)}

    def report(self) -> dict:
        res = self.table_results() if "table" in self.parts else {
            "details": {"size": self.size, "model": {k: self.s[k] for k in ("layers", "dim", "ffn", "heads")},
                        "tokens_per_update": self.s["max_tokens"], "ipq": IPQ, "vocab": self.r("preprocess")["vocab"],
                        "corpus": {k: str(v) for k, v in self.corpus.items()}}}
        if "finetune" in self.parts:
            res["finetune"] = self.finetune_results()
        res["details"]["cpu"] = self.cpu_account()
        atomic_write_text(self.out / "results.json", json.dumps(res, indent=1))
        atomic_write_text(self.out / "results.md", markdown(res))
        if "table" in self.parts:
            plot(res, self.out / "results.png")
        if "finetune" in self.parts:
            plot_quality(res["finetune"], self.out / "quality_vs_size.png")
        write_record("lm_recipe", res, command=self.command, out=self.out / "record.json")
        if self.record:
            write_record(self.record.stem, res, command=self.command, out=self.record)
        return {"results": str(self.out / "results.json")}

    def finetune_results(self) -> dict:
        """Per seed: the reference fp32 (the better on VALID of the plain continuation and the baseline's best
        checkpoint: never a model past its best), the plain row (iPQ of that reference model: a plain model past
        its best would inflate the cut) and the noise row, their gaps to the reference and the cut; over
        seeds: the mean cut with a 90% t interval (the cuts are paired: a seed's two rows share everything but the
        noise).  A seed whose noise model after iPQ beats the reference is regularisation, not a cut."""
        f, sel = self.f, self.r("ft_select")
        per_seed = []
        for s in self.seeds():
            b, best = self.r(self.base_step(s)), self.r(f"test_{self.base_step(s)}.best")
            fp32, plain_valid = self.r(f"test_ft.fp32.s{s}"), self.r(f"ft_plain.s{s}")["valid"]
            cont = self.r(f"test_ft.ipq_plain.s{s}")  # iPQ of the plain continuation
            if b["best"]["valid"] < plain_valid:
                ref = {"from": "baseline_best", "ppl": best["ppl"], "valid": b["best"]["valid"],
                       "updates": b["best"]["updates"]}
                plain = self.r(f"test_ft.ipq_base.s{s}")
            else:
                ref = {"from": "plain", "ppl": fp32["ppl"], "valid": plain_valid}
                plain = cont
            qn = self.r(f"test_ft.ipq_qn.s{s}")
            gp, gq = plain["ppl"] - ref["ppl"], qn["ppl"] - ref["ppl"]
            per_seed.append({"seed": s, "fp32": {"ppl": fp32["ppl"], "bytes": fp32["bytes"], "valid": plain_valid},
                             "reference": ref, "ipq_plain": {k: plain[k] for k in ("ppl", "bytes")},
                             "ipq_plain_continuation": {k: cont[k] for k in ("ppl", "bytes")},
                             "ipq_qn": {k: qn[k] for k in ("ppl", "bytes")}, "gap_plain": gp, "gap_qn": gq,
                             "gap_cut": 1 - gq / gp if gp > 0 else None, "regularised": gq < 0})
        cuts = [e["gap_cut"] for e in per_seed if e["gap_cut"] is not None]

        def mean_row(key):
            iv = interval(e[key]["ppl"] for e in per_seed)
            return {"ppl": iv["mean"], "bytes": per_seed[0][key]["bytes"], "ppl_interval": iv}

        res = {"updates": f["updates"], "seeds": per_seed, "gap_cut": interval(cuts),
               "ppl_gain": interval(e["ipq_plain"]["ppl"] - e["ipq_qn"]["ppl"] for e in per_seed),
               "regularised_seeds": sum(e["regularised"] for e in per_seed),
               "fp32": mean_row("fp32"), "ipq_plain": mean_row("ipq_plain"), "ipq_qn": mean_row("ipq_qn"),
               "reference": {"ppl": interval(e["reference"]["ppl"] for e in per_seed)["mean"],
                             "from": sorted({e["reference"]["from"] for e in per_seed})},
               "interval": "mean over seeds +- t(0.95, n-1) * sd / sqrt(n) of the per-seed cuts (paired: a seed's "
                           "plain and noise rows share the baseline, data order and every seed but the noise)",
               "noise": sel["candidate"], "candidates": sel["candidates"], "criterion": sel["criterion"],
               "valid": {"plain_fp32": interval(self.r(f"ft_plain.s{s}")["valid"] for s in self.seeds())["mean"],
                         "plain_ipq_no_finetune": interval(self.r(f"ipq_ft_plain.s{s}")["valid_noft"] for s in self.seeds())["mean"],
                         "plain_ipq": interval(self.r(f"ipq_ft_plain.s{s}")["valid_ft"] for s in self.seeds())["mean"]},
               "baseline": {k: self.r(self.base_step(1)).get(k) for k in (
                   "checkpoint", "given", "auto", "cap", "updates", "valid", "valid_curve", "best", "stopped_early",
                   "patience", "last_fifth_gain", "converged")},
               "base_seeds": f["base_seeds"],
               "settings": {"warmup": self.ft_warmup(), **{k: f[k] for k in ("lr", "centroid_updates", "centroid_lr")}}}
        res["verdict"] = cut_verdict(res)
        return res

    TABLE_SEEDED = {"fp32": "fp32", "ipq.posthoc": "test_ipq.posthoc", "ipq.qat": "test_ipq.qat",
                    "ipq.quant_noise": "test_ipq.quant_noise", "ipq_pq_noise": "test_ipq_pq_noise"}

    def table_seeds(self) -> dict:
        """The fp32 and iPQ rows over seeds: per seed their TEST perplexity and each iPQ training's cut of the
        post-hoc gap (``1 - (row - fp32) / (posthoc - fp32)``, paired: a seed's rows share its seed); over seeds the
        mean with a 90% t interval.  A cut above 100% (the row beats that seed's fp32) is regularisation."""
        noisy = ("ipq.qat", "ipq.quant_noise", "ipq_pq_noise")
        per_seed = []
        for seed in self.seeds():
            sfx = "" if seed == 1 else f".s{seed}"
            e = {"seed": seed, **{row: self.r(step + sfx)["ppl"] for row, step in self.TABLE_SEEDED.items()}}
            gap = e["ipq.posthoc"] - e["fp32"]
            e["gap_cut"] = {row: (1 - (e[row] - e["fp32"]) / gap if gap > 0 else None) for row in noisy}
            per_seed.append(e)
        return {"seeds": per_seed, "ppl": {row: interval(e[row] for e in per_seed) for row in self.TABLE_SEEDED},
                "gap_cut": {row: interval(e["gap_cut"][row] for e in per_seed if e["gap_cut"][row] is not None)
                            for row in noisy},
                "interval": "mean over seeds +- t(0.95, n-1) * sd / sqrt(n); seed 1 is the sweep's models, seed s "
                            "retrains the baseline, the drop model at the chosen p, iPQ QAT and pq noise with --seed s "
                            "and runs the iPQ k-means and centroid fine-tuning with seed s"}

    def table_results(self) -> dict:
        res = {"fp32": {k: self.r("fp32")[k] for k in ("ppl", "bytes")}}
        for kind in ("ipq", "int4", "int8"):
            res[kind] = {col: {k: self.r(f"test_{kind}.{col}")[k] for k in ("ppl", "bytes")}
                         for col in ("posthoc", "qat", "quant_noise")}
        res["ipq_pq_noise"] = {k: self.r("test_ipq_pq_noise")[k] for k in ("ppl", "bytes")}
        seeds = self.table_seeds()
        if len(self.seeds()) > 1:  # the fp32 and iPQ rows become the mean over seeds, with their interval
            for row in self.TABLE_SEEDED:
                e = res[row] if row in res else res["ipq"][row.split(".")[1]]
                e.update(ppl=seeds["ppl"][row]["mean"], ppl_seed1=e["ppl"], ppl_interval=seeds["ppl"][row])
        res["seeds"] = seeds
        res["sweep"] = self.r("select_p")["sweep"]
        s = self.s
        sel = self.r("select_p")["p"]
        res["details"] = {
            "size": self.size, "model": {k: s[k] for k in ("layers", "dim", "ffn", "heads")},
            "updates": s["updates"], "finetune_updates": s["ft_updates"], "tokens_per_update": s["max_tokens"],
            "ipq": IPQ, "vocab": self.r("preprocess")["vocab"], "drop_p_chosen_on_valid": sel,
            "noise": {"ipq.quant_noise": f"drop p={sel:g}", "ipq_pq_noise": f"pq p={sel:g}",
                      "ipq.qat": "pq p=1", **{f"{k[:4]}.{'qat' if 'qat' in k else 'quant_noise'}": " ".join(v)
                                              for k, v in ((n, self.r(f"train_{n}")["flags"]) for n in SCALAR_RUNS)}},
            "valid": {"fp32": self.r("fp32")["ppl_valid"],
                      "ipq_no_finetune": {"posthoc": self.r("ipq_drop_p0")["valid_noft"], "qat": self.r("ipq_ipq_qat")["valid_noft"],
                                          "quant_noise": self.r(f"ipq_drop_p{sel:g}")["valid_noft"],
                                          "pq_noise": self.r("ipq_pq_noise")["valid_noft"]},
                      "ipq_finetuned": {"posthoc": self.r("ipq_drop_p0")["valid_ft"], "qat": self.r("ipq_ipq_qat")["valid_ft"],
                                        "quant_noise": self.r(f"ipq_drop_p{sel:g}")["valid_ft"],
                                        "pq_noise": self.r("ipq_pq_noise")["valid_ft"]}},
            "corpus": {k: str(v) for k, v in self.corpus.items()},
        }
        return res


def markdown(res: dict) -> str:
    lines = table_markdown(res) if "fp32" in res else [f"# Noise fine-tune on this corpus ({res['details']['size']})", ""]
    if "finetune" in res:
        lines += finetune_markdown(res["finetune"], res["details"])
    return "\n".join(lines)


def verdict(converged: bool, gain) -> str:
    """The < 2% rule in words: an overfitting baseline (VALID worse over the last fifth) has stopped improving,
    so the rule calls it converged, but past its best."""
    if gain is not None and gain < 0:
        return "converged by the < 2% rule, but past its best VALID"
    return "converged by the < 2% rule" if converged else "NOT converged by the < 2% rule"


def fifth(gain: float) -> str:
    """The convergence check's figure in words (a negative gain: VALID got worse, the model overfits)."""
    if gain < 0:
        return f"{-100 * gain:.1f}% worse over the last fifth (overfitting: a shorter baseline or a larger corpus)"
    return f"{100 * gain:.1f}% better over the last fifth"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def cut_verdict(ft: dict) -> str:
    """The cut over seeds in one line; never a cut above 100% (that is the noise regularising the model)."""
    c, n, k = ft["gap_cut"], len(ft["seeds"]), ft["regularised_seeds"]
    if k:
        return (f"regularisation, not a cut: in {k} of {n} seed(s) the noise model after iPQ has a lower test perplexity "
                f"than the fp32 reference (the noise acts as a regulariser of an overfitting model; no cut is reported)")
    if c["n"] == 0:
        return "n/a (no gap: iPQ of the plain continuation is no worse than the reference)"
    span = f", 90% interval {pct(c['lo90'])} to {pct(c['hi90'])}" if c["n"] > 1 else " (one seed: no interval)"
    return f"cut by {pct(c['mean'])} (mean of {c['n']} seed(s){span})"


def finetune_markdown(ft: dict, d: dict) -> List[str]:
    b = ft["baseline"]
    f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    if b["given"]:
        origin = f"the given checkpoint {pathlib.Path(b['checkpoint']).name} (VALID {f(b['valid'])})"
    elif b.get("auto"):
        stop = (f"stopped by patience {b['patience']} at {b['updates']} updates" if b["stopped_early"] else
                f"NOT stopped by patience {b['patience']}: VALID still improving at the cap of {b['cap']} updates")
        origin = (f"the recipe's baseline, trained until VALID stopped improving ({stop}); continued from its best "
                  f"VALID checkpoint ({b['best']['updates']} updates, VALID {f(b['best']['valid'])})")
    else:
        origin = f"the recipe's baseline, {b['updates']} updates (VALID {f(b['valid'])}"
        origin += (f"; {fifth(b['last_fifth_gain'])}: {verdict(b['converged'], b['last_fifth_gain'])})"
                   if b.get("last_fifth_gain") is not None else ")")
    st, n = ft["settings"], len(ft["seeds"])
    shared = "one baseline shared by every seed" if ft.get("base_seeds", 1) == 1 else "one baseline per seed"
    lines = ["## Noise fine-tune of a trained model (TEST of the exported `.qnz`)", "",
             f"From {origin}: {ft['updates']} more updates without noise (plain) and with noise ({ft['noise']}, "
             f"chosen on VALID), lr {st['lr']:g} (inverse_sqrt, warmup {st['warmup']}), then for both iPQ (b={d['ipq']['block_size']}, "
             f"k={d['ipq']['centroids']}, every layer) + {st['centroid_updates']} centroid fine-tuning updates (lr {st['centroid_lr']:g}). "
             f"{n} seed(s), {shared}; a seed reseeds the continuations, the k-means and the centroid fine-tuning.", "",
             "The reference fp32 of each seed is the better on VALID of its plain continuation and the baseline's best "
             "VALID checkpoint (a model not past its best); the plain iPQ row is the iPQ of that model; the gap is the iPQ "
             "test perplexity minus the reference's.", "",
             "| seed | reference fp32 (from) | fp32 plain continuation | iPQ of plain | iPQ of noise | gap plain | gap noise | cut |",
             "|---|---|---|---|---|---|---|---|"]
    for e in ft["seeds"]:
        cut = "regularisation" if e["regularised"] else pct(e["gap_cut"])
        lines.append(f"| {e['seed']} | {e['reference']['ppl']:.2f} ({e['reference']['from']}) | {e['fp32']['ppl']:.2f} | "
                     f"{e['ipq_plain']['ppl']:.2f} | {e['ipq_qn']['ppl']:.2f} | {e['gap_plain']:+.2f} | {e['gap_qn']:+.2f} | {cut} |")
    fp = ft["fp32"]["bytes"]
    lines += ["", f"Files: fp32 {fp / 2**20:.3f} MiB; iPQ {ft['ipq_plain']['bytes'] / 2**20:.3f} MiB (x{fp / ft['ipq_plain']['bytes']:.1f}), "
              f"noise model's iPQ {ft['ipq_qn']['bytes'] / 2**20:.3f} MiB (x{fp / ft['ipq_qn']['bytes']:.1f}).", "",
              f"**iPQ gap {cut_verdict(ft)}** (goal: 50%). {ft['interval']}.", "",
              "Candidates (VALID, mean over seeds; the lowest after iPQ + centroid fine-tuning is chosen):", "",
              "| continuation | valid ppl fp32 | iPQ, no fine-tune | iPQ + fine-tune |", "|---|---|---|---|",
              f"| plain | {f(ft['valid']['plain_fp32'])} | {f(ft['valid']['plain_ipq_no_finetune'])} | {f(ft['valid']['plain_ipq'])} |"]
    lines += [f"| {e['candidate']} | {f(e['ppl_valid_fp32'])} | {f(e['ppl_valid_ipq_no_finetune'])} | {f(e['ppl_valid_ipq'])} |"
              for e in ft["candidates"]]
    return lines + [""]


def plot_quality(ft: dict, path: pathlib.Path) -> None:
    """Test perplexity against file bytes (log axis): one point per method, the seeds' 90% interval as error bars,
    the reference fp32 as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ref = interval(e["reference"]["ppl"] for e in ft["seeds"])
    ax.axhline(ref["mean"], color="black", lw=1, label=f"fp32 reference ({ref['mean']:.1f})")
    for key, label, color, marker, dx in (("fp32", "fp32, plain continuation", "gray", "D", 1.0),
                                          ("ipq_plain", "iPQ of the plain continuation", "tab:blue", "o", 0.96),
                                          ("ipq_qn", f"iPQ of the noise fine-tune ({ft['noise']})", "tab:red", "*", 1.04)):
        iv = interval(e[key]["ppl"] for e in ft["seeds"])
        err = [[iv["mean"] - iv["lo90"]], [iv["hi90"] - iv["mean"]]] if iv["n"] > 1 else None
        # the two iPQ files have the same size: drawn 4% apart so their intervals do not hide each other
        ax.errorbar([ft[key]["bytes"] * dx], [iv["mean"]], yerr=err, fmt=marker, color=color, capsize=4,
                    markersize=10 if marker == "*" else 6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(".qnz file size (bytes, log scale)")
    ax.set_ylabel("test perplexity")
    n = len(ft["seeds"])
    ax.set_title(f"noise fine-tune + iPQ: {n} seed(s), 90% interval" if n > 1 else "noise fine-tune + iPQ (one seed)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from quantnoise.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def table_markdown(res: dict) -> List[str]:
    fp = res["fp32"]
    d = res["details"]

    def ppl(e):
        iv = e.get("ppl_interval")
        return f"{e['ppl']:.2f}" + (f" ± {(iv['hi90'] - iv['lo90']) / 2:.2f}" if iv and iv["lo90"] is not None else "")

    def cell(e):
        return f"{ppl(e)} ({e['bytes'] / 2**20:.3f} MiB, x{fp['bytes'] / e['bytes']:.1f})"

    lines = [f"# Quant-Noise on this corpus ({d['size']}: {d['model']['layers']} layers, {d['model']['dim']}-d, "
             f"FFN {d['model']['ffn']}, vocabulary {d['vocab']}; {d['updates']} updates of {d['tokens_per_update']} tokens)", "",
             "Test perplexity of the exported `.qnz` file (fairseq-eval-lm), its size and compression ratio to the fp32 file.",
             "Columns as in Fan et al. 2020, Table 1/2: post-hoc = quantize the plain model; QAT = train with every block",
             "quantized (p = 1; for iPQ: pq noise at p = 1); Quant-Noise = train with noise at rate p.", "",
             "| | post-hoc | QAT | Quant-Noise |", "|---|---|---|---|",
             f"| fp32 | {ppl(fp)} ({fp['bytes'] / 2**20:.3f} MiB) | | |"]
    for kind in ("int8", "int4", "ipq"):
        label = {"ipq": f"iPQ (b={d['ipq']['block_size']}, k={d['ipq']['centroids']}, + {d['finetune_updates']} fine-tune updates)"}.get(kind, kind)
        lines.append(f"| {label} | " + " | ".join(cell(res[kind][c]) for c in ("posthoc", "qat", "quant_noise")) + " |")
    lines += ["", f"iPQ with true pq noise (p = {d['drop_p_chosen_on_valid']:g}) instead of the drop proxy: {cell(res['ipq_pq_noise'])}.",
              ""]
    gap_post = res["ipq"]["posthoc"]["ppl"] - fp["ppl"]
    gap_qn = res["ipq"]["quant_noise"]["ppl"] - fp["ppl"]
    seeds = res.get("seeds")
    if seeds and len(seeds["seeds"]) > 1:
        n = len(seeds["seeds"])
        lines += [f"Rows fp32 and iPQ: mean ± half the 90% interval over {n} seeds ({seeds['interval']}); int8 / int4: "
                  f"seed 1 only.", ""]
        for row in ("ipq.quant_noise", "ipq_pq_noise", "ipq.qat"):
            iv = seeds["gap_cut"][row]
            per = ", ".join(pct(e["gap_cut"][row]) for e in seeds["seeds"])
            what = ("not cut: no seed's post-hoc iPQ is worse than its fp32" if not iv["n"] else
                    "regularisation, not a cut (the mean row beats fp32)" if iv["mean"] > 1 else
                    f"cut by {pct(iv['mean'])} (90% interval {pct(iv['lo90'])} to {pct(iv['hi90'])}, {iv['n']} seeds "
                    f"with a gap)")
            lines.append(f"- {row}: iPQ gap to fp32 {what}; per seed {per}.")
        lines += ["", "(Paper: 65%.)", ""]
    else:
        cut = f"{100 * (1 - gap_qn / gap_post):.0f}%" if gap_post > 0 else "n/a (no gap)"
        lines += [f"iPQ gap to the baseline's fp32 (test): post-hoc {gap_post:+.2f}, Quant-Noise {gap_qn:+.2f}: cut by {cut} "
                  f"(paper: 65%).", ""]
    lines += [
              f"Noise: " + "; ".join(f"{k}: {v}" for k, v in d["noise"].items()) + ".", "",
              "## Noise-rate sweep (VALID; chooses p)", "", "| p | valid ppl fp32 | valid ppl iPQ (no fine-tune) | valid ppl iPQ + fine-tune |",
              "|---|---|---|---|"]
    for e in res["sweep"]:
        f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {e['p']:g} | {f(e['ppl_valid_fp32'])} | {f(e['ppl_valid_ipq_no_finetune'])} | {f(e['ppl_valid_ipq'])} |")
    lines += ["", f"Chosen p = {d['drop_p_chosen_on_valid']:g} (lowest VALID perplexity after iPQ + fine-tuning). "
              "Plot: `sweep.png` (`quantnoise sweep-report`), table `sweep_report.md`.", ""]
    return lines


def plot(res: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    markers = {"posthoc": "o", "qat": "s", "quant_noise": "*"}
    colors = {"int8": "tab:blue", "int4": "tab:orange", "ipq": "tab:green"}
    def point(e, **kw):  # a seeded row: its mean with the 90% interval as an error bar
        iv = e.get("ppl_interval") or {}
        yerr = [[e["ppl"] - iv["lo90"]], [iv["hi90"] - e["ppl"]]] if iv.get("lo90") is not None else None
        ax.errorbar([e["bytes"] / 2**20], [e["ppl"]], yerr=yerr, linestyle="none", capsize=3, **kw)

    point(res["fp32"], marker="D", color="black", label="fp32")
    for kind in ("int8", "int4", "ipq"):
        for col, mk in markers.items():
            point(res[kind][col], marker=mk, markersize=10 if mk == "*" else 6, color=colors[kind], label=f"{kind} {col}")
    point(res["ipq_pq_noise"], marker="P", color="tab:red", label="ipq pq noise")
    ax.set_xscale("log")
    ax.set_xlabel(".qnz file size (MiB, log scale)")
    ax.set_ylabel("test perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="run.sh", description=__doc__.splitlines()[0])
    ap.add_argument("train", type=pathlib.Path, help="TRAIN.txt: plain text, one sentence or paragraph per line")
    ap.add_argument("valid", type=pathlib.Path, help="VALID.txt: chooses the noise rate")
    ap.add_argument("test", type=pathlib.Path, help="TEST.txt: only the final table")
    ap.add_argument("outdir", type=pathlib.Path, help="output folder (rerun with the same arguments to resume)")
    ap.add_argument("--size", choices=["small", "base", "tiny"], default="small",
                    help="model size and training length (recipes/lm/README.md; tiny: for tests)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="steps run at once (default: 2, one thread each, on 2+ cores)")
    ap.add_argument("--from", dest="from_ckpt", type=pathlib.Path, metavar="CKPT",
                    help="noise fine-tune: start from this trained checkpoint (a qn_transformer_lm of --size, trained on "
                         "TRAIN's vocabulary) instead of training the recipe's baseline")
    ap.add_argument("--only", choices=["table", "finetune"],
                    help="run one part: the from-scratch table, or the noise fine-tune (default: both)")
    ap.add_argument("--ft-updates", type=int, metavar="N", help="noise fine-tune: updates of each continuation "
                    "(default: the size's, recipes/lm/README.md)")
    ap.add_argument("--ft-base-updates", metavar="U|auto", help="noise fine-tune: updates of the recipe's own "
                    "baseline, or 'auto': until VALID stops improving (--ft-base-patience validations), at most "
                    "--ft-base-max updates, continued from its best checkpoint (default: the size's; ignored with --from)")
    ap.add_argument("--ft-base-max", type=int, metavar="U", help="noise fine-tune: the cap of an 'auto' baseline "
                    "(default: the size's)")
    ap.add_argument("--ft-base-patience", type=int, metavar="P", help="noise fine-tune: validations without a better "
                    "VALID before an 'auto' baseline stops (default: the size's)")
    ap.add_argument("--ft-centroid-updates", type=int, metavar="N", help="noise fine-tune: centroid fine-tuning "
                    "updates after iPQ, the same for every row (default: the size's)")
    ap.add_argument("--seeds", type=int, metavar="N", help="seeds, paired, with a 90%% interval over them (default: the "
                    "size's; small: 3): the noise fine-tune reruns everything after the baseline per seed, the "
                    "from-scratch table retrains the models of its fp32 and iPQ rows per seed")
    ap.add_argument("--base-seeds", type=int, metavar="M", help="noise fine-tune: 1 (default) shares one baseline, "
                    "M = --seeds trains one baseline per seed")
    ap.add_argument("--record", type=pathlib.Path, metavar="JSON", help="also write the run's record (command, "
                    "commit, machine, figures) here, e.g. results/<name>.json (always written to OUTDIR/record.json)")
    ap.add_argument("--ft-candidates", metavar="LIST", help="noise fine-tune: comma-separated <drop|pq>_p<rate>[_vocab] "
                    "candidates, one chosen on VALID (default: the size's)")
    a = ap.parse_args(argv)
    overrides = {}
    try:
        if a.jobs < 1:
            raise RecipeError(f"--jobs {a.jobs} is invalid; use 1 or more")
        if a.ft_updates is not None:
            if a.ft_updates < 1:
                raise RecipeError(f"--ft-updates {a.ft_updates} is invalid; use 1 or more")
            overrides["updates"] = a.ft_updates
        if a.ft_base_updates is not None:
            if a.ft_base_updates != "auto" and not (a.ft_base_updates.isdigit() and int(a.ft_base_updates) >= 1):
                raise RecipeError(f"--ft-base-updates {a.ft_base_updates} is invalid; use a count of 1 or more, or auto")
            overrides["base_updates"] = "auto" if a.ft_base_updates == "auto" else int(a.ft_base_updates)
        for key, value in (("base_max", a.ft_base_max), ("base_patience", a.ft_base_patience), ("seeds", a.seeds),
                           ("centroid_updates", a.ft_centroid_updates)):
            if value is not None:
                if value < 1:
                    raise RecipeError(f"--{'seeds' if key == 'seeds' else 'ft-' + key.replace('_', '-')} {value} is "
                                      f"invalid; use 1 or more")
                overrides[key] = value
        if a.base_seeds is not None:
            seeds = overrides.get("seeds", FINETUNE[a.size]["seeds"])
            if a.base_seeds not in (1, seeds):
                raise RecipeError(f"--base-seeds {a.base_seeds} is invalid with {seeds} seed(s); use 1 (one shared "
                                  f"baseline) or {seeds} (one per seed)")
            overrides["base_seeds"] = a.base_seeds
        if a.ft_candidates is not None:
            cands = [c for c in a.ft_candidates.split(",") if c]
            if not cands:
                raise RecipeError(f"--ft-candidates '{a.ft_candidates}' names no candidate; e.g. drop_p0.3,pq_p0.5")
            for c in cands:
                candidate_flags(c, 1)
            overrides["candidates"] = cands
        if a.from_ckpt and overrides.get("base_seeds", 1) > 1:
            raise RecipeError("--base-seeds retrains the baseline per seed, --from gives one; drop one of them")
        if a.only == "table" and (a.from_ckpt or set(overrides) - {"seeds"}):
            raise RecipeError("--from and --ft-* belong to the noise fine-tune; drop them, or drop --only table")
        check_inputs(a.train, a.valid, a.test, a.outdir)
        if a.from_ckpt:
            check_checkpoint(a.from_ckpt, a.size)
        fp = fingerprint((a.train, a.valid, a.test), a.size)
        if a.from_ckpt:  # a resumed run must start from the same checkpoint
            fp["from"] = {"path": str(a.from_ckpt.resolve()), "sha1": hashlib.sha1(a.from_ckpt.read_bytes()).hexdigest()}
        if overrides:
            fp["finetune"] = overrides
        stamp = a.outdir / "recipe.json"
        if stamp.is_file():
            old = json.loads(stamp.read_text())
            if old != fp:
                raise RecipeError(f"OUTDIR '{a.outdir}' holds a run with other inputs or size ({stamp}); pass a new OUTDIR, "
                                  f"or the same corpus files, --size, --from and --ft-* values to resume it")
        elif a.outdir.is_dir() and any(a.outdir.iterdir()):
            raise RecipeError(f"OUTDIR '{a.outdir}' is a non-empty folder that is not a recipe run (no recipe.json); "
                              f"pass a new or empty folder")
    except RecipeError as e:
        print(f"run.sh: {e}", file=sys.stderr)
        return 2
    a.outdir.mkdir(parents=True, exist_ok=True)
    if not (a.outdir / "recipe.json").is_file():
        atomic_write_text(a.outdir / "recipe.json", json.dumps(fp, indent=1))
    parts = (a.only,) if a.only else ("table", "finetune")
    recipe = Recipe(a.train, a.valid, a.test, a.outdir, a.size, a.jobs, parts, a.from_ckpt, overrides)
    recipe.record = a.record.resolve() if a.record else None
    return recipe.run()


if __name__ == "__main__":
    sys.exit(main())
