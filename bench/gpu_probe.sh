#!/usr/bin/env bash
# GPU acceptance run (bench/gpu_probe.py, issue 23) on one lent GPU, from the project root, with .gpu/
# prepared as ../shared/gpu/README.md says (wheels in .gpu/whl: zstandard, brotli and constriction, the
# default COMPRESSOR=rans's coder; english.jsonl, fineweb_8192_bpe.model):
#   run(command="bash bench/gpu_probe.sh", carry=[".gpu"], timeout_s=480)
# The table is OUT/gpu_probe.md (also printed); OUT/model.pgart is the trained artifact. Then, here:
#   python bench/gpu_probe.py --report <files_at> --results bench/RESULTS.md
# --dry-run runs the same pipeline on CPU at a tiny shape (the tests do). Knobs: see bench/gpu_probe.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import zstandard, brotli, constriction' 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/probe_site .gpu/whl/*.whl \
    || { echo "error: installing the carried wheels in .gpu/whl failed"; exit 1; }
  export PYTHONPATH=/tmp/probe_site${PYTHONPATH:+:$PYTHONPATH}
fi
[ "${1:-}" = "--dry-run" ] || nvidia-smi > "${OUT:-/tmp/gpu_probe_out}.nvidia_smi.txt" 2>&1
exec "$PY" bench/gpu_probe.py "$@"
