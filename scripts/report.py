"""Render BENCHMARKS.md's tables from the records in results/*.json (benchmarks/harness.py writes them).

    python scripts/report.py            # rewrite BENCHMARKS.md's tables in place
    python scripts/report.py --check    # exit 1 (one line saying where) when BENCHMARKS.md is not what it renders

BENCHMARKS.md is hand-written prose with the tables between markers::

    <!-- table: noise; run: python benchmarks/noise.py --markdown -->
    ...  (rendered: never edit by hand)
    <!-- /table -->

``noise`` names the record ``results/noise.json``; ``run:`` is the command that makes it, shown in place of the table
while the record is missing ("(no record yet: run ...)"), so a checkout without it still renders.  Every table ends
with one line naming the record's command, commit, date, CPU / instruction set, threads and load average.  A record
with ``"provenance"`` was transcribed from an earlier BENCHMARKS.md (its raw outputs are gone): its table says so,
with the commit, machine and date it was measured at.  Only the text between markers is generated; the prose is
the file's own, so editing prose needs no re-render, and editing a table is undone by the next render.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Callable, Dict, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "results"
MARKER = re.compile(r"^<!-- table: (?P<name>[\w.-]+)(?:; run: (?P<run>.*?))? -->\n(?P<body>.*?)^<!-- /table -->$",
                    re.M | re.S)


# ------------------------------------------------------------------------------------ formatting
def num(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def table(columns: List[str], rows: List[list]) -> List[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def spread(m: Optional[dict], digits: int = 3, unit: str = "x") -> str:
    """A harness ``median_spread``: median (min-max)."""
    if not m or m.get("median") is None:
        return "-"
    return f"{m['median']:.{digits}f}{unit} ({m['min']:.{digits}f}-{m['max']:.{digits}f})"


def footer(rec: dict) -> str:
    m = rec.get("machine") or {}
    load = "/".join(f"{x:.2f}" for x in m.get("load_avg") or []) or "-"
    dirty = " (uncommitted changes)" if rec.get("dirty") else ""
    return (f"*`{rec.get('command', '?')}` · commit {rec.get('commit') or '?'}{dirty} · {str(rec.get('date', '?'))[:10]} · "
            f"{m.get('cpu', '?')} ({m.get('isa', '?')}), {m.get('cores', '?')} cores, {m.get('threads', '?')} threads · "
            f"load average {load}*")


# ------------------------------------------------------------------------------------ renderers, by record name
def render_rows(fig: dict) -> List[str]:
    """A transcribed table (or any record whose figures are ``{"columns": [...], "rows": [[...], ...]}``)."""
    return table(fig["columns"], fig["rows"]) + [f"\n{n}" for n in fig.get("notes", [])]


def render_noise(fig: dict) -> List[str]:
    rows = [[r["layer"], r["impl"], spread(r["ratio"]), f"{r['extra_bytes_x_weight']:.2f}x"] for r in fig["rows"]]
    plain = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in fig["plain_s"].items())
    return (table(["layer", "implementation", "fwd+bwd time / plain: median (range) over rounds",
                   "extra bytes per forward / weight bytes"], rows)
            + ["", f"p = {fig['p']}, block {fig['block']}, {fig['tokens']} tokens, {fig['rounds']} interleaved rounds x "
                   f"{fig['iters']} calls (best call per round); plain fwd+bwd medians: {plain}."])


def render_kmeans(fig: dict) -> List[str]:
    gib = 2**30
    rows = [[r["weight"], r["impl"], r["iters"], num(r["seconds"]), num(r["seconds"] / r["iters"]),
             num(r["peak_rss"] / gib), num(r["rss_increase"] / gib), f"{r['mse']:.4e}"] for r in fig["rows"]]
    return table(["weight", "impl", "iters", "wall s", "s / iter", "peak RSS GiB", "RSS + GiB", "MSE"], rows)


def render_ipq_export(fig: dict) -> List[str]:
    rows = [[r["model"], r["scheme"], f"{r['fp32_ckpt_bytes'] / 2**20:.1f}", mib(r["qnz_bytes"]),
             f"{r['fp32_ckpt_bytes'] / r['qnz_bytes']:.1f}", f"{r['fp32_weight_bytes'] / r['qnz_bytes']:.1f}",
             mib(r["bound_bytes"]), f"{100 * (r['qnz_bytes'] / r['bound_bytes'] - 1):+.2f}%",
             f"{r['bits_per_weight']:.3f}"] for r in fig["export"]]
    out = table(["model", "scheme", "fp32 ckpt MiB", ".qnz MiB", "x vs fp32 ckpt", "x vs fp32 weights", "bound MiB",
                 "file over bound", "bits / weight"], rows)
    w = fig.get("whole_model")
    if w:
        out += ["", f"Whole-model iPQ of {w['model']}: {w['params'] / 1e6:.1f} M parameters, {w['quantize_s']:.1f} s, "
                    f"peak RSS {w['peak_rss'] / 2**30:.2f} GiB ({w['peak_rss'] / w['fp32_bytes']:.2f}x the fp32 weights)."]
    return out


def render_train(fig: dict) -> List[str]:
    rows = [[r["model"], f"{r['wall_s']:.3f}", f"{r['wall_ratio']:.3f}", f"{r['cpu_s']:.3f}", f"{r['cpu_ratio']:.3f}"]
            for r in fig["rows"]]
    return (table(["model", "wall s / step (median)", "wall / plain", "CPU s / step (median)", "CPU / plain"], rows)
            + ["", f"Device {fig['device']}, {fig['layers']} layers, {fig['rounds']} rounds x {fig['steps']} steps; pq "
                   f"codebook refresh {fig['pq_refresh_s']:.2f} s per 1000 forwards ({fig['pq_refresh_s'] / 1000:.4f} "
                   f"s / step amortised)."])


def render_int_widths(fig: dict) -> List[str]:
    """benchmarks/int_widths.py: IntLinear forward ms per shape / tokens at each width (the kernel it ran), and for
    the odd widths the layer decoding the file's bit stream every call (``raw``)."""
    keys = list(dict.fromkeys((r["shape"], r["tokens"]) for r in fig["rows"]))
    bits = sorted({r["bits"] for r in fig["rows"]})
    at = {(r["shape"], r["tokens"], r["bits"]): r for r in fig["rows"]}
    rows = []
    for shape, tokens in keys:
        cells = []
        for b in bits:
            r = at.get((shape, tokens, b))
            cells.append("" if r is None else f"{r['ms']:.3f} ({r['kernel']})"
                         + (f", raw {r['raw_ms']:.2f}" if r.get("raw_ms") is not None else ""))
        rows.append([shape, tokens, *cells])
    return table(["out x in", "tokens", *(f"int{b} ms" for b in bits)], rows) + [
        "", f"Median of {fig['repeats']} forwards, one thread; compiled kernels: {fig['compiled_kernels']}. "
            "raw: the odd width's bit stream decoded every call instead of held at the runtime width."]


