#!/usr/bin/env bash
# `make demo`: Quant-Noise where this project measured it largest: a trained LM made compressible by a short noise
# fine-tune, over seeds.  The short version of `recipes/lm --only finetune`:
#   1. build a corpus (the docstrings of ~30 standard-library modules: nothing is downloaded),
#   2. fairseq-train a small transformer LM (2 x 128) until its VALID perplexity stops improving (patience 3, at most
#      BASE updates): the trained model a user has, shared by every seed,
#   3. per seed (SEEDS of them): continue it N updates without noise (plain: equal compute) and N updates with
#      Quant-Noise (true pq noise, NOISE; fairseq-train --restore-file ... --reset-optimizer --quant-noise-*),
#   4. iPQ both (quantnoise quantize: block 8, 256 centroids, every Linear and Embedding, the seed's k-means), the same
#      centroid fine-tuning for both, export to .qnz, fairseq-eval-lm of each .qnz on TEST,
# then `quantnoise inspect` one file and print each seed's cut, the mean with its 90% interval, the machine and the
# date.  Every fairseq / quantnoise command the recipe ran is in $WORK/lm/logs/*.log (the lines starting with '$').
#
#   CORPUS=my.txt make demo                     # any plain-text corpus (one sentence / paragraph per line)
#   BASE=2000 N=500 NOISE=pq_p0.3 SEEDS=5 make demo   # a longer baseline cap / continuation, another noise, more seeds
#   RECORD=results/demo.json make demo          # also write the run's record there (BENCHMARKS.md renders it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/demo}
SIZE=${SIZE:-small}   # tiny: the tests' model, a smoke run in seconds
BASE=${BASE:-1000}    # the baseline's cap: it stops earlier when VALID stops improving
N=${N:-250}
SEEDS=${SEEDS:-3}
NOISE=${NOISE:-pq_p0.5}   # the rate the stdlib and manual-page VALID figures chose (recipes/lm/README.md)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
QN="$BIN/python -m quantnoise.cli"
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)

$BIN/python scripts/make_corpus.py "$WORK/text" ${CORPUS:+--text "$CORPUS"} > "$WORK/corpus.log" 2>&1 \
  || { echo "demo: make_corpus failed; see $WORK/corpus.log" >&2; tail -5 "$WORK/corpus.log" >&2; exit 1; }
echo "corpus ${CORPUS:-(stdlib docstrings)}: $(head -c 200 "$WORK/corpus.log" | tr -d '\n')"

PYTHON=$BIN/python recipes/lm/run.sh "$WORK/text/train.txt" "$WORK/text/valid.txt" "$WORK/text/test.txt" "$WORK/lm" \
  --size "$SIZE" --only finetune --ft-base-updates auto --ft-base-max "$BASE" --ft-updates "$N" --ft-candidates "$NOISE" \
  --seeds "$SEEDS" --jobs 2 ${RECORD:+--record "$RECORD"}
ln -sfn lm/data-bin "$WORK/data-bin"   # the binarised corpus, where configs/lm_tiny.yaml and roberta_tiny.yaml look

echo "quantnoise inspect $WORK/lm/qnz/ft.ipq_qn.s1.qnz:"
$QN inspect "$WORK/lm/qnz/ft.ipq_qn.s1.qnz" | sed 's/^/    /'

$BIN/python - "$WORK/lm/record.json" "$(( $(date +%s) - T0 ))" <<'PY'
import json, sys
rec, secs = json.load(open(sys.argv[1])), sys.argv[2]
ft, m = rec["figures"]["finetune"], rec["machine"]
b = ft["baseline"]
print(f"\nbaseline: {b['updates']} updates, best VALID {b['best']['valid']:.2f} at {b['best']['updates']}"
      + (f" (stopped: no better VALID in {b['patience']} validations)" if b.get("stopped_early") else " (the cap)")
      + f"; each seed continues it {ft['updates']} updates plain and with {ft['noise']}, then iPQ + centroid fine-tune")
print(f"\n{'seed':>4s} {'fp32 reference':>22s} {'iPQ plain':>10s} {'iPQ noise':>10s} {'cut':>15s}   (test perplexity)")
for e in ft["seeds"]:
    cut = "regularisation" if e["regularised"] else ("n/a" if e["gap_cut"] is None else f"{100 * e['gap_cut']:.0f}%")
    ref = f"{e['reference']['ppl']:.2f} ({'plain' if e['reference']['from'] == 'plain' else 'base best'})"
    print(f"{e['seed']:4d} {ref:>22s} {e['ipq_plain']['ppl']:10.2f} {e['ipq_qn']['ppl']:10.2f} {cut:>15s}")
fp = ft["fp32"]["bytes"]
print(f"\nfiles: fp32 {fp} bytes, iPQ {ft['ipq_plain']['bytes']} ({fp / ft['ipq_plain']['bytes']:.1f}x smaller), "
      f"iPQ of the noise model {ft['ipq_qn']['bytes']} ({fp / ft['ipq_qn']['bytes']:.1f}x)")
print(f"iPQ perplexity gap to the fp32 reference: {ft['verdict']}")
print(f"machine: {m['cpu']}, {m['isa']}, {m['cores']} cores, {m['threads']} thread(s) per process, torch "
      f"{m['versions'].get('torch')}; load average at the end {m['load_avg'][0]}; {rec['date']}; {secs} s wall")
PY
