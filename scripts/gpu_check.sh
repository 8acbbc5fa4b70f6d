#!/usr/bin/env bash
# The project's CUDA paths in one command, on a machine with a GPU (a few minutes):
#
#   bash scripts/gpu_check.sh [OUT]          # OUT: the results folder (default gpu_check/)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh OUT   # the same steps on the CPU, tiny (tests/test_gpu_check.py)
#
#   1. env        nvidia-smi, torch / CUDA versions, the device
#   2. tests      every CUDA test of the suite (pytest -k cuda: dtypes, runtime layers, fairseq mixed precision)
#   3. train      fairseq-train on the GPU, --fp16 and --amp, each noise scheme (drop, scalar int8, pq): 60 updates
#                 of a small LM; passes when every logged loss is finite and the last is below the first
#   4. ipq+eval   iPQ of the pq --fp16 checkpoint, centroids fine-tuned nowhere (post hoc), `quantnoise export`
#                 to .qnz, then fairseq-eval-lm of the .qnz on the GPU (runs compressed) and of the decoded model
#   5. bench      benchmarks/train.py --device cuda: noise overhead per train step, as a ratio to no noise
#   6. aqlm_vllm  only where `python -c "import vllm"` works (vLLM is no dependency): a small iPQ Llama written with
#                 hf.save_pretrained(format="aqlm"), served by vLLM in fp16, its greedy tokens against quantnoise's
#
# Everything goes to OUT: one log per step, OUT/summary.md (PASS / FAIL per step, the figures), OUT/bench.json.
# A failed step does not stop the others; the exit status is the number of failed steps (0: all passed).
# Python: $PYTHON, else the repository's .venv/bin/python, else python3; it needs torch with CUDA, fairseq-fixed,
# faiss and this checkout (put first on PYTHONPATH here).  No network is used.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
BIN=$(dirname "$PY")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
UD=$ROOT/quantnoise/qn_fairseq
SUMMARY=$OUT/summary.md
FAILED=0
DRY=${GPU_CHECK_DRY_RUN:-}  # the script's own test, on a machine without CUDA: CPU, amp only, tiny sizes
tool() { if [ -x "$BIN/$1" ]; then echo "$BIN/$1"; else command -v "$1"; fi; }

result() {  # result NAME STATUS DETAIL
  echo "| $1 | $2 | $3 |" >> "$SUMMARY"
  echo "gpu_check: $1: $2 $3"
  [ "$2" = PASS ] || FAILED=$((FAILED + 1))
}

{
  echo "# quantnoise GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)"
  echo
  echo "| step | status | detail |"
  echo "|---|---|---|"
} > "$SUMMARY"

