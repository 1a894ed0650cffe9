#!/usr/bin/env bash
# First contact with a lent GPU in ONE call (fits a 10-minute command with margin: BUDGET_S, default 520 s).
#
#   TOKPROF_GIT_SHA=$(git rev-parse HEAD) OUT=/path/to/results bash scripts/gpu_check.sh
#   DRY=1 OUT=/tmp/dry bash scripts/gpu_check.sh     # the same logic on the CPU in ~1 minute (tests/test_gpu_check.py)
#
# Steps, in priority order (STEPS overrides the list; each runs under a time limit that never passes the budget, is
# time-logged in steps.txt, and leaves its results in $OUT as soon as it finishes):
#   env       nvidia-smi, torch/triton versions, the GPU's architecture
#   install   this checkout, offline, into the image's python3 (torch, triton, cupy, nvidia-ml-py are there);
#             setup.py builds the CUDA cubins for this GPU's architecture only, in parallel (timed)
#   props     every torch device property, NVML clocks and reasons, the decode-attention configs they imply
#   timing    ~9 representative decode calls timed five ways (events with the host inside the window and a write
#             flush, as before; events with a sleep kernel keeping the host behind; read-only flush; graph mode;
#             host us per call): which method a figure should come from, decided by measurement
#   nvml      a 3 s NVML trace (idle, GEMM load, idle): counter update interval, counter vs sampled power, idle
#             before and after
#   gputests  the `gpu` tests with their durations
#   e2e       Llama-3.1-8B end to end at batch 1 and 32 (1k context), graph and eager
#   run       a reduced `tokprof run` (batch {1, 32} x context {1k, 8k}), time-logged per phase: its RunResult is
#             the reference data (tokprof/data/reference/<gpu>/)
#   targets   the kernel targets (pass/fail against the measured ceilings); only when named in STEPS
#   compile   scripts/triton_compile_check.py for this architecture; only when named in STEPS
#   serve     `tokprof serve-bench` on this GPU (tiny preset, triton, CUDA graphs of the decode steps): the
#             server beside the simulator, energy metered; only when named in STEPS
# $OUT ends with at most 8 files: summary.txt, gpu-check.tgz (every log and result), the RunResult, and the
# props / timing / nvml / e2e JSON files beside it, so the device tool brings all of them back.
# The device's copy of the tree has no .git: pass the sha in TOKPROF_GIT_SHA (or a GIT_SHA file at the root).
set -u
OUT=${OUT:-$PWD/gpu-check-out}
WORK=${WORK:-/tmp/gpu-check}
DRY=${DRY:-0}
STEPS=${STEPS:-env install props timing nvml gputests e2e run}
RESERVE_S=${RESERVE_S:-20}
BUDGET_S=${BUDGET_S:-520}
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-python3}
export TOKPROF_HISTORY_DB="$WORK/history.db" TOKPROF_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
if [ -z "${TOKPROF_GIT_SHA:-}" ]; then
  if git rev-parse HEAD >/dev/null 2>&1; then TOKPROF_GIT_SHA=$(git rev-parse HEAD)
  elif [ -f GIT_SHA ]; then TOKPROF_GIT_SHA=$(tr -d '[:space:]' <GIT_SHA); fi
fi
[ -n "${TOKPROF_GIT_SHA:-}" ] && export TOKPROF_GIT_SHA
budget_end=$(( $(date +%s) + BUDGET_S - RESERVE_S ))
: >"$WORK/steps.txt"

if [ "$DRY" = 1 ]; then
  # The CPU stand-ins: the same scripts and commands at tiny sizes, so a typo shows here and not on the GPU.
  DEV=cpu
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  DEV=cuda
  unset TRITON_INTERPRET
fi

