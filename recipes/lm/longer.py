"""Does the Quant-Noise effect appear with longer training?  VALID only (TEST is never read).

    python recipes/lm/longer.py TRAIN.txt VALID.txt TEST.txt OUTDIR --updates 1000 \
        --models drop_p0,drop_p0.05,drop_p0.1,pq_p0.05 [--size small] [--tie] [--jobs 1] [--metrics ipq,int4]

The recipe's ``small`` model (recipes/lm/README.md) trained for ``--updates`` instead of its default, with the
same seed, data order, lr schedule and iPQ settings.  Models: ``drop_p<p>`` the drop proxy at rate p
(``drop_p0`` is the baseline), ``pq_p<p>`` true pq noise, ``int4_p<p>`` scalar int4 noise with one scale per
row (configs/quant_noise/scalar_int4.yaml; p = 1 is full QAT), ``int4t_p<p>`` the same with one scale per
tensor.  Metrics, VALID perplexity:
  - ``fp32`` at the end of training (always);
  - ``ipq``: iPQ (b=8, k=256) of every Linear and Embedding, no fine-tuning; of the input embedding + output
    projection only; of the transformer layers only; of every layer + the recipe's centroid fine-tuning
    budget (``ft_updates``);
  - ``int4``: post-hoc symmetric int4 of every layer, one scale per row and one per tensor (no fine-tuning).
``--tie`` shares the input embedding and the output projection (``--share-decoder-input-output-embed``).
Each model's results are cached in OUTDIR/<model>.json (a rerun computes only what is missing, from the saved
checkpoint); the tables go to OUTDIR/longer.md, with gaps to the baseline's fp32 (the paper's measure) and to
each model's own fp32.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lm_recipe as R  # noqa: E402

EMB = "embed_tokens|output_projection"


KINDS = {"drop": ("drop", {}), "pq": ("pq", {}), "int4": ("scalar_int4", {}),
         "int4t": ("scalar_int4", {"quant_noise_granularity": "tensor"})}


def noise_of(model: str, refresh: int) -> list:
    kind, _, p = model.partition("_p")
    try:
        p = float(p)
    except ValueError:
        p = -1.0
    if kind not in KINDS or not 0 <= p <= 1:
        raise SystemExit(f"longer.py: model {model!r} is not <kind>_p<rate> with kind one of {', '.join(KINDS)} "
                         f"and 0 <= rate <= 1; e.g. drop_p0.1, pq_p0.05, int4t_p0.5")
    if p == 0:
        return R.noise_flags("drop", quant_noise_p=0.0)
    config, extra = KINDS[kind]
    extra = dict(extra, quant_noise_refresh_every=refresh) if kind == "pq" else extra
    return R.noise_flags(config, quant_noise_p=p, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("train", "valid", "test"):
        ap.add_argument(name, type=pathlib.Path)
    ap.add_argument("outdir", type=pathlib.Path)
    ap.add_argument("--size", default="small", choices=sorted(R.SIZES))
    ap.add_argument("--updates", type=int, required=True)
    ap.add_argument("--models", default="drop_p0,drop_p0.05,drop_p0.1,pq_p0.05")
    ap.add_argument("--tie", action="store_true", help="share the input embedding and the output projection")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--metrics", default="ipq,int4", help="comma-separated: ipq, int4 (fp32 always)")
    a = ap.parse_args(argv)
    metrics = set(a.metrics.split(","))
    if not metrics <= {"ipq", "int4"}:
        raise SystemExit(f"longer.py: --metrics {a.metrics!r}: use a comma-separated subset of ipq,int4")
    try:
        R.check_inputs(a.train, a.valid, a.test, a.outdir)
    except R.RecipeError as e:
        raise SystemExit(f"longer.py: {e}")
    out = a.outdir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rec = R.Recipe(a.train, a.valid, a.test, out, a.size, a.jobs)
    rec.cpu = {}
    rec.s = dict(rec.s, updates=a.updates)
    s = rec.s
    logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(out / "logs" / "quantnoise.log")], force=True)
    tie = ["--share-decoder-input-output-embed"] if a.tie else []
    models = a.models.split(",")
    for m in models:
        noise_of(m, s["refresh"])
    t0 = time.time()

    def say(msg: str) -> None:
        el = int(time.time() - t0)
        print(f"[{el // 60:3d}m{el % 60:02d}s] {msg}", flush=True)

    if not (rec.data / "dict.txt").is_file():
        rec.preprocess()
        say("preprocess done")

    def job(model: str) -> dict:
        cache = out / f"{model}.json"
        res = json.loads(cache.read_text()) if cache.is_file() else {}
        d = out / model
        ckpt = d / "train" / "checkpoint_last.pt"
        cpu0 = dict(rec.cpu)
        if "fp32" not in res:
            rec.fairseq_train(model, d / "train", noise_of(model, s["refresh"]) + tie, f"{model}.train",
                              s["updates"], s["lr"], s["warmup"])
            res = {"updates": s["updates"], "tie": a.tie, "fp32": rec.valid_ppl(f"{model}.train")}

        def quantized_ppl(key: str, *args) -> None:
            q = d / f"q_{key}.pt"
            rec.qn(model, "quantize", ckpt, "-o", q, *args, log=f"{model}.quantize")
            res[key] = rec.eval_lm(model, q, "valid", f"{model}.{key}")

        if "ipq" in metrics and "ipq_all_ft" not in res:
            for variant, args in (("all", []), ("emb", ["--include", EMB]), ("layers", ["--exclude", EMB])):
                quantized_ppl(f"ipq_{variant}", "--scheme", "pq", "--block-size", R.IPQ["block_size"],
                              "--centroids", R.IPQ["centroids"], "--seed", "0", *args)
            rec.fairseq_train(model, d / "ft", ["--restore-file", d / "q_ipq_all.pt", "--reset-optimizer",
                                                "--reset-dataloader", "--reset-lr-scheduler", "--reset-meters", *tie],
                              f"{model}.ft", s["ft_updates"], s["lr"] / 3, max(1, s["ft_updates"] // 10))
            res["ipq_all_ft"] = rec.valid_ppl(f"{model}.ft")
        if "int4" in metrics and "int4_tensor" not in res:
            for key, rows in (("int4_row", 1), ("int4_tensor", 0)):
                quantized_ppl(key, "--scheme", "scalar", "--bits", 4, "--rows-per-scale", rows)
        res["cpu_s"] = round(res.get("cpu_s", 0.0) + rec.cpu.get(model, 0.0) - cpu0.get(model, 0.0), 1)
        R.atomic_write_text(cache, json.dumps(res, indent=1))
        say(f"{model}: {res}")
        return res

    with ThreadPoolExecutor(a.jobs) as pool:
        res = dict(zip(models, pool.map(job, models)))
    base = res.get("drop_p0", {}).get("fp32")
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    gap = lambda v: "—" if v is None or base is None else f"{v - base:+.2f}"  # noqa: E731
    lines = [f"# {a.size} model, {a.updates} updates{', tied embeddings' if a.tie else ''}: VALID perplexity", "",
             "gap = perplexity minus the baseline's fp32 (paper's measure); [own] = minus the model's own fp32.", ""]
    if "ipq" in metrics:
        lines += ["| model | fp32 | iPQ all | iPQ emb+out only | iPQ layers only | iPQ all + fine-tune | gap (ft) | gap [own] (ft) | gap layers only | gap [own] layers only |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, r in res.items():
            if "ipq_all_ft" in r:
                lines.append(f"| {m} | {f(r['fp32'])} | {f(r['ipq_all'])} | {f(r['ipq_emb'])} | {f(r['ipq_layers'])} | "
                             f"{f(r['ipq_all_ft'])} | {gap(r['ipq_all_ft'])} | {r['ipq_all_ft'] - r['fp32']:+.2f} | "
                             f"{gap(r['ipq_layers'])} | {r['ipq_layers'] - r['fp32']:+.2f} |")
        lines.append("")
    if "int4" in metrics:
        lines += ["| model | fp32 | int4 per row | gap | int4 per tensor | gap |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {f(r['fp32'])} | {f(r.get('int4_row'))} | {gap(r.get('int4_row'))} | "
                  f"{f(r.get('int4_tensor'))} | {gap(r.get('int4_tensor'))} |" for m, r in res.items()]
    R.atomic_write_text(out / "longer.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