# 1. env ---------------------------------------------------------------------------------------------------
{ nvidia-smi 2>&1 || true; "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "capability", f"{p.major}.{p.minor}")
    print("bf16", torch.cuda.is_bf16_supported())
EOF
} > "$OUT/env.txt" 2>&1
if [ -z "$DRY" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  result env FAIL "torch sees no CUDA device ($(grep '^torch' "$OUT/env.txt" | head -1)); nothing else was run"
  exit 1
fi
for mod in fairseq faiss quantnoise; do
  "$PY" -c "import $mod" 2>/dev/null || { result env FAIL "python cannot import $mod ($PY)"; exit 1; }
done
result env PASS "$(grep '^device' "$OUT/env.txt" || echo "dry run on the CPU")"

# 2. the CUDA tests ----------------------------------------------------------------------------------------
"$PY" -m quantnoise.runtime > "$OUT/kernels.log" 2>&1  # the CPU kernels, so the suite's fixtures match CI
"$PY" -m pytest -q -rs -p no:cacheprovider -k cuda --ignore tests/test_gpu_check.py tests > "$OUT/tests.log" 2>&1
rc=$?
line=$(grep -E "passed|failed|error|skipped|deselected" "$OUT/tests.log" | tail -1)
if [ $rc -eq 0 ] && { [ -n "$DRY" ] || ! grep -q "skipped" <<< "$line"; }; then result tests PASS "$line"
else result tests FAIL "$line (rc $rc; a CUDA test skipped on a CUDA machine counts as a failure)"; fi

# 3. fairseq-train on the GPU ------------------------------------------------------------------------------
DATA=$OUT/data
if [ ! -f "$DATA/bin/dict.txt" ]; then
  "$PY" scripts/make_corpus.py "$DATA/txt" --max-lines "${DRY:+400}${DRY:-3000}" > "$OUT/data.log" 2>&1 &&
  "$(tool fairseq-preprocess)" --only-source --trainpref "$DATA/txt/train.txt" --validpref "$DATA/txt/valid.txt" \
    --testpref "$DATA/txt/test.txt" --destdir "$DATA/bin" --workers 2 --thresholdsrc 2 >> "$OUT/data.log" 2>&1
fi
COMMON=(--task language_modeling --arch qn_transformer_lm --decoder-layers 2 --decoder-embed-dim 256
        --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 --tokens-per-sample 128 --max-tokens 4096
        --optimizer adam --lr 0.001 --lr-scheduler inverse_sqrt --warmup-updates 10 --max-update 60
        --log-format simple --log-interval 10 --no-progress-bar --num-workers 0 --seed 1 --no-epoch-checkpoints
        --disable-validation --user-dir "$UD")
PRECISIONS=(fp16 amp)
if [ -n "$DRY" ]; then
  COMMON+=(--cpu --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --tokens-per-sample 32 --max-tokens 512 --max-update 12
           --log-interval 4)
  PRECISIONS=(amp)
fi
declare -A SCHEME=([drop]="--quant-noise-scheme drop --quant-noise-p 0.1"
                   [scalar]="--quant-noise-scheme scalar --quant-noise-bits 8 --quant-noise-p 0.1"
                   [pq]="--quant-noise-scheme pq --quant-noise-p 0.1 --quant-noise-refresh-every 20")
for prec in "${PRECISIONS[@]}"; do
  for s in drop scalar pq; do
    name=train_${s}_$prec
    # shellcheck disable=SC2086
    "$(tool fairseq-train)" "$DATA/bin" "${COMMON[@]}" ${SCHEME[$s]} --$prec --save-dir "$OUT/ck_${s}_$prec" \
      > "$OUT/$name.log" 2>&1
    rc=$?
    verdict=$("$PY" - "$OUT/$name.log" <<'EOF'
import math, re, sys
losses = [float(v) for v in re.findall(r"train_inner .* loss=([0-9.e+-]+|nan|inf),", open(sys.argv[1]).read())]
ok = len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
print(("PASS" if ok else "FAIL") + f" losses {losses[:1]} ... {losses[-1:]} ({len(losses)} logged)")
EOF
)
    [ $rc -eq 0 ] || verdict="FAIL exit $rc: $(tail -1 "$OUT/$name.log")"
    result "$name" "${verdict%% *}" "${verdict#* }"
  done
done

# 4. iPQ + .qnz + fairseq-eval-lm on the GPU ---------------------------------------------------------------
CK=$OUT/ck_pq_${PRECISIONS[0]}/checkpoint_last.pt
EVAL=(--gen-subset valid --tokens-per-sample 128 --max-tokens 4096 --user-dir "$UD" --num-workers 0 ${DRY:+--cpu})
if [ -f "$CK" ] &&
   "$PY" -m quantnoise.cli quantize "$CK" -o "$OUT/pq.pt" --scheme pq --block-size 8 --centroids "${DRY:+16}${DRY:-256}" \
     > "$OUT/ipq.log" 2>&1 &&
   "$PY" -m quantnoise.cli export "$OUT/pq.pt" -o "$OUT/pq.qnz" >> "$OUT/ipq.log" 2>&1 &&
   "$PY" -m quantnoise.cli inspect "$OUT/pq.qnz" >> "$OUT/ipq.log" 2>&1; then
  "$(tool fairseq-eval-lm)" "$DATA/bin" --path "$OUT/pq.qnz" "${EVAL[@]}" > "$OUT/eval_qnz.log" 2>&1; rc1=$?
  QUANTNOISE_QNZ_DECODE=1 "$(tool fairseq-eval-lm)" "$DATA/bin" --path "$OUT/pq.qnz" "${EVAL[@]}" \
    > "$OUT/eval_decoded.log" 2>&1; rc2=$?
  p1=$(grep -o "Perplexity: [0-9.]*" "$OUT/eval_qnz.log" | tail -1)
  p2=$(grep -o "Perplexity: [0-9.]*" "$OUT/eval_decoded.log" | tail -1)
  if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && [ -n "$p1" ] && [ -n "$p2" ] &&
     { [ -n "$DRY" ] || grep -q "cuda" "$OUT/eval_qnz.log"; }; then
    result ipq_eval PASS "compressed .qnz ${p1}, decoded ${p2}, $(stat -c %s "$OUT/pq.qnz") bytes"
  else
    result ipq_eval FAIL "eval-lm exit $rc1 / $rc2, compressed '${p1}', decoded '${p2}' (see eval_*.log)"
  fi
else
  result ipq_eval FAIL "quantize / export / inspect failed (see ipq.log)"
fi

# 5. train-step overhead on the GPU ------------------------------------------------------------------------
BENCH=(--device cuda --rounds 5 --steps 3)
[ -z "$DRY" ] || BENCH=(--device cpu --rounds 1 --steps 1 --threads 1 --layers 1)
if "$PY" benchmarks/train.py "${BENCH[@]}" --json "$OUT/bench.json" --record "$OUT/bench_record.json" > "$OUT/bench.md" 2> "$OUT/bench.log"; then
  result bench PASS "benchmarks/train.py ${BENCH[*]}: see bench.md"
  { echo; echo "## benchmarks/train.py ${BENCH[*]}"; echo; cat "$OUT/bench.md"; } >> "$SUMMARY"
else
  result bench FAIL "$(tail -1 "$OUT/bench.log")"
fi

# 6. an AQLM folder in vLLM (docs/hf.md, "AQLM export"); skipped, with no row, where vLLM is not installed ---------
if [ -z "$DRY" ] && "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" - "$OUT/aqlm" > "$OUT/aqlm_vllm.log" 2>&1 <<'EOF'
import sys

import torch
import transformers as tf
import vllm
from quantnoise import LayerRule, compress_
from quantnoise import hf

torch.manual_seed(0)  # large initial weights: peaked logits, so fp16 rounding does not flip a greedy choice
model = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                           num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                           max_position_embeddings=256, initializer_range=0.2)).eval()
compress_(model, LayerRule(block_size=8, n_centroids=256))
folder = hf.save_pretrained(model, sys.argv[1], format="aqlm")
ours = hf.from_pretrained(hf.save_pretrained(model, sys.argv[1] + "-qnz"))  # the runtime, CPU fp32, same codebooks
prompt = list(range(3, 11))
with torch.no_grad():
    want = ours.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
llm = vllm.LLM(model=str(folder), dtype="float16", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
               gpu_memory_utilization=0.3)
params = vllm.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, detokenize=False)
got = list(llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids)
print("vllm      ", got)
print("quantnoise", want)
agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
print(("PASS" if agree >= 8 else "FAIL") + f" vLLM {vllm.__version__} served the AQLM folder: its first {agree} of 16 "
      f"greedy tokens are quantnoise's")
EOF
  verdict=$(grep -E "^(PASS|FAIL) " "$OUT/aqlm_vllm.log" | tail -1)
  [ -n "$verdict" ] || verdict="FAIL $(tail -1 "$OUT/aqlm_vllm.log") (see aqlm_vllm.log)"
  result aqlm_vllm "${verdict%% *}" "${verdict#* }"
else
  echo "gpu_check: aqlm_vllm: skipped (no vLLM here${DRY:+, or a dry run})"
fi

echo "gpu_check: $FAILED step(s) failed; results in $OUT (summary.md)"
exit "$FAILED"
