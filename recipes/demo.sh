#!/usr/bin/env bash
# The main job on a small embedded default (`make demo`): build a corpus, binarise it with
# fairseq-preprocess, train a tiny transformer_lm with fairseq-train twice (no noise, and
# Quant-Noise int4), then evaluate each with fairseq-eval-lm in full precision and fully int4
# quantized.  Copy and edit: every step is a stock fairseq command plus `--user-dir`.
#
#   CORPUS=my.txt make demo     # any plain-text corpus instead of the generated default
#   UPDATES=600 make demo       # longer training
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=${WORK:-runs/demo}
UPDATES=${UPDATES:-400}
USER_DIR=$($BIN/quantnoise user-dir)
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$WORK" && mkdir -p "$WORK"
log() { printf '\n== %s\n' "$*"; }

log "corpus ${CORPUS:-(stdlib docstrings)}"
$BIN/python scripts/make_corpus.py "$WORK/text" ${CORPUS:+--text "$CORPUS"}
$BIN/fairseq-preprocess --only-source --trainpref "$WORK/text/train.txt" --validpref "$WORK/text/valid.txt" \
  --testpref "$WORK/text/test.txt" --destdir "$WORK/data-bin" --workers 2 --thresholdsrc 2 > "$WORK/preprocess.log" 2>&1

MODEL=(--task language_modeling --arch qn_transformer_lm_tiny --decoder-embed-dim 128 --decoder-ffn-embed-dim 512
       --decoder-layers 2 --decoder-attention-heads 4 --tokens-per-sample 64 --max-tokens 2048 --dropout 0.1
       --optimizer adam --adam-betas '(0.9,0.98)' --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 50
       --max-update "$UPDATES" --no-epoch-checkpoints --disable-validation --seed 1 --num-workers 0
       --log-format simple --log-interval 100)
NOISE=(--quant-noise-scheme scalar --quant-noise-bits 4 --quant-noise-granularity tensor)

train() {  # name, extra flags...
  local name=$1; shift
  log "fairseq-train $name ($UPDATES updates)"
  $BIN/fairseq-train "$WORK/data-bin" --user-dir "$USER_DIR" "${MODEL[@]}" --save-dir "$WORK/$name" "$@" \
    > "$WORK/$name.train.log" 2>&1 || { tail -20 "$WORK/$name.train.log"; exit 1; }
  grep -E "train \| epoch|done training" "$WORK/$name.train.log" | tail -2
}
ppl() {  # checkpoint dir, model overrides -> perplexity on valid
  $BIN/fairseq-eval-lm "$WORK/data-bin" --user-dir "$USER_DIR" --path "$1/checkpoint_last.pt" --gen-subset valid \
    --tokens-per-sample 64 --max-tokens 2048 --num-workers 0 --model-overrides "$2" 2>&1 \
    | sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p' | tail -1
}

train plain --quant-noise-p 0
train quant_noise "${NOISE[@]}" --quant-noise-p 0.5

INT4="{'quant_noise_scheme': 'scalar', 'quant_noise_bits': 4, 'quant_noise_granularity': 'tensor', 'quant_noise_eval_quantized': True}"
log "validation perplexity (fairseq-eval-lm)"
printf '%-22s %14s %22s\n' "model" "fp32 weights" "int4 weights (tensor)"
for run in plain quant_noise; do
  printf '%-22s %14s %22s\n' "$run" "$(ppl "$WORK/$run" "{}")" "$(ppl "$WORK/$run" "$INT4")"
done
