#!/usr/bin/env bash
# GPU probe: one short train_gpt.py run at the record shape on ONE lent H100/H200, synthetic data.
#
# Measures ms/step, compile time, peak memory, attention backend, tokens/s, GPTQ time, eval
# tokens/s (sliding, TTT) and extrapolates steps in 600 s on 8 GPUs, into $OUT/gpu_probe.txt
# (plus the raw timestamped log). Built to finish inside the device tool's 600 s per-command limit.
#
# Run through the device tool from the repo root, e.g.
#   run(command="bash bench/gpu_probe.sh", carry=["data/tokenizers"], timeout_s=600)
# then record the figures here, from the files that came back:
#   python bench/probe_report.py --log <files_at>/train_stdout_ts.txt --results bench/RESULTS.md
# carry data/tokenizers (git-ignored) holding fineweb_8192_bpe.model (or fineweb_1024_bpe.model) so
# the embedding has the record's size; without it the 512-token data/tiny tokenizer is used and the
# report says so. Defaults: 11L d=512 seq 2048 (train_gpt.py's), TRAIN_BATCH_TOKENS=98304 = the
# per-GPU share of 786432 on 8 GPUs, one micro-batch per step, COMPILE=1.
# Environment overrides: ITERATIONS (100), PROBE_SECONDS (520, timeout of the training run),
# PROBE_TRAIN_TOKENS (12000000), PROBE_VAL_TOKENS (1000000), TOKENIZER_PATH, COMPRESSOR, COMPILE (1),
# PYTHON (python3). Any other train_gpt.py knob passes through from the environment.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_probe_out}
PY=${PYTHON:-python3}
PROBE_SECONDS=${PROBE_SECONDS:-520}
WORK=$(mktemp -d)
REPORT=$OUT/gpu_probe.txt
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# ----------------------------------------------------------------------------- tokenizer and data
if [ -z "${TOKENIZER_PATH:-}" ]; then
  for candidate in data/tokenizers/fineweb_8192_bpe.model data/tokenizers/fineweb_1024_bpe.model \
                   data/tiny/tokenizer.model; do
    if [ -f "$candidate" ]; then TOKENIZER_PATH=$candidate; break; fi
  done
fi
VOCAB=$("$PY" -c 'import sys, sentencepiece as s; print(s.SentencePieceProcessor(model_file=sys.argv[1]).vocab_size())' \
  "$TOKENIZER_PATH") || { echo "error: cannot load tokenizer $TOKENIZER_PATH" | tee "$REPORT"; exit 1; }
PROBE_VAL_TOKENS=${PROBE_VAL_TOKENS:-1000000}
"$PY" bench/synthetic_shards.py --out "$WORK/data" --vocab "$VOCAB" \
  --train-tokens "${PROBE_TRAIN_TOKENS:-12000000}" --val-tokens "$PROBE_VAL_TOKENS"

# brotli is train_gpt.py's default compressor but is not installed on every image
if [ -z "${COMPRESSOR:-}" ]; then
  if "$PY" -c 'import brotli' 2>/dev/null; then COMPRESSOR=brotli; else COMPRESSOR=lzma; fi
fi
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1

# ----------------------------------------------------------------------------- the run
start=$(date +%s.%N)
env DATA_PATH="$WORK/data" TOKENIZER_PATH="$TOKENIZER_PATH" VOCAB_SIZE="$VOCAB" RUN_ID=gpu_probe \
    ARTIFACT_PATH="$WORK/model.pgart" COMPRESSOR="$COMPRESSOR" COMPILE="${COMPILE:-1}" \
    TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-98304}" GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-1}" \
    ITERATIONS="${ITERATIONS:-100}" MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-240}" \
    TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-5}" VAL_LOSS_EVERY=0 EVAL_MAX_SECONDS="${EVAL_MAX_SECONDS:-150}" \
  timeout --kill-after=15 "$PROBE_SECONDS" "$PY" -u train_gpt.py 2> "$OUT/train_stderr.txt" \
  | "$PY" -u -c '
import sys, time
for line in sys.stdin:  # prefix each line with its arrival time, for phase timings
    sys.stdout.write(f"{time.time():.3f} {line}")
    sys.stdout.flush()
' | tee "$OUT/train_stdout_ts.txt"
rc=${PIPESTATUS[0]}
end=$(date +%s.%N)

# ----------------------------------------------------------------------------- report
wall=$("$PY" -c "print(f'{$end - $start:.1f}')")
echo "$end probe_exit code:$rc wall_s:$wall" >> "$OUT/train_stdout_ts.txt"
{
  echo "# tokenizer: $TOKENIZER_PATH (vocab $VOCAB)$([ "$VOCAB" -lt 1024 ] && echo ' -- NOT the record vocab; carry data/tokenizers')"
  echo "# compressor: $COMPRESSOR; data: synthetic Zipf tokens (bench/synthetic_shards.py), val $PROBE_VAL_TOKENS tokens"
  "$PY" bench/probe_report.py --log "$OUT/train_stdout_ts.txt"
  echo "# last lines of stderr:"
  tail -n 15 "$OUT/train_stderr.txt" | sed 's/^/#   /'
} > "$REPORT"
cat "$REPORT"
rm -rf "$WORK"
exit "$rc"