def render_seeds(fig: dict) -> List[str]:
    """The LM noise fine-tune over seeds (``make demo``'s record, the LM recipe's): each seed's TEST perplexities
    and cut, then the mean cut with its 90% interval (paired over seeds) and the file sizes."""
    ft = fig.get("finetune", fig)
    rows = []
    for e in ft["seeds"]:
        cut = "regularisation" if e.get("regularised") else pct(e.get("gap_cut"))
        ref = e.get("reference", e["fp32"])  # the gap's reference: the better on VALID of plain / baseline best
        rows.append([e["seed"], num(ref["ppl"]), num(e["ipq_plain"]["ppl"]), num(e["ipq_qn"]["ppl"]), cut])
    out = table(["seed", "fp32 reference (TEST ppl)", "iPQ of it + centroid fine-tune", "iPQ of the Quant-Noise fine-tune",
                 "gap cut"], rows)
    c = ft["gap_cut"]
    if ft.get("regularised_seeds"):  # a cut above 100% is never printed as one
        out += ["", f"Gap: {ft['verdict']}."]
    else:
        line = f"Gap cut: mean {pct(c['mean'])}"
        if c.get("lo90") is not None:
            line += f", 90% interval {pct(c['lo90'])} to {pct(c['hi90'])}"
        out += ["", line + f" (n = {c['n']} seeds)."]
    size = ft.get("bytes") or {k: (ft.get(k) or ft["seeds"][0][k]).get("bytes") for k in ("fp32", "ipq_plain", "ipq_qn")}
    if size.get("fp32") and size.get("ipq_qn"):
        out += ["", f"Files: fp32 {mib(size['fp32'])} MiB, iPQ {mib(size['ipq_qn'])} MiB "
                    f"(x{size['fp32'] / size['ipq_qn']:.1f})."]
    return out


