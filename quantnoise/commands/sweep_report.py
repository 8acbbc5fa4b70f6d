"""``quantnoise sweep-report DIR``: one table and one plot for a ``fairseq-hydra-train -m`` sweep.

Reads the Hydra multirun folder DIR: ``multirun.yaml`` says which runs the sweep asked for (its
sweep overrides are expanded exactly as Hydra's basic sweeper does), each run folder's
``.hydra/overrides.yaml`` says which run it is, ``.hydra/config.yaml`` gives the noise scheme and
rate, and fairseq's log (``hydra_train.log``) gives the last validation loss/perplexity, the updates
done and the training wall time.  A run whose log lacks fairseq's "done training" line is reported
as ``crashed``; an asked-for run without a folder as ``missing``.  Neither is left out.

Writes ``DIR/report.md`` (Markdown table) and ``DIR/ppl_vs_noise.png`` (valid perplexity against
the noise rate, one line per scheme).  A run folder may also hold ``quantnoise_eval.json``, a JSON object of
further validation perplexities measured after training (``{"ppl_valid_ipq": 171.2}``, as recipes/lm
writes after iPQ): each key becomes a column and a dashed line per scheme.
"""
from __future__ import annotations

import itertools
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

NUM = r"([0-9.]+|nan|inf)"
VALID = re.compile(rf"valid on '\w+' subset \| loss {NUM} \|.*?\bppl {NUM} \|.*?\| num_updates (\d+)")
UPDATES = re.compile(r"num_updates[ =](\d+)")
DONE = re.compile(r"done training in ([0-9.]+) seconds")
WALL = re.compile(r"wall[ =]([0-9.]+)")


@dataclass
class Run:
    overrides: Dict[str, str]
    folder: Optional[pathlib.Path] = None
    scheme: str = "?"
    p: Optional[float] = None
    valid_loss: Optional[float] = None
    valid_ppl: Optional[float] = None
    updates: Optional[int] = None
    wall_s: Optional[float] = None
    status: str = "missing"
    extra: Optional[Dict[str, float]] = None  # quantnoise_eval.json: name -> valid perplexity


def _parse(overrides: List[str]) -> List[Tuple[str, List[str]]]:
    """(key, values) per override, sweeps expanded like Hydra's basic sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [(o.get_key_element(), list(o.sweep_string_iterator()) if o.is_sweep_override()
             else [o.get_value_element_as_str()]) for o in parsed]


def expected_runs(sweep_dir: pathlib.Path) -> List[Dict[str, str]]:
    """The runs the sweep asked for, as {override key: value}, in Hydra's job order."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        raise ValueError(f"{sweep_dir} has no multirun.yaml: pass the folder `fairseq-hydra-train -m` wrote "
                         f"(hydra.sweep.dir, e.g. multirun/lm_tiny/<date>/<time>)")
    task = list(OmegaConf.load(path).hydra.overrides.task)
    keys_values = _parse(task)
    keys = [k for k, _ in keys_values]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in keys_values))]


