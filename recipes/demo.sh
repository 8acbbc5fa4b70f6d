#!/usr/bin/env bash
# `make demo`: Quant-Noise where this project measured it largest (BENCHMARKS.md, issue 23 B): a trained LM
# made compressible by a short noise fine-tune.  The short version of `recipes/lm --only finetune`:
#   1. build a corpus (the docstrings of ~30 standard-library modules: nothing is downloaded),
#   2. fairseq-train a small transformer LM (2 x 128) for BASE updates: the trained model a user has,
#   3. continue it N updates without noise (plain: equal compute) and N updates with Quant-Noise (true pq noise,
#      NOISE; fairseq-train --restore-file ... --reset-optimizer --quant-noise-*),
#   4. iPQ both (quantnoise quantize: block 8, 256 centroids, every Linear and Embedding), the same centroid
#      fine-tuning for both, export to .qnz, fairseq-eval-lm of each .qnz on TEST,
# then `quantnoise inspect` one file and print the table.  Every fairseq / quantnoise command the recipe ran is
# in $WORK/lm/logs/*.log (the lines starting with '$'): copy and edit.
#
#   CORPUS=my.txt make demo                     # any plain-text corpus (one sentence / paragraph per line)
#   BASE=2000 N=500 NOISE=pq_p0.3 make demo     # a longer baseline / continuation, another noise (<drop|pq>_p<rate>)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/demo}
SIZE=${SIZE:-small}   # tiny: the tests' model, a smoke run in seconds
BASE=${BASE:-1000}
N=${N:-250}
NOISE=${NOISE:-pq_p0.5}   # the rate the stdlib and manual-page VALID figures chose (BENCHMARKS.md, issue 23 B)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
QN="$BIN/python -m quantnoise.cli"
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)

$BIN/python scripts/make_corpus.py "$WORK/text" ${CORPUS:+--text "$CORPUS"} > "$WORK/corpus.log" 2>&1 \
  || { echo "demo: make_corpus failed; see $WORK/corpus.log" >&2; tail -5 "$WORK/corpus.log" >&2; exit 1; }
echo "corpus ${CORPUS:-(stdlib docstrings)}: $(head -c 200 "$WORK/corpus.log" | tr -d '\n')"

PYTHON=$BIN/python recipes/lm/run.sh "$WORK/text/train.txt" "$WORK/text/valid.txt" "$WORK/text/test.txt" "$WORK/lm" \
  --size "$SIZE" --only finetune --ft-base-updates "$BASE" --ft-updates "$N" --ft-candidates "$NOISE" --jobs 2
ln -sfn lm/data-bin "$WORK/data-bin"   # the binarised corpus, where configs/lm_tiny.yaml and roberta_tiny.yaml look

echo "quantnoise inspect $WORK/lm/qnz/ft.ipq_qn.qnz:"
$QN inspect "$WORK/lm/qnz/ft.ipq_qn.qnz" | sed 's/^/    /'

$BIN/python - "$WORK/lm/results.json" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys, time
ft, secs = json.load(open(sys.argv[1]))["finetune"], sys.argv[2]
b, fp = ft["baseline"], ft["fp32"]
rows = [(f"fp32 (trained, + {ft['updates']} plain updates)", fp),
        ("iPQ of it + centroid fine-tune", ft["ipq_plain"]),
        (f"iPQ of the Quant-Noise fine-tune ({ft['noise']})", ft["ipq_qn"])]
print(f"\n{'method (test split)':46s} {'perplexity':>10s} {'file (bytes)':>13s} {'ratio to fp32':>14s}")
for name, e in rows:
    print(f"{name:46s} {e['ppl']:10.2f} {e['bytes']:13d} {fp['bytes'] / e['bytes']:13.1f}x")
gp, gq = ft["ipq_plain"]["ppl"] - fp["ppl"], ft["ipq_qn"]["ppl"] - fp["ppl"]
cut = "n/a (no gap)" if ft["gap_cut"] is None else f"{100 * ft['gap_cut']:.0f}%"
print(f"\niPQ perplexity gap to the fp32 model: plain {gp:+.2f}, Quant-Noise fine-tune {gq:+.2f}: cut by {cut} "
      f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {secs} s on {os.cpu_count()} cores)")
curve = b.get("valid_curve") or []
if curve:  # the honest caveat, from this run's own VALID curve
    best_u, best = min(curve, key=lambda c: c[1])
    if best < 0.98 * curve[-1][1]:
        print(f"Caveat: the baseline overfits this small corpus (VALID perplexity best {best:.2f} at {best_u} updates, "
              f"{curve[-1][1]:.2f} at {curve[-1][0]}), so part of the cut is the noise acting as a regulariser; on two "
              f"larger corpora the same recipe's cut is in BENCHMARKS.md, issue 23 B.")
PY
