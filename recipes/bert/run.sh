#!/usr/bin/env bash
# The Q8BERT table on any sentence-classification data: fine-tune all-MiniLM-L6-v2 (+ a classification
# head) in fp32, then int8 QAT (Q8BERT preset, same budget), dynamic int8 (DQ), static PTQ, int4
# post-hoc, Quant-Noise int4 and Q-BERT's Hessian mixed precision (qbert_mixed); TEST accuracy, relative error, exported bytes and sentence-embedding
# cosine to fp32 for each; then the iPQ rows (ipq_posthoc, ipq_qn, ipq_qn_int8: iPQ through quantnoise.compress_, each .qnz read back).  Resumable: rerun the same command after a stop.
#
#   recipes/bert/run.sh TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--size tiny|small|base] [--jobs 2] [--threads 1] [--seed N]
#       [--seeds N] [--epochs N] [--lr X] [--stages a,b]     (recipes/bert/README.md: sizes, times, the measured table)
#       --seeds N: fp32, ipq_posthoc, ipq_qn, int3_qat and qbert3_mixed with N seeds (small: 3), each row's mean and
#       90% interval and the paired differences (README: "Seeds and intervals")
#       [--encoder-noise-steps N] [--encoder-noise-p P,P,P] [--encoder-noise-kind pq|drop] [--encoder-distill last|all]
#       [--text FILE]: issue 34's task-agnostic noise distillation of the encoder (ipq_qn_encoder, its control
#       ipq_posthoc_encoder, the sentence-embedding row enc_sentence; README: "A task-agnostic Quant-Noise distillation")
#   recipes/bert/run.sh TRAIN.tsv DEV.tsv TEST.tsv OUTDIR --model roberta [--size tiny|small] [--jobs 2] [--seed N]
#       (a small fairseq RoBERTa trained from scratch with fairseq-train's sentence_prediction: roberta.py)
#
# Input: one `label<TAB>text` per line, any number of labels (scripts/make_fortunes_task.py builds
# one from Debian's fortunes package).  Output: OUTDIR/results.md, OUTDIR/results.json, OUTDIR/log.txt,
# OUTDIR/record.json, OUTDIR/quality_vs_size.png.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ $# -lt 4 ]; then
  echo "usage: $0 TRAIN.tsv DEV.tsv TEST.tsv OUTDIR [--model minilm|roberta] [--size tiny|small|base] [--jobs 2] [--threads 1] [--seed N] [--seeds N]" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
SCRIPT=table.py ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) case "${2:-}" in
               minilm) ;; roberta) SCRIPT=roberta.py ;;
               *) echo "error: --model '${2:-}': choose minilm (the default) or roberta" >&2; exit 2 ;;
             esac; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
exec "$PY" "$ROOT/recipes/bert/$SCRIPT" "${ARGS[@]}"