def read_run(run: Run) -> Run:
    """Fill ``run`` from its folder (config, then fairseq's log)."""
    from omegaconf import OmegaConf

    model = OmegaConf.load(run.folder / ".hydra" / "config.yaml").get("model") or {}
    run.scheme, run.p = str(model.get("quant_noise_scheme", "drop")), float(model.get("quant_noise_p") or 0.0)
    if float(model.get("quant_noise_pq") or 0) > 0:  # fairseq's own flags, as our archs read them
        run.scheme, run.p = "drop", float(model.quant_noise_pq)
    elif float(model.get("quant_noise_scalar") or 0) > 0:
        run.scheme, run.p = "scalar", float(model.quant_noise_scalar)
    if run.p == 0.0:
        run.scheme = "none"
    extra = run.folder / "quantnoise_eval.json"
    if extra.is_file():
        import json

        run.extra = {k: float(v) for k, v in json.loads(extra.read_text()).items() if isinstance(v, (int, float))}
    logs = sorted(run.folder.glob("*.log"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    valid = VALID.findall(text)
    if valid:
        run.valid_loss, run.valid_ppl = float(valid[-1][0]), float(valid[-1][1])
    updates = UPDATES.findall(text)
    run.updates = int(updates[-1]) if updates else None
    done = DONE.findall(text)
    wall = WALL.findall(text)
    run.wall_s = float(done[-1]) if done else (float(wall[-1]) if wall else None)
    run.status = "ok" if done else ("crashed" if logs else "crashed (no log)")
    return run


def collect(sweep_dir: pathlib.Path) -> List[Run]:
    """Every run the sweep asked for, plus any extra run folder found, each read or marked missing."""
    from omegaconf import OmegaConf

    wanted = expected_runs(sweep_dir)
    found: Dict[Tuple, pathlib.Path] = {}  # sorted (key, value) overrides -> run folder
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        folder = ov.parent.parent
        if folder != sweep_dir:
            found[tuple(sorted((k, v[0]) for k, v in _parse(list(OmegaConf.load(ov)))))] = folder
    runs = []
    for want in wanted:
        run = Run(overrides=want, folder=found.pop(tuple(sorted(want.items())), None))
        runs.append(read_run(run) if run.folder else run)
    runs += [read_run(Run(overrides=dict(k), folder=f)) for k, f in found.items()]
    return runs


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(runs: List[Run], sweep_dir: pathlib.Path) -> str:
    varying = sorted({k for r in runs for k, v in r.overrides.items()
                      if len({rr.overrides.get(k) for rr in runs}) > 1})
    extra = sorted({k for r in runs for k in (r.extra or {})})
    lines = [f"# Sweep report: `{sweep_dir}`", "",
             "| run | " + " | ".join(f"`{k}`" for k in varying) +
             " | scheme | noise rate | valid loss (base 2) | valid ppl | " + "".join(f"`{k}` | " for k in extra) +
             "updates | wall time (s) | status |",
             "|---" * (len(varying) + len(extra) + 8) + "|"]
    for r in runs:
        name = r.folder.relative_to(sweep_dir).as_posix() if r.folder else "—"
        cells = [name, *(r.overrides.get(k, "") for k in varying), r.scheme if r.folder else "?",
                 _fmt(r.p if r.p is not None else _p_from(r), ".3g"), _fmt(r.valid_loss, ".3f"),
                 _fmt(r.valid_ppl, ".2f"), *(_fmt((r.extra or {}).get(k), ".2f") for k in extra), _fmt(r.updates, "d"), _fmt(r.wall_s, ".1f"), f"**{r.status}**"
                 if r.status != "ok" else "ok"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    bad = [r for r in runs if r.status != "ok"]
    lines += ["", f"{len(runs) - len(bad)} of {len(runs)} runs finished"
              + (f"; {len(bad)} crashed or missing (listed above, not plotted)." if bad else ".")]
    return "\n".join(lines) + "\n"


def _p_from(run: Run) -> Optional[float]:
    """Noise rate of a missing run, read from its overrides when the sweep set it."""
    for key in ("model.quant_noise_p", "model.quant_noise_pq", "model.quant_noise_scalar"):
        if key in run.overrides:
            try:
                return float(run.overrides[key])
            except ValueError:
                return None
    return None


def plot(runs: List[Run], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ok = [r for r in runs if r.status == "ok" and r.valid_ppl is not None and math.isfinite(r.valid_ppl)]
    base = [(r.p, r.valid_ppl) for r in ok if r.scheme == "none"]  # p = 0 starts every scheme's line
    for scheme in sorted({r.scheme for r in ok} - {"none"}) or (["none"] if base else []):
        pts = sorted(base + [(r.p, r.valid_ppl) for r in ok if r.scheme == scheme and scheme != "none"])
        line = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=scheme)[0]
        for key, style in zip(sorted({k for r in ok for k in (r.extra or {})}), ["--", ":", "-."] * 10):
            # quantnoise_eval.json figures: same colour, dashed / dotted
            pts = sorted((r.p, r.extra[key]) for r in ok if key in (r.extra or {}) and (r.scheme == scheme or r.scheme == "none"))
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="x", linestyle=style, color=line.get_color(),
                    label=f"{scheme}: {key}")
    bad = len(runs) - len(ok)
    ax.set_xlabel("noise rate p")
    ax.set_ylabel("valid perplexity")
    ax.set_title("Quant-Noise sweep" + (f" ({bad} run(s) crashed/missing, not shown)" if bad else ""), fontsize=9)
    if ok:
        ax.legend(title="scheme", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_report(sweep_dir: pathlib.Path, out_md: pathlib.Path, out_png: pathlib.Path) -> List[Run]:
    runs = collect(sweep_dir)
    out_md.write_text(markdown(runs, sweep_dir), encoding="utf-8")
    plot(runs, out_png)
    return runs


def main(args) -> int:
    sweep_dir = pathlib.Path(args.dir).resolve()
    if not sweep_dir.is_dir():
        raise ValueError(f"{args.dir!r} is not a folder; pass the multirun folder of a fairseq-hydra-train -m sweep")
    out_md = pathlib.Path(args.markdown) if args.markdown else sweep_dir / "report.md"
    out_png = pathlib.Path(args.plot) if args.plot else sweep_dir / "ppl_vs_noise.png"
    runs = run_report(sweep_dir, out_md, out_png)
    counts = {s: sum(r.status.startswith(s) for r in runs) for s in ("ok", "crashed", "missing")}
    print(f"{len(runs)} runs: {counts['ok']} ok, {counts['crashed']} crashed, {counts['missing']} missing; "
          f"wrote {out_md} and {out_png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sweep-report", help="table + plot of a fairseq-hydra-train -m noise-rate sweep",
                       description=__doc__.splitlines()[0])
    p.add_argument("dir", help="the Hydra multirun folder (hydra.sweep.dir)")
    p.add_argument("--markdown", help="output Markdown file (default DIR/report.md)")
    p.add_argument("--plot", help="output PNG file (default DIR/ppl_vs_noise.png)")
    p.set_defaults(func=main)
