"""The one harness every benchmark and recipe records with.

A record is one JSON file, ``results/<name>.json``::

    {"name": ..., "command": "...", "commit": "7907864", "dirty": false, "date": "2026-12-07T19:02:11Z",
     "machine": {"cpu": "...", "isa": "avx512", "cores": 2, "threads": 1, "load_avg": [..], "versions": {...}},
     "figures": {...}}

``figures`` is the benchmark's own (``scripts/report.py`` renders BENCHMARKS.md's tables from them).  Records
are written atomically (temp file, then rename).  ``interval`` is the seeds' interval the recipes report.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    """The widest x86 vector extension this CPU has (what the compiled kernels are built for: -march=native)."""
    try:
        flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo", encoding="utf-8")
                      if l.startswith("flags")), [])
    except OSError:
        flags = []
    for name in ("avx512f", "avx2", "avx", "sse4_2"):
        if name in flags:
            return name.replace("avx512f", "avx512")
    return platform.machine()


def versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "fairseq-fixed", "faiss-cpu", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def commit() -> Dict[str, object]:
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine(threads: Optional[int] = None) -> dict:
    """What a figure was measured on: CPU model, instruction set, cores, threads, load, versions."""
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            threads = None
    return {"cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(), "threads": threads,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "versions": versions()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def this_command() -> list:
    """This process' command line as a reader would type it from the repository root: ``python benchmarks/x.py ...``
    (a script inside the repository by its relative path, whether it was run as a file or with ``-m``)."""
    script = pathlib.Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        script = pathlib.Path(script.name)
    return ["python" if script.suffix == ".py" else "", str(script), *sys.argv[1:]]


def record(name: str, figures: dict, command: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> dict:
    """A record of ``figures`` made by ``command`` (default: this process' command line)."""
    argv = [a for a in (list(command) if command is not None else this_command()) if a != ""]
    return {"name": name, "command": " ".join(shlex.quote(str(a)) for a in argv), **commit(), "date": now(),
            "machine": machine(threads), "figures": figures}


def write_json(path: pathlib.Path, data) -> pathlib.Path:
    """``data`` as JSON at ``path``, through quantnoise's atomic write (temp file, fsync, rename)."""
    from quantnoise.checkpoint import atomic_write

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_record(name: str, figures: dict, command: Optional[Sequence[str]] = None, out: Optional[pathlib.Path] = None,
                 threads: Optional[int] = None) -> pathlib.Path:
    """Write ``results/<name>.json`` (or ``out``) atomically; returns its path."""
    return write_json(out or RESULTS / f"{name}.json", record(name, figures, command, threads))


def add_record_arg(parser, name: str) -> None:
    """``--record PATH`` (default ``results/<name>.json``; ``--record -`` writes none), the same in every benchmark."""
    parser.add_argument("--record", default=str(RESULTS / f"{name}.json"), metavar="PATH",
                        help=f"write the run's record here (default results/{name}.json; '-': none)")


def save(name: str, figures: dict, path: str, threads: Optional[int] = None) -> Optional[pathlib.Path]:
    """A benchmark's last step: write its record to ``path`` (``--record``) unless that is ``-``."""
    if path == "-":
        return None
    out = write_record(name, figures, out=pathlib.Path(path), threads=threads)
    print(f"record: {out}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------ timing
def interleaved(cases: Dict[str, Callable[[], Optional[float]]], rounds: int, seed: int = 0,
                baseline: Optional[str] = None) -> dict:
    """Time every case once per round, in a shuffled order each round (``seed``), all in this process, so drift in
    the machine's load falls on every case alike.  A case returns its own time in seconds or ``None`` (then its
    wall time is taken).  Returns per case ``median_spread`` of its times (``"s"``) and, with ``baseline``, of the
    per-round ratio to the baseline's time of the same round (``"ratio"``), plus the raw ``"rounds"``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if baseline is not None and baseline not in cases:
        raise ValueError(f"baseline {baseline!r} is not one of the cases {sorted(cases)}")
    rng = random.Random(seed)
    times: Dict[str, list] = {k: [] for k in cases}
    order = list(cases)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            t = cases[k]()
            times[k].append(float(t) if t is not None else time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        out[k] = {"s": median_spread(v), "rounds": v}
        if baseline is not None:
            out[k]["ratio"] = median_spread(x / b for x, b in zip(v, times[baseline]))
    return out


# ------------------------------------------------------------------------------------ statistics
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def interval(values: Iterable[float], level: float = 0.9) -> dict:
    """Mean and a ``level`` confidence interval of the mean over seeds: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)
    (Student's t; n = 1 gives no interval).  Paired differences go in as the per-seed differences."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return {"mean": None, "lo90": None, "hi90": None, "sd": None, "n": 0}
    mean = statistics.fmean(v)
    if n == 1:
        return {"mean": mean, "lo90": None, "hi90": None, "sd": None, "n": 1}
    sd = statistics.stdev(v)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo90": mean - half, "hi90": mean + half, "sd": sd, "n": n}


def median_spread(values: Iterable[float]) -> dict:
    """Median, min and max of a benchmark's rounds."""
    v = sorted(float(x) for x in values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)} if v else {"median": None, "n": 0}
