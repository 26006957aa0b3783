#!/usr/bin/env bash
# The whole check on a CUDA machine, in under 8 minutes on an H200 (torch 2.11, triton 3.6, no internet):
#   1. record the machine (nvidia-smi, versions)                                  env.txt
#   2. install the peers brought as wheels in .whl/ (benchmarks/fetch_wheels.sh)  wheels.log
#   3. the cost model against the GPU: python -m benchmarks.roofline --measure   roofline.log, roofline/measured.json
#      (the three reference shapes: every step of the plan timed next to its prediction, the cuBLAS bf16 matmul
#      floor, fastkto-triton / -torch, naive, TRL, Liger, CCE with peak memory, bitwise repeat, registers/spills)
#   4. the suite's CUDA tests: python -m pytest tests -m cuda                     pytest_cuda.log / .xml
#      and the files whose tests run on CUDA when there is one (DEVICE = cuda):
#      tests/test_logprob.py tests/test_loss.py                                   pytest_device.log / .xml
#   5. the compile checks: python -m pytest tests/test_compile.py                 pytest_compile.log / .xml
#   6. the benchmark: python -m benchmarks.run (CUDA profile, bf16), with the     bench.log, bench/results.json,
#      bf16 matmul rate and the primitive's TFLOP/s (8NDV: forward 2, backward 6)  bench/*.png, summary.txt
#   7. everything packed into OUTDIR/gpu_check_all.tar.gz
#
# usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run  on any machine (no GPU needed): collects the tests instead of running them and plans the
#              benchmark instead of running it, so the script's every step is exercised in seconds.
# Each step has its own time limit (STEP_LIMITS below) and a failing step does not stop the next; the exit
# status is that of the first failing step. To take the results elsewhere, the archive and the summary are
# enough: cp OUTDIR/gpu_check_all.tar.gz OUTDIR/summary.txt DEST/
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# fastkto and benchmarks from this checkout, without installing it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# seconds per step: 210 + 40 + 60 + 45 + 100 + set-up (wheels <= 30, the rest seconds) stays under 8 minutes;
# the cost model's measurement runs first, since it is what the first GPU run is for (it includes the Triton
# compilations of fastkto's, Liger's and CCE's kernels and writes its results after each shape)
T_ROOF=${T_ROOF:-210} T_CUDA=${T_CUDA:-40} T_DEVICE=${T_DEVICE:-60} T_COMPILE=${T_COMPILE:-45} T_BENCH=${T_BENCH:-100}
DEVICE_TESTS=${DEVICE_TESTS:-"tests/test_logprob.py tests/test_loss.py"}
STATUS=0
START=$SECONDS

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME LIMIT_S LOGFILE COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1 limit=$2 logfile=$3; shift 3
    log "$name: $* (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$logfile" 2>&1
    local rc=$?
    tail -n 5 "$OUT/$logfile" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    log "$name: exit $rc$([[ $rc == 124 ]] && echo ' (time limit reached)')"
    [[ $rc != 0 && $STATUS == 0 ]] && STATUS=$rc
    return 0
}

# 1. the machine
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for p in ("triton", "transformers", "accelerate", "trl", "liger-kernel", "cut-cross-entropy"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
EOF
} > "$OUT/env.txt" 2>&1
log "machine: $(grep -m1 '^python' "$OUT/env.txt")"
if [[ $DRY == 0 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "no CUDA device: run with --dry-run on a machine without one"
    exit 2
fi

# 2. peers brought as wheels (pure Python); installed apart so the image's packages stay as they are
if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${TMPDIR:-/tmp}/fastkto-gpu-check-site
    step wheels 30 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
    # PYTHONPATH precedes site-packages: only packages the image lacks are brought, so nothing of it is shadowed
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    log "wheels: no .whl/ folder (benchmarks/fetch_wheels.sh makes it); peers not on the image will be skipped"
fi

# 3. the cost model, measured (on --dry-run: the model alone)
if [[ $DRY == 1 ]]; then
    step roofline "$T_ROOF" roofline.log "$PY" -m benchmarks.roofline
else
    step roofline "$T_ROOF" roofline.log "$PY" -m benchmarks.roofline --measure --out "$OUT/roofline"
fi

# 4. and 5. the tests
MODE=(-q -p no:cacheprovider)
[[ $DRY == 1 ]] && MODE+=(--collect-only)
# shellcheck disable=SC2086  # DEVICE_TESTS is a list of paths
step cuda-tests "$T_CUDA" pytest_cuda.log "$PY" -m pytest tests -m cuda "${MODE[@]}" --junitxml="$OUT/pytest_cuda.xml"
step device-tests "$T_DEVICE" pytest_device.log "$PY" -m pytest $DEVICE_TESTS "${MODE[@]}" \
    --junitxml="$OUT/pytest_device.xml"
step compile-checks "$T_COMPILE" pytest_compile.log "$PY" -m pytest tests/test_compile.py "${MODE[@]}" \
    --junitxml="$OUT/pytest_compile.xml"

# 6. the benchmark (the CUDA profile of benchmarks/workloads.py; one worker process per workload group)
BENCH_ARGS=(--out "$OUT/bench" --timeout 150)
[[ $DRY == 1 ]] && BENCH_ARGS+=(--dry-run --device cuda)
step benchmark "$T_BENCH" bench.log "$PY" -m benchmarks.run "${BENCH_ARGS[@]}"
if [[ -f "$OUT/bench/results.json" || -f "$OUT/bench/results.partial.json" ]]; then
    "$PY" -m benchmarks.run --summary "$OUT/bench" > "$OUT/summary.txt" 2>&1
    log "summary: $OUT/summary.txt"
fi

# 7. one archive of everything, for tools that return few files
tar -czf "$OUT/gpu_check_all.tar.gz" -C "$OUT" --exclude gpu_check_all.tar.gz . 2>/dev/null
log "done in $((SECONDS - START)) s, status $STATUS; archive $OUT/gpu_check_all.tar.gz"
exit $STATUS
