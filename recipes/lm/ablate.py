"""Ablations on VALID for a finished (or running) recipes/lm OUTDIR: where does the iPQ error go, and does
noise help there?  TEST is never read.

    python recipes/lm/ablate.py OUTDIR [--jobs 2]

For every model the recipe trained for iPQ (the sweep jobs p = 0 (baseline), 0.05, ..., pq noise, iPQ QAT):
  - ``emb``:    iPQ (b=8, k=256) of the input embedding and the output projection only, no fine-tuning;
  - ``layers``: iPQ of every other Linear (attention q/k/v/out, FFN) only, no fine-tuning;
  - ``all_b4``: iPQ of every layer at block 4 (2 bits per weight instead of 1), no fine-tuning (baseline and
    drop models only);
  - the relative squared error ||W - W_hat||^2 / ||W||^2 of iPQ (b=8) per layer group (no evaluation needed):
    is a noise-trained model easier to quantize, or only more robust to the same error?
Each result is cached in OUTDIR/ablation/<model>.<variant>.json; the table goes to OUTDIR/ablation.md.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lm_recipe as R  # noqa: E402

EMB = "embed_tokens|output_projection"


def models(out: pathlib.Path) -> dict:
    found = {}
    for p in sorted((out / "sweep").glob("p*/checkpoints/checkpoint_last.pt")):
        log = p.parent.parent / "hydra_train.log"
        if log.is_file() and "done training" in log.read_text(errors="replace"):
            found[f"drop_p{float(p.parent.parent.name[1:]):g}"] = p  # sweep/p0.05 -> drop_p0.05 (p0.0 -> drop_p0)
    for name in ("pq_noise", "ipq_qat"):
        p = out / "train" / name / "checkpoint_last.pt"
        if (out / "steps" / f"train_{name}.json").is_file():
            found[name] = p
    return found


def rel_error(ckpt: pathlib.Path, q: pathlib.Path) -> dict:
    """Relative squared iPQ error per layer group: sum ||W - C[codes]||^2 / sum ||W||^2."""
    import torch

    w = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    qs = torch.load(q, map_location="cpu", weights_only=False)["model"]
    num, den = {"emb": 0.0, "layers": 0.0}, {"emb": 0.0, "layers": 0.0}
    for key in qs:
        if not key.endswith(".codes"):
            continue
        name = key[: -len(".codes")]
        orig = w[f"{name}.weight"].float()
        dec = qs[f"{name}.centroids"].float()[qs[key].long()].reshape(orig.shape)
        g = "emb" if any(s in name for s in EMB.split("|")) else "layers"
        num[g] += float(((orig - dec) ** 2).sum())
        den[g] += float((orig ** 2).sum())
    return {g: num[g] / den[g] for g in num if den[g]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=pathlib.Path)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--ft-updates", type=int, default=0,
                    help="also fine-tune the recipe's iPQ checkpoint of --ft-models for this many updates (fine-tune budget)")
    ap.add_argument("--ft-models", default="drop_p0", help="comma-separated models for --ft-updates")
    a = ap.parse_args(argv)
    out = a.outdir.resolve()
    fp = json.loads((out / "recipe.json").read_text())
    rec = R.Recipe(pathlib.Path(fp["train"]["path"]), pathlib.Path(fp["valid"]["path"]), pathlib.Path(fp["test"]["path"]),
                   out, fp["size"], a.jobs)
    rec.cpu = {}
    import logging

    logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler(out / "logs" / "quantnoise.log")], force=True)
    abl = out / "ablation"
    abl.mkdir(exist_ok=True)
    t0 = time.time()

    def job(model: str, ckpt: pathlib.Path, variant: str):
        cache = abl / f"{model}.{variant}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        q = abl / f"{model}.{variant}.pt"
        args = ["--scheme", "pq", "--centroids", "256", "--seed", "0"]
        args += {"emb": ["--block-size", "8", "--include", EMB], "layers": ["--block-size", "8", "--exclude", EMB],
                 "all_b4": ["--block-size", "4"], "all_b8": ["--block-size", "8"]}.get(variant, [])
        if variant.startswith("ft"):  # longer centroid fine-tuning of the recipe's own iPQ checkpoint
            s = rec.s
            rec.fairseq_train("ablate", abl / f"{model}.{variant}", [
                "--restore-file", out / "ipq" / model / "q.pt", "--reset-optimizer", "--reset-dataloader",
                "--reset-lr-scheduler", "--reset-meters"], f"ablation_{model}.{variant}", a.ft_updates, s["lr"] / 3,
                max(1, a.ft_updates // 10))
            res = {"valid_ppl": rec.valid_ppl(f"ablation_{model}.{variant}"), "updates": a.ft_updates}
            shutil.rmtree(abl / f"{model}.{variant}")
            R.atomic_write_text(cache, json.dumps(res))
            print(f"{model:14s} {variant:7s} {res}", flush=True)
            return res
        rec.qn("ablate", "quantize", ckpt, "-o", q, *args, log="ablation_quantize")
        if variant == "all_b8":
            res = {"rel_error": rel_error(ckpt, q)}
        else:
            res = {"valid_ppl": rec.eval_lm("ablate", q, "valid", f"ablation_{model}.{variant}")}
        q.unlink()
        R.atomic_write_text(cache, json.dumps(res))
        el = int(time.time() - t0)
        print(f"[{el // 60:3d}m{el % 60:02d}s] {model:14s} {variant:7s} {res}", flush=True)
        return res

    found = models(out)
    tasks = []
    for model, ckpt in found.items():
        tasks += [(model, ckpt, "all_b8"), (model, ckpt, "emb"), (model, ckpt, "layers")]
        if model.startswith("drop_"):
            tasks.append((model, ckpt, "all_b4"))
        if a.ft_updates and model in a.ft_models.split(",") and (out / "ipq" / model / "q.pt").is_file():
            tasks.insert(0, (model, ckpt, f"ft{a.ft_updates}"))
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda t: ((t[0], t[2]), job(*t)), tasks))
    res = dict(results)
    for f in abl.glob("*.json"):  # earlier invocations' results too
        model, variant = f.stem.rsplit(".", 1)
        res.setdefault((model, variant), json.loads(f.read_text()))
    table(out, found, res)
    return 0


def table(out: pathlib.Path, found: dict, res: dict) -> None:
    steps = {p.stem: json.loads(p.read_text())["result"] for p in (out / "steps").glob("*.json")}
    sweep = steps.get("sweep", {}).get("valid_fp32", {})
    base_fp32 = sweep.get("0")
    lines = ["# Ablations on VALID (no fine-tuning unless said)", "",
             f"Baseline fp32 VALID perplexity: {base_fp32}.  gap = perplexity minus the baseline's fp32 perplexity.", "",
             "| model | fp32 | iPQ all b=8 | + fine-tune (recipe) | + longer fine-tune | iPQ emb+out only | iPQ layers only | iPQ all b=4 | rel. sq. error emb | rel. sq. error layers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in found:
        ipq = steps.get(f"ipq_{model}", {})
        if model.startswith("drop_"):
            fp32 = sweep.get(model[len("drop_p"):])
        else:  # fairseq-train's validation at the end of training
            m = R.VALID_PPL.findall((out / "logs" / f"train_{model}.log").read_text(errors="replace"))
            fp32 = float(m[-1][1]) if m else None
        g = lambda v: "—" if v is None else (f"{v:.2f}" if v > 1 else f"{v:.4f}")  # noqa: E731
        r = lambda var, k="valid_ppl": res.get((model, var), {}).get(k)  # noqa: E731
        err = res.get((model, "all_b8"), {}).get("rel_error", {})
        ft = [v for (m, var), v in res.items() if m == model and var.startswith("ft")]
        longer = "—" if not ft else f"{ft[0]['valid_ppl']:.2f} ({ft[0]['updates']} updates)"
        lines.append(f"| {model} | {g(fp32)} | {g(ipq.get('valid_noft'))} | {g(ipq.get('valid_ft'))} | {longer} | {g(r('emb'))} | "
                     f"{g(r('layers'))} | {g(r('all_b4'))} | {g(err.get('emb'))} | {g(err.get('layers'))} |")
    R.atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
