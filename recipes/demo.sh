#!/usr/bin/env bash
# `make demo`: the short version of recipes/lm (the full table, sweep and ablations are there).
# Build a corpus, binarise it, train a small transformer LM twice with fairseq-train (no noise, and
# Quant-Noise: the drop proxy of iPQ noise), iPQ both (block 8, 256 centroids, every Linear and
# Embedding), fine-tune the centroids, export each to .qnz, `quantnoise inspect` one file, evaluate the
# .qnz files with fairseq-eval-lm on the test split and print the table.  Every step is a stock fairseq
# command plus `--user-dir`, or a `quantnoise` command: copy and edit.
#
#   CORPUS=my.txt make demo     # any plain-text corpus (one sentence / paragraph per line)
#   UPDATES=600 P=0.1 make demo # longer training, another noise rate
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=${WORK:-runs/demo}
UPDATES=${UPDATES:-400}
FT=${FT:-100}
P=${P:-0.1}   # drop rate: the paper's value for the iPQ proxy (recipes/lm --size small chose 0.05 on VALID)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
QN="$BIN/python -m quantnoise.cli"
USER_DIR=$($QN user-dir)
rm -rf "$WORK" && mkdir -p "$WORK"
T0=$(date +%s)
step() { printf '[%4ss] %s\n' $(( $(date +%s) - T0 )) "$*"; }
fail() { echo "demo: $1 failed; see $2" >&2; tail -5 "$2" >&2; exit 1; }

$BIN/python scripts/make_corpus.py "$WORK/text" ${CORPUS:+--text "$CORPUS"} > "$WORK/corpus.log" 2>&1 || fail corpus "$WORK/corpus.log"
$BIN/fairseq-preprocess --only-source --trainpref "$WORK/text/train.txt" --validpref "$WORK/text/valid.txt" \
  --testpref "$WORK/text/test.txt" --destdir "$WORK/data-bin" --workers 1 --thresholdsrc 2 > "$WORK/preprocess.log" 2>&1 \
  || fail fairseq-preprocess "$WORK/preprocess.log"
step "corpus ${CORPUS:-(stdlib docstrings)}: $(head -c 200 "$WORK/corpus.log" | tr -d '\n'), vocabulary $(wc -l < "$WORK/data-bin/dict.txt") words"

MODEL=(--task language_modeling --arch qn_transformer_lm --decoder-layers 2 --decoder-embed-dim 128 --decoder-input-dim 128
       --decoder-output-dim 128 --decoder-ffn-embed-dim 512
       --decoder-attention-heads 4 --decoder-normalize-before --dropout 0.1 --tokens-per-sample 128 --max-tokens 1024
       --optimizer adam --adam-betas '(0.9,0.98)' --lr-scheduler inverse_sqrt --seed 1 --num-workers 0
       --no-epoch-checkpoints --disable-validation --log-format simple --log-interval 100 --no-progress-bar)
train() {  # name, updates, lr, warmup, extra flags... (background; the two runs share the cores)
  local name=$1 updates=$2 lr=$3 warmup=$4; shift 4
  $BIN/fairseq-train "$WORK/data-bin" --user-dir "$USER_DIR" "${MODEL[@]}" --lr "$lr" --warmup-updates "$warmup" \
    --max-update "$updates" --save-dir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
}
ppl() {  # checkpoint or .qnz -> test perplexity
  $BIN/fairseq-eval-lm "$WORK/data-bin" --user-dir "$USER_DIR" --path "$1" --gen-subset test --tokens-per-sample 128 \
    --max-tokens 1024 --num-workers 0 > "$1.eval.log" 2>&1 || fail fairseq-eval-lm "$1.eval.log"
  sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p' "$1.eval.log" | tail -1
}

train plain "$UPDATES" 0.003 40 --quant-noise-p 0 & a=$!
train quant_noise "$UPDATES" 0.003 40 --quant-noise-scheme drop --quant-noise-p "$P" --quant-noise-block-size 8 & b=$!
wait $a || fail "fairseq-train plain" "$WORK/plain.log"
wait $b || fail "fairseq-train quant_noise" "$WORK/quant_noise.log"
step "fairseq-train plain and quant_noise (drop p=$P, block 8): $UPDATES updates each"

for m in plain quant_noise; do
  $QN quantize "$WORK/$m/checkpoint_last.pt" -o "$WORK/$m.ipq.pt" --scheme pq --block-size 8 --centroids 256 \
    > "$WORK/$m.quantize.log" 2>&1 || fail "quantnoise quantize" "$WORK/$m.quantize.log"
done
step "quantnoise quantize: iPQ of every Linear and Embedding (block 8, 256 centroids), both models"

for m in plain quant_noise; do
  train "$m.ft" "$FT" 0.001 10 --restore-file "$WORK/$m.ipq.pt" --reset-optimizer --reset-dataloader \
    --reset-lr-scheduler --reset-meters & eval "pid_$m=\$!"
done
wait $pid_plain || fail "fine-tuning plain" "$WORK/plain.ft.log"
wait $pid_quant_noise || fail "fine-tuning quant_noise" "$WORK/quant_noise.ft.log"
step "fairseq-train --restore-file: $FT updates of centroid fine-tuning, both models"

$QN export "$WORK/plain/checkpoint_last.pt" -o "$WORK/fp32.qnz" --rest float32 > "$WORK/export.log" 2>&1
for m in plain quant_noise; do
  $QN export "$WORK/$m.ft/checkpoint_last.pt" -o "$WORK/$m.ipq.qnz" >> "$WORK/export.log" 2>&1 || fail export "$WORK/export.log"
done
step "quantnoise export: fp32.qnz, plain.ipq.qnz, quant_noise.ipq.qnz"
$QN inspect "$WORK/quant_noise.ipq.qnz" | sed 's/^/    /'
step "quantnoise inspect $WORK/quant_noise.ipq.qnz (above)"

FP32_PPL=$(ppl "$WORK/fp32.qnz"); step "fairseq-eval-lm fp32.qnz"
PLAIN_PPL=$(ppl "$WORK/plain.ipq.qnz"); step "fairseq-eval-lm plain.ipq.qnz"
QN_PPL=$(ppl "$WORK/quant_noise.ipq.qnz"); step "fairseq-eval-lm quant_noise.ipq.qnz"

$BIN/python - "$WORK" "$P" "$FP32_PPL" "$PLAIN_PPL" "$QN_PPL" "$(( $(date +%s) - T0 ))" <<'PY'
import os, sys, time
work, p, fp32, plain, qn, secs = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6]), sys.argv[6]
size = lambda f: os.path.getsize(os.path.join(work, f))
rows = [("fp32 (plain model)", fp32, size("fp32.qnz")), ("iPQ post-hoc + fine-tune", plain, size("plain.ipq.qnz")),
        (f"iPQ Quant-Noise (drop p={p}) + ft", qn, size("quant_noise.ipq.qnz"))]
print(f"\n{'method (test split)':36s} {'perplexity':>10s} {'file (bytes)':>13s} {'ratio to fp32':>14s}")
for name, ppl, b in rows:
    print(f"{name:36s} {ppl:10.2f} {b:13d} {rows[0][2] / b:13.1f}x")
print(f"\niPQ perplexity gap to the fp32 model: post-hoc {plain - fp32:+.2f}, Quant-Noise {qn - fp32:+.2f} "
      f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {secs} s on {os.cpu_count()} cores)")
PY
