#!/usr/bin/env bash
# GPU validation in one command, for a lent GPU machine (fits one 10-minute call on an H100/H200).
#
#   OUT=/path/to/results bash scripts/gpu_check.sh
#
# 1. installs this checkout offline into the image's python3 (torch, triton, cupy, nvidia-ml-py are already there);
# 2. runs the test suite with compiled Triton and the CUDA backend (the `gpu` tests included);
# 3. measures the kernel targets of the kernel issue (a pass/fail table) and an A/A repeat of the Llama-3.1-8B
#    decode shapes (share of kernels SAME within noise; target >= 95%);
# 4. runs a full `tokprof run` (ceilings, bottom-up, end to end, reconciliation, report, history).
# Each step logs to its own file and the script goes on after a failing step. $OUT receives summary.txt (the step
# table and the last lines of each log) and gpu-check.tgz (every log, RunResult, report and target file), since the
# device tool brings back only a few files.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/gpu-check}
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-python3}
export TOKPROF_HISTORY_DB="$WORK/history.db" TOKPROF_CACHE_DIR="$WORK/cache"
unset TRITON_INTERPRET
budget_end=$(( $(date +%s) + ${BUDGET_S:-560} ))

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit (never past the budget), log, record the exit code
  local name=$1 limit=$2; shift 2
  local left=$(( budget_end - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "$name skipped: budget spent" | tee -a "$WORK/steps.txt"; return; fi
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$WORK/steps.txt"
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step install 120 $PY -m pip install -e . --no-deps --no-build-isolation
step tests 200 $PY -m pytest -q -p no:cacheprovider tests --junitxml="$WORK/tests.xml"
step targets 150 $PY -m tokprof.targets --out "$WORK/targets.json" --repeat 2
step run 200 $PY -m tokprof.cli run --out "$WORK/run"

{
  cat "$WORK/steps.txt"
  for f in env install tests targets run; do
    [ -f "$WORK/$f.log" ] && { echo; echo "== $f (last 60 lines)"; tail -n 60 "$WORK/$f.log"; }
  done
} >"$OUT/summary.txt"
tar czf "$OUT/gpu-check.tgz" -C "$WORK" --exclude cache .
cat "$OUT/summary.txt" | tail -n 80