def render_lm_table(fig: dict) -> List[str]:
    """The LM recipe's from-scratch table: TEST perplexity (MiB, x smaller than fp32) per scheme and method."""
    fp = fig["fp32"]["bytes"]

    def ppl(e):  # a seeded row: mean +- half its 90% interval
        iv = e.get("ppl_interval") or {}
        return f"{e['ppl']:.2f}" + (f" ± {(iv['hi90'] - iv['lo90']) / 2:.2f}" if iv.get("lo90") is not None else "")

    def cell(e):
        return f"{ppl(e)} ({mib(e['bytes'])} MiB, x{fp / e['bytes']:.1f})"

    rows = [["fp32", f"{ppl(fig['fp32'])} ({mib(fp)} MiB)", "", ""]]
    rows += [[kind, *(cell(fig[kind][col]) for col in ("posthoc", "qat", "quant_noise"))]
             for kind in ("int8", "int4", "ipq") if kind in fig]
    out = table(["", "post-hoc", "QAT", "Quant-Noise"], rows)
    if "ipq_pq_noise" in fig:
        out += ["", f"iPQ with true pq noise instead of the drop proxy: {cell(fig['ipq_pq_noise'])}."]
    seeds = fig.get("seeds")
    if isinstance(seeds, dict) and len(seeds.get("seeds", [])) > 1:
        out += ["", f"fp32 and iPQ rows: mean ± half the 90% interval over {len(seeds['seeds'])} seeds; int8 / int4: "
                    f"seed 1. Cut of the post-hoc iPQ gap to fp32, per seed (paired) and mean with its 90% interval:"]
        for row, iv in seeds["gap_cut"].items():
            per = ", ".join(pct(e["gap_cut"][row]) for e in seeds["seeds"])
            if not iv["n"]:
                what = "no seed has a post-hoc gap"
            elif iv["mean"] > 1:
                what = f"regularisation, not a cut (per seed {per})"
            else:
                what = f"{pct(iv['mean'])} ({pct(iv['lo90'])} to {pct(iv['hi90'])}; per seed {per})"
            out.append(f"- {row}: {what}")
    return out


def render_lm_recipe(fig: dict) -> List[str]:
    """A record of recipes/lm (OUTDIR/record.json): its from-scratch table and / or its noise fine-tune seeds."""
    out = render_lm_table(fig) if "fp32" in fig and "ipq" in fig else []
    if isinstance(fig.get("finetune", fig).get("seeds"), list):
        out += ([""] if out else []) + render_seeds(fig)
    if not out:
        raise KeyError("neither the table nor the fine-tune's seeds")
    return out


def render_peers(fig: dict) -> List[str]:
    """benchmarks/peers.py: per case, batch-1 greedy and prefill tokens/s (x fp32) at each thread count, RSS, file."""
    c, threads = fig["config"], fig["config"]["threads"]

    def speed(r, t, key):
        s = r.get(f"t{t}")
        return "-" if not s else f"{s[key + '_tok_s']:.1f} ({s.get(key + '_vs_fp32', 0):.2f}x)"

    rows = []
    for r in fig["rows"]:
        if "note" in r:
            rows.append([r["case"], r["note"]] + [""] * (2 * len(threads) + 1))
            continue
        rss = r.get("rss")
        rows.append([r["case"]] + [speed(r, t, "gen") for t in threads] + [speed(r, t, "prefill") for t in threads]
                    + [mib(rss["after_load"] - rss["before"]) if rss else "-", mib(r.get("bytes"))])
    cols = (["case"] + [f"greedy {t} thread{'s' * (t > 1)} tok/s (x fp32)" for t in threads]
            + [f"prefill {c['prefill']} tok/s, {t} thread{'s' * (t > 1)} (x fp32)" for t in threads]
            + ["RSS after load MiB", "file MiB"])
    return table(cols, rows) + ["", f"Llama {c['layers']}x{c['dim']} (FFN {c['ffn']}, vocabulary {c['vocab']}), batch 1, "
                                    f"{c['new_tokens']} greedy tokens after {c['prompt']}, median of {c['rounds']} "
                                    f"interleaved round(s); llama.cpp in its own process; versions "
                                    f"{', '.join(f'{k} {v}' for k, v in fig.get('versions', {}).items()) or '-'}."]


