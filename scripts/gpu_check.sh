#!/usr/bin/env bash
# GPU validation in one command, for a lent GPU machine (fits one 10-minute call on an H100/H200).
#
#   OUT=/path/to/results bash scripts/gpu_check.sh
#   OUT=... STEPS="targets cputests" bash scripts/gpu_check.sh     # a second call for what the first had no time for
#
# Steps (STEPS, in this order of priority; default all but cputests):
#   env       nvidia-smi, torch/triton versions, the GPU's architecture
#   install   this checkout, offline, into the image's python3 (torch, triton, cupy, nvidia-ml-py are already there);
#             setup.py builds the CUDA cubins for this GPU's architecture only (TOKPROF_CUDA_ARCHS), in parallel
#   run       a full `tokprof run` at its GPU defaults (ceilings, bottom-up, end to end, reconciliation, report):
#             first, because its RunResult is the reference data the CPU default and the reports use (~5 min)
#   gputests  the `gpu` tests (compiled Triton, the CUDA backend, graphs, NVML), one at a time on the one GPU
#   targets   the kernel targets of the kernel issue (a pass/fail table) and an A/A repeat of the Llama-3.1-8B decode
#             shapes in events mode without energy (share of kernels SAME within noise; target >= 95%)
#   compile   scripts/triton_compile_check.py for this GPU's architecture with the image's Triton (registers,
#             spills, shared memory of every Triton kernel at the configs the wrappers choose)
#   cputests  the rest of the suite (what CI also runs), in parallel where pytest-xdist is installed; only when
#             named in STEPS
# One 10-minute call fits env, install and run, and gputests as far as the budget goes; a second call
# (STEPS="env install gputests targets compile") does the rest: a released machine comes back bare, so every call
# installs again.
# Each step logs to its own file, runs under a time limit that never passes the budget (BUDGET_S, default 560 s,
# minus RESERVE_S for stopping a step and packing), and the script goes on after a failing step. After every step
# $OUT receives summary.txt (the step table and the last lines of each log) and gpu-check.tgz (every log, RunResult,
# report and target file; split into gpu-check.tgz.part-* when over 15 MB), so a call cut short still brings back
# what was done.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/gpu-check}
STEPS=${STEPS:-env install run gputests targets compile}
RESERVE_S=${RESERVE_S:-25}
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-python3}
export TOKPROF_HISTORY_DB="$WORK/history.db" TOKPROF_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
budget_end=$(( $(date +%s) + ${BUDGET_S:-560} - RESERVE_S ))
: >"$WORK/steps.txt"

collect() {  # summary.txt and gpu-check.tgz in $OUT, from what $WORK holds now
  {
    cat "$WORK/steps.txt"
    for f in $STEPS; do
      [ -f "$WORK/$f.log" ] && { echo; echo "== $f (last 60 lines)"; tail -n 60 "$WORK/$f.log"; }
    done
  } >"$OUT/summary.txt"
  local f
  for f in "$WORK"/run/run-*.json; do  # the reference RunResult itself, beside the archive, when it fits
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 15000000 ] && cp "$f" "$OUT/"
  done
  local tgz="$WORK.tgz"  # outside $WORK, so the archive does not take itself in
  rm -f "$OUT"/gpu-check.tgz "$OUT"/gpu-check.tgz.part-*
  tar czf "$tgz" -C "$WORK" --exclude cache . 2>/dev/null
  if [ "$(stat -c %s "$tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then  # the tool brings files <= 16 MiB
    # history.db holds a second copy of every RunResult (every timing sample).
    tar czf "$tgz" -C "$WORK" --exclude cache --exclude report --exclude '*.png' --exclude history.db . 2>/dev/null
  fi
  if [ "$(stat -c %s "$tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
    # Still too big (RunResults keep every sample): 15 MB parts, 7 at most come back beside summary.txt.
    # Rejoin with: cat gpu-check.tgz.part-* > gpu-check.tgz
    split -b 15000000 "$tgz" "$OUT/gpu-check.tgz.part-"
  else
    cp "$tgz" "$OUT/gpu-check.tgz"
  fi
}

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit (never past the budget), log, record the exit code
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$(( budget_end - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "$name skipped: budget spent" | tee -a "$WORK/steps.txt"; collect; return; fi
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local verdict=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict=" (stopped at its time limit)"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit$verdict" | tee -a "$WORK/steps.txt"
  collect
}

# The GPU's architecture (sm_90 on an H100 or H200): cubins for it alone halve the install's nvcc time.
ARCH=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm_{m}{n}")' 2>/dev/null || echo sm_90)
export TOKPROF_CUDA_ARCHS=${TOKPROF_CUDA_ARCHS:-$ARCH}
ARCH_NUM=${ARCH#sm_}  # the compile check takes 80 or 90
TIMEOUT_OPT=""  # one test that hangs must not take the whole step
$PY -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_OPT="--timeout=120"
XDIST_OPT=""
$PY -c 'import xdist' 2>/dev/null && XDIST_OPT="-n 8"

step env 60 bash -c "nvidia-smi; echo TOKPROF_CUDA_ARCHS=$TOKPROF_CUDA_ARCHS; $PY -c 'import torch, triton; \
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
step install 120 $PY -m pip install -e . --no-deps --no-build-isolation
step run 330 $PY -m tokprof.cli run --out "$WORK/run"
step gputests 150 $PY -m pytest -q -p no:cacheprovider -m gpu $TIMEOUT_OPT tests --junitxml="$WORK/gputests.xml"
step targets 200 $PY -m tokprof.targets --out "$WORK/targets/targets.json" --repeat 2 --aa-modes events \
  --no-aa-energy --timeout-s 0.5
step compile 120 env -u TRITON_INTERPRET $PY scripts/triton_compile_check.py --arch "$ARCH_NUM"
step cputests 300 $PY -m pytest -q -p no:cacheprovider -m "not gpu" $TIMEOUT_OPT $XDIST_OPT tests \
  --junitxml="$WORK/cputests.xml"

collect
tail -n 80 "$OUT/summary.txt"
