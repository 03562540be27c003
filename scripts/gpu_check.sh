#!/usr/bin/env bash
# make gpu-check: every check of fusedloss that needs a GPU, as one command that ends in under
# 9 minutes on a fresh GPU machine (an H200 with torch 2.11.0+cu130, Python 3.12, triton 3.6,
# 16 cores, nothing of ours installed) and says the most it can if it stops part-way.
#
# Steps, GPU-specific first; each runs under `timeout` with the smaller of its own limit and
# what is left of GPU_CHECK_BUDGET (default 510 s), and appends its line to summary.txt as soon
# as it ends. Expected times (estimates: no GPU run of this script has been timed yet) and why:
#   probe      limit  30 s, ~5 s    nvidia-smi, torch/triton versions, the GPU's capability.
#   build      limit 240 s, ~90 s   editable install + build_ext for the GPU present only (setup.py
#                                   picks its arch), MAX_JOBS = all cores: the .cu/.cpp files
#                                   compile in parallel, so the build is about its slowest file,
#                                   softmax_ce.cu (~60-90 s on one core for one arch).
#   sanitizer  limit  60 s, ~15 s   compute-sanitizer on one tiny op: it has been refused on some
#                                   machines ("Device not supported"); if so memcheck/racecheck
#                                   are reported "unavailable", not failed.
#   memcheck   limit 120 s, ~45 s   scripts/gpu_sanitize_cases.py: every op and row layout on
#                                   small rows; torch's start under the sanitizer is ~15 s and
#                                   kernels run 10-100x slower, hence few rows.
#   tests      limit 200 s, ~120 s  three pytest runs (CUDA tests; Triton op tests; the cuda
#                                   parametrizations of the suite), pytest-xdist over 8 workers,
#                                   each test limited to GPU_CHECK_TEST_LIMIT s (default 60) by
#                                   scripts/pytest_deadline.py: Triton compiles every kernel
#                                   variant on first use (~1 s each), which dominates.
#   racecheck  limit  90 s, ~40 s   the staged layouts only (--quick): shared-memory hazards.
#   bench      limit 150 s, ~100 s  benchmarks/run.py --profile gpu, 0.5 s per provider and case:
#                                   torch.compile's first compile of each shape (~5-10 s) dominates.
# Output: $GPU_CHECK_OUT (default ./gpu-check-out), at most 8 files: summary.txt, build.log,
# sanitize.log, tests.log, bench.log, bench.md, bench.json. Peer wheels (Liger, Cut Cross-Entropy)
# in $GPU_CHECK_WHEELS (default ./wheels) are installed with pip --no-index --no-deps --target
# into a scratch folder on PYTHONPATH when that folder holds any.
# Environment: PY (python3), GPU_CHECK_OUT, GPU_CHECK_BUDGET, GPU_CHECK_TEST_LIMIT,
# GPU_CHECK_WHEELS, GPU_CHECK_SKIP (step names), GPU_CHECK_DRY_RUN=1 (print each step's command
# and limit, run nothing, write summary.txt), GPU_CHECK_FAKE_STEPS (see below). Exit status: 0 all steps passed, 1 a step failed,
# 2 no GPU (nothing checked).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${GPU_CHECK_OUT:-./gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET:-510}
TEST_LIMIT=${GPU_CHECK_TEST_LIMIT:-60}
WHEELS=${GPU_CHECK_WHEELS:-./wheels}
DRY=${GPU_CHECK_DRY_RUN:-0}
SKIP=" ${GPU_CHECK_SKIP:-} "
mkdir -p "$OUT"
rm -f "$OUT"/summary.txt "$OUT"/{build,sanitize,tests,bench}.log "$OUT"/bench.{md,json}
SUMMARY=$OUT/summary.txt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
overall=0

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT LOG WHAT: run the function NAME under `timeout`, log to LOG, append a summary
# line and the function's key figures (the lines it prints prefixed "KEY ").
step() {
  local name=$1 limit=$2 log=$3 what=$4 t0 rc status secs budget
  if [[ "$SKIP" == *" $name "* ]]; then note "$(printf '%-10s skipped (GPU_CHECK_SKIP)' "$name")"; return 0; fi
  budget=$(left)
  (( budget < limit )) && limit=$budget
  if (( limit < 5 )); then note "$(printf '%-10s skipped (out of time)' "$name")"; overall=1; return 1; fi
  if [ "$DRY" = 1 ]; then
    note "$(printf '%-10s dry-run     limit %ss: %s' "$name" "$limit" "$what")"
    return 0
  fi
  echo "=== $name (limit ${limit}s)" | tee -a "$OUT/$log"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$name" >"$TMP/$name.out" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  cat "$TMP/$name.out" >>"$OUT/$log"
  case $rc in
    0) status=ok ;; 124|137) status="TIMEOUT" ;; 77) status="unavailable" ;; *) status="FAIL($rc)" ;;
  esac
  note "$(printf '%-10s %-11s %4ss / %ss' "$name" "$status" "$secs" "$limit")"
  grep '^KEY ' "$TMP/$name.out" | sed 's/^KEY /           /' | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || overall=1
  return "$rc"
}

probe() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/KEY gpu: /'
  "$PY" -c "