RENDERERS: Dict[str, Callable[[dict], List[str]]] = {
    "noise": render_noise, "kmeans": render_kmeans, "ipq_export": render_ipq_export, "train": render_train,
    "lm_recipe": render_lm_recipe, "demo": render_seeds, "int_widths": render_int_widths, "peers": render_peers,
}


def render_record(rec: dict) -> List[str]:
    fig = rec["figures"]
    fn = render_rows if "columns" in fig else RENDERERS.get(rec.get("name"))
    if fn is None and "fp32" in fig and "ipq" in fig:  # recipes/lm's table, under another record name
        fn = render_lm_recipe
    if fn is None and isinstance(fig.get("finetune", fig).get("seeds"), list):
        fn = render_seeds
    try:
        if fn is None:
            raise KeyError(rec.get("name"))
        out = fn(fig)
    except (KeyError, TypeError, ZeroDivisionError) as e:  # a record of a kind no renderer knows: said, not hidden
        out = [f"(scripts/report.py cannot render this record yet: name {rec.get('name')!r}, figures "
               f"{sorted(fig)[:8]}; missing {e})"]
    prov = rec.get("provenance")
    if prov:
        out += ["", f"*(recorded at {prov['transcribed_from'].split('@')[-1]} on {prov['machine']}, {prov['date']}; "
                    f"not rerun)* *`{prov['command']}`*"]
    else:
        out += ["", footer(rec)]
    return out


# ------------------------------------------------------------------------------------ the document
def render(text: str, results: pathlib.Path) -> str:
    """``text`` with every marked table rendered from ``results``."""
    def fill(m: re.Match) -> str:
        name, run = m["name"], m["run"]
        path = results / f"{name}.json"
        if not path.exists():
            body = [f"(no record yet: run `{run}`)" if run else f"(no record yet: results/{name}.json)"]
        else:
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path} is not JSON ({e}); rerun the command that makes it")
            body = render_record(rec)
        head = f"<!-- table: {name}" + (f"; run: {run}" if run else "") + " -->"
        return "\n".join([head, *body, "<!-- /table -->"])

    return MARKER.sub(fill, text)


def write_atomic(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def difference(old: str, new: str) -> str:
    """One line: how many lines differ, the first one, and the table it is in."""
    a, b = old.splitlines(), new.splitlines()
    changed = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    n = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in changed)
    first = changed[0][1]
    names = [m["name"] for m in MARKER.finditer(old) if old[:m.start()].count("\n") <= first <= old[:m.end()].count("\n")]
    where = f" (table {names[0]})" if names else ""
    return f"{n} line(s) differ, first at line {first + 1}{where}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the document is not what it renders")
    ap.add_argument("--doc", type=pathlib.Path, default=DOC)
    ap.add_argument("--results", type=pathlib.Path, default=RESULTS)
    a = ap.parse_args(argv)
    if not a.doc.exists():
        print(f"error: {a.doc} not found; give --doc PATH", file=sys.stderr)
        return 2
    old = a.doc.read_text(encoding="utf-8")
    new = render(old, a.results)
    if a.check:
        if new != old:
            print(f"{a.doc.name} is not what scripts/report.py renders: {difference(old, new)}; "
                  f"run python scripts/report.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        write_atomic(a.doc, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
