#!/usr/bin/env bash
# One-call GPU check for the native CUDA backend (run on the GPU machine, e.g. `make gpu-check`):
#   1. build the extension for sm_90 (pip install --no-build-isolation --no-deps -e .)
#   2. run the CUDA tests (tests/test_cuda.py)
#   3. compute-sanitizer memcheck and racecheck on small cases of every CUDA op
#   4. the GPU benchmark (benchmarks/run.py --device cuda)
# and print a short table of the steps last. Every step runs even if an earlier one failed
# (except when the build fails); the exit status is non-zero if any step failed.
# Environment: PY (default python3), OUT (optional folder for logs; default /tmp/gpu_check),
# GPU_CHECK_SKIP (space-separated step names to skip: tests sanitize bench).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG=${OUT:-/tmp/gpu_check}
mkdir -p "$LOG"
TMP=$(mktemp -d)  # scratch files that need not come back (the device tool returns <= 8 files)
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")"; do
    [ -x "$c/bin/nvcc" ] && export CUDA_HOME=$c && break
  done
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
SKIP=" ${GPU_CHECK_SKIP:-} "

declare -a NAMES STATUS SECS NOTES
step() {  # step NAME NOTE CMD...: run, record status and time, keep the log
  local name=$1 note=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then
    NAMES+=("$name"); STATUS+=("skipped"); SECS+=("-"); NOTES+=("$note"); return 0
  fi
  echo "=== $name: $*"
  local t0=$(date +%s)
  "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); SECS+=("$(( $(date +%s) - t0 ))"); NOTES+=("$note")
  if [ "$rc" -eq 0 ]; then STATUS+=("ok"); else STATUS+=("FAIL($rc)"); fi
  return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$TMP/gpu.txt"

build() {
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . &&
  "$PY" -c "import torch, fusedloss; from fusedloss import _native as n; \
print('torch', torch.__version__, 'cuda_built', n.cuda_built, 'backends', fusedloss.available_backends('cuda')); \
assert n.cuda_built, 'CUDA kernels not built'"
}

tests() {
  # the whole suite: test_cuda.py plus every backend-parametrized test on (cuda, native|triton|torch)
  "$PY" -m pytest -q -p no:cacheprovider -n 4 tests
}

# Small cases touching every kernel and row layout (warp rows, block rows, clusters of 2 and 8,
# streaming fallback, in-place, backward, decodes, BCE with counts and column tiles, scale_grad_,
# an out-of-range target). No caching allocator, so every tensor is its own allocation and an
# out-of-bounds access cannot land silently in a neighbour.
write_sanitize_case() {
  cat > "$TMP/sanitize_case.py" <<'PYEOF'
import torch, fusedloss  # noqa: F401
ops, dev = torch.ops.fusedloss, "cuda"
g = torch.Generator(device=dev).manual_seed(0)
s = torch.tensor(0.5, device=dev)
for dtype, rows, C in [(torch.float32, 5, 10), (torch.bfloat16, 3, 1003), (torch.bfloat16, 2, 50257),
                       (torch.float32, 2, 262144), (torch.float64, 1, 262144), (torch.float16, 9, 77)]:
    x = (torch.randn(rows, C + 1, generator=g, device=dev) * 3).to(dtype)[:, :C]
    t = torch.randint(0, C, (rows,), generator=g, device=dev)
    t[0] = -100
    w = (torch.rand(C, generator=g, device=dev) + 0.5).to(dtype)
    loss, lse, grad, pred, conf = ops.softmax_ce_fwd(x, t, w, s, -100, 0.1, 1e-3, 10.0, True, True)
    p = torch.softmax(torch.randn(rows, C, generator=g, device=dev), -1).to(dtype)
    ops.softmax_ce_fwd(x, p, w, None, -100, 0.1, 0.0, 0.0, True, False)
    ops.softmax_ce_fwd_inplace(x.clone(), t, None, s, -100, 0.0, 0.0, 0.0, True)
    ops.softmax_ce_bwd(torch.ones(rows, device=dev), x, t, w, lse, -100, 0.1, 1e-3, 10.0)
    ops.softmax_decode(x, 0.0)
    y = torch.rand(rows, C, generator=g, device=dev) > 0.5
    thr = torch.zeros(C, device=dev)
    ops.sigmoid_bce_fwd(x, y, w.expand(rows, C), None, s, thr, True, True, True, True)
    ops.sigmoid_bce_fwd(x, y.to(dtype), None, w.expand(rows, C), None, None, False, False, False, False)
    ops.sigmoid_bce_bwd(torch.randn(C, rows, device=dev).to(dtype).t(), x, y, None, None)
    ops.sigmoid_decode(x, thr, True)
    ops.scale_grad_(grad, s)
    ops.scale_grad_(grad, torch.ones((), device=dev))
bad = torch.tensor([0, 10], device=dev)
ops.softmax_ce_fwd(torch.randn(2, 10, device=dev), bad, None, None, -100, 0.0, 0.0, 0.0, True, False)
torch.cuda.synchronize()
try:
    torch.ops.fusedloss_cuda.raise_pending_error()
    raise SystemExit("expected IndexError for target 10")
except IndexError as e:
    print("bad target reported:", e)
print("sanitize case done")
PYEOF
}

sanitize() {
  local tool=$1
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    --print-limit 20 "$PY" "$TMP/sanitize_case.py"
}

bench() {
  "$PY" benchmarks/run.py --device cuda --no-progress --out "$LOG/bench"
}

overall=0
if ! step build "pip install -e . (sm_90)" build; then
  overall=1
  SKIP="$SKIP tests memcheck racecheck bench "
fi
write_sanitize_case
step tests "tests/test_cuda.py" tests || overall=1
step memcheck "compute-sanitizer memcheck" sanitize memcheck || overall=1
step racecheck "compute-sanitizer racecheck" sanitize racecheck || overall=1
step bench "benchmarks/run.py --device cuda" bench || overall=1

echo
echo "gpu-check summary ($(head -1 "$TMP/gpu.txt" 2>/dev/null)), logs in $LOG"
printf '%-10s %-10s %6s  %s\n' step status sec what
for i in "${!NAMES[@]}"; do
  printf '%-10s %-10s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
done
tail -n 1 "$LOG/tests.log" 2>/dev/null | sed 's/^/tests: /'
exit $overall