import torch, triton, sys
print('KEY python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
assert torch.cuda.is_available(), 'torch sees no GPU'
print('KEY capability', '.'.join(map(str, torch.cuda.get_device_capability())),
      torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
}

build() {
  if compgen -G "$GPU_CHECK_WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$GPU_CHECK_SITE" "$GPU_CHECK_WHEELS"/*.whl &&
      echo "KEY peer wheels: $(ls "$GPU_CHECK_WHEELS" | tr '\n' ' ')"
  fi
  FUSEDLOSS_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  "$PY" setup.py -q build_ext --inplace >"$GPU_CHECK_TMP/build_ext.out" 2>&1
  local r=$?
  grep -v 'Wunknown-pragmas\|pragma unroll\|^ *[0-9]* | \|^ *| *$' "$GPU_CHECK_TMP/build_ext.out"
  [ $r -eq 0 ] || return $r
  "$PY" -c "
import fusedloss
from fusedloss import _native as n
print('KEY cuda kernels for', ' '.join(n.cuda_archs), '| cuda backends', fusedloss.available_backends('cuda'))
assert n.cuda_built and 'native' in fusedloss.available_backends('cuda'), 'CUDA kernels not usable'"
}

sanitizer() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "
import torch, fusedloss
x = torch.randn(2, 10, device='cuda')
torch.ops.fusedloss.softmax_decode(x, 0.0); torch.cuda.synchronize(); print('probe ok')" \
    || { echo "KEY compute-sanitizer refused or failed: memcheck/racecheck not run"; return 77; }
  echo "KEY compute-sanitizer works"
}

sanitize_cases() {  # sanitize_cases TOOL [--quick]
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$1" --error-exitcode 9 \
    --print-limit 20 "$PY" scripts/gpu_sanitize_cases.py "${@:2}"
  local rc=$?
  echo "KEY $1: exit $rc"
  return $rc
}
memcheck() { sanitize_cases memcheck; }
racecheck() { sanitize_cases racecheck --quick; }

tests() {  # three pytest runs, each limited: a hang costs one test (deadline) or one run
  local rc=0 common="-q -p no:cacheprovider -p pytest_deadline --deadline $GPU_CHECK_TEST_LIMIT"
  "$PY" -c "import xdist" 2>/dev/null && common="$common -n 8"  # else serial, deadline still on
  run() {
    local what=$1; shift
    timeout -k 5 "$1" "$PY" -m pytest $common "${@:2}" >"$GPU_CHECK_TMP/pytest.out" 2>&1
    local r=$?
    cat "$GPU_CHECK_TMP/pytest.out"
    echo "KEY $what: $(tail -n 1 "$GPU_CHECK_TMP/pytest.out") (exit $r)"
    return $r
  }
  run "cuda ops" 90 tests/test_cuda*.py || rc=1
  run "triton ops" 60 tests/test_triton_ops.py || rc=1
  run "suite on cuda" 90 tests -k cuda --ignore-glob='tests/test_cuda*.py' \
    --ignore=tests/test_triton_ops.py --ignore=tests/test_native_cpu.py \
    --ignore=tests/test_triton_aot.py || rc=1
  return $rc
}

bench() {
  "$PY" benchmarks/run.py --device cuda --profile gpu --budget 0.5 --no-progress \
    --out "$GPU_CHECK_TMP/bench"
  local rc=$?
  for f in "$GPU_CHECK_TMP"/bench/*.md; do [ -f "$f" ] && cp "$f" "$GPU_CHECK_OUT/bench.md"; done
  for f in "$GPU_CHECK_TMP"/bench/*.json; do [ -f "$f" ] && cp "$f" "$GPU_CHECK_OUT/bench.json"; done
  echo "KEY results: bench.md (exit $rc)"
  return $rc
}

export GPU_CHECK_TMP=$TMP GPU_CHECK_OUT=$OUT GPU_CHECK_WHEELS=$WHEELS GPU_CHECK_TEST_LIMIT=$TEST_LIMIT
export GPU_CHECK_SITE=$TMP/site PY
export PYTHONPATH="$GPU_CHECK_SITE:$PYTHONPATH"
# GPU_CHECK_FAKE_STEPS=file.sh: redefine step functions from that file and skip the GPU test
# (tests/test_gpu_check_script.py checks the step machinery this way on machines with no GPU).
[ -n "${GPU_CHECK_FAKE_STEPS:-}" ] && source "$GPU_CHECK_FAKE_STEPS"
export -f probe build sanitizer sanitize_cases memcheck racecheck tests bench
note "gpu-check $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET}s, MAX_JOBS=$MAX_JOBS"
if [ "$DRY" != 1 ] && [ -z "${GPU_CHECK_FAKE_STEPS:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  note "no GPU (nvidia-smi found none): nothing checked"
  for s in probe build sanitizer memcheck tests racecheck bench; do
    note "$(printf '%-10s skipped (no GPU)' "$s")"
  done
  exit 2
fi
step probe 30 build.log "nvidia-smi; torch, triton versions; GPU capability" ||
  { note "probe failed: stopping"; exit 1; }
if step build 240 build.log "pip install -e . (no ext) + setup.py build_ext --inplace"; then
  if step sanitizer 60 sanitize.log "compute-sanitizer memcheck on one tiny op"; then
    step memcheck 120 sanitize.log "compute-sanitizer memcheck scripts/gpu_sanitize_cases.py"
  else
    SKIP="$SKIP memcheck racecheck "
    note "$(printf '%-10s skipped (no sanitizer)' memcheck)"
  fi
  step tests 200 tests.log "pytest: CUDA op tests, Triton op tests, suite -k cuda"
  if [[ "$SKIP" == *" racecheck "* ]]; then
    note "$(printf '%-10s skipped (no sanitizer)' racecheck)"
  else
    step racecheck 90 sanitize.log "compute-sanitizer racecheck scripts/gpu_sanitize_cases.py --quick"
  fi
  step bench 150 bench.log "benchmarks/run.py --device cuda --profile gpu --budget 0.5"
else
  note "build failed: later steps not run (see build.log)"
fi
note "total $(( $(date +%s) - START ))s, exit $overall"
exit $overall