collect() {  # summary.txt, the result files and gpu-check.tgz in $OUT, from what $WORK holds now
  {
    echo "git sha: ${TOKPROF_GIT_SHA:-unknown}; budget ${BUDGET_S} s; dry=$DRY"
    cat "$WORK/steps.txt"
    for f in $STEPS; do
      [ -f "$WORK/$f.log" ] && { echo; echo "== $f (last 40 lines)"; tail -n 40 "$WORK/$f.log"; }
    done
  } >"$OUT/summary.txt"
  local f
  for f in "$WORK"/props.json "$WORK"/timing.json "$WORK"/nvml.json "$WORK"/e2e.json "$WORK"/serve/serve-bench.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  rm -f "$OUT"/run-*.json
  for f in "$WORK"/run/run-*.json; do  # the reference RunResult itself, beside the archive
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 15000000 ] && cp "$f" "$OUT/"
  done
  local tgz="$WORK.tgz"  # outside $WORK, so the archive does not take itself in
  tar czf "$tgz" -C "$WORK" --exclude cache . 2>/dev/null
  if [ "$(stat -c %s "$tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then  # the tool brings files <= 16 MiB
    tar czf "$tgz" -C "$WORK" --exclude cache --exclude report --exclude '*.png' --exclude history.db . 2>/dev/null
  fi
  cp "$tgz" "$OUT/gpu-check.tgz"
}

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit (never past the budget), log, record rc and seconds
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local left=$(( budget_end - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then echo "$name skipped: budget spent" | tee -a "$WORK/steps.txt"; collect; return; fi
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local verdict=""
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && verdict=" (stopped at its time limit)"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit elapsed=$(( $(date +%s) - budget_end + BUDGET_S - RESERVE_S ))$verdict" \
    | tee -a "$WORK/steps.txt"
  collect
}

if [ "$DRY" = 1 ]; then
  ARCH=sm_90
else
  # The GPU's architecture (sm_90 on an H100 or H200): cubins for it alone halve the install's nvcc time.
  ARCH=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"sm_{m}{n}")' 2>/dev/null || echo sm_90)
fi
export TOKPROF_CUDA_ARCHS=${TOKPROF_CUDA_ARCHS:-$ARCH}
ARCH_NUM=${ARCH#sm_}  # the compile check takes 80 or 90
TIMEOUT_OPT=""  # one test that hangs must not take the whole step
$PY -c 'import pytest_timeout' 2>/dev/null && TIMEOUT_OPT="--timeout=60"
PROBE="$PY scripts/gpu_probe.py"

if [ "$DRY" = 1 ]; then
  step env 30 $PY -c 'import torch; print(torch.__version__, "(dry run: no GPU)")'
  step install 60 $PY -c 'import tokprof; print("tokprof importable from", tokprof.__file__)'
else
  step env 30 bash -c "nvidia-smi; nvidia-smi -q | head -n 80; echo TOKPROF_CUDA_ARCHS=$TOKPROF_CUDA_ARCHS; \
$PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability())'"
  step install 120 $PY -m pip install -e . --no-deps --no-build-isolation
fi
step props 30 $PROBE props --device $DEV --out "$WORK/props.json"
step timing 90 $PROBE timing-ab --device $DEV --out "$WORK/timing.json"
step nvml 25 $PROBE nvml --device $DEV --out "$WORK/nvml.json"
if [ "$DRY" = 1 ]; then
  step gputests 60 $PY -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_timing.py
  step e2e 120 $PY -m tokprof.cli e2e --model tiny --device cpu --batch 1 --context 64 --steps 2 --warmup 1 \
    --framework tokprof -o "$WORK/e2e.json"
else
  step gputests 120 $PY -m pytest -q -p no:cacheprovider -m gpu $TIMEOUT_OPT --durations=25 tests \
    --junitxml="$WORK/gputests.xml"
  step e2e 75 $PY -m tokprof.cli e2e --model llama-3.1-8b --batch 1,32 --context 1024 --mode graph,eager \
    --framework tokprof -o "$WORK/e2e.json"
fi
step run 240 $PROBE run --device $DEV --out-dir "$WORK/run"
step targets 200 $PY -m tokprof.targets --out "$WORK/targets/targets.json" --repeat 2 --aa-modes events \
  --no-aa-energy --timeout-s 0.5
step compile 120 env -u TRITON_INTERPRET $PY scripts/triton_compile_check.py --arch "$ARCH_NUM"
if [ "$DRY" = 1 ]; then
  step serve 120 $PY -m tokprof.cli serve-bench --device cpu --rates 50 --requests 6 --input-len uniform:4:12 \
    --output-len 4 --max-num-seqs 4 --token-budget 16 -o "$WORK/serve"
else
  step serve 150 $PY -m tokprof.cli serve-bench --device cuda --backend triton --dtype fp16 --requests 60 \
    -o "$WORK/serve"
fi

collect
tail -n 60 "$OUT/summary.txt"
