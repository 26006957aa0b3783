#!/usr/bin/env bash
# The whole check on a CUDA machine, in under 8 minutes on an H200 (torch 2.11, triton 3.6, no internet), built
# so that the one run cannot lose what it measured:
#   1. record the machine (nvidia-smi, versions, fp32 GEMM support)              env.txt
#   2. install the peers brought as wheels in .whl/ (benchmarks/fetch_wheels.sh)  wheels.log
#   3. the cost model against the GPU: python -m benchmarks.roofline --measure   roofline.log, roofline/measured.json
#      (per shape: the plan and GEMM path, the matmul floor, every step of the backward timed next to its
#      prediction, the bitwise repeat, then fastkto / naive, on random and on realistic inputs; registers / spills;
#      each step guarded and measured.json rewritten after each one)
#   3b. the peers (TRL, Liger, CCE), each in its own process, shape after shape as time allows (the first H200
#      run measured about a minute per peer and shape, mostly process start, inputs and compilations)
#                                                                                peers.log, peers/measured.json
#   4. the tile-configuration sweep (forward and dz kernels' configurations)    sweep.log, sweep/measured.json
#   5. the Triton-path tests of tests/test_logprob.py tests/test_loss.py, FSDP1 (tests/test_fsdp1_cuda.py)
#                                                                                pytest_device.log / .xml
#      (-k DEVICE_K; in parallel when pytest-xdist is there: the JIT compilations dominate)
#   6. the compile checks, with the suite's one cuda-marked test (test_compile)  pytest_compile.log / .xml
#   6b. the training stack: CUDA's count of host syncs in a KTOLoss call (1 forward, 0 backward), an Inductor
#      fullgraph compile of it and its CUDA-graph replay (python -m benchmarks.stack_check)  stack/stack_check.json
#   7. a small benchmark: python -m benchmarks.run (primitive workload)          bench.log, bench/results.json
#   8. summary.txt (each step's exit status and time; "RESULT: complete" or "RESULT: partial") and
#      gpu_check_all.tar.gz (everything)
#
# usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   --dry-run  on any machine (no GPU needed): the measurement runs on the CPU (Triton's interpreter, a tiny shape),
#              the tests are collected instead of run and the benchmark is planned, so every step runs in seconds.
# Every step has a time limit (T_* below), capped so that the whole script ends within TOTAL_S (default 470 s);
# a failing or timed-out step is recorded and the next one runs. Exit status: 0 when every step passed
# ("complete"), 3 when some step failed or timed out ("partial"; summary.txt says which), 2 without a GPU.
# GPU_CHECK_ONLY="name,name": run only these steps (the others are listed as skipped). ROOF_METHODS: the dry run's
# methods. Fault injection for tests of this script: GPU_CHECK_FAULT="step:NAME[=fail|hang]" makes step NAME fail or hang;
# FASTKTO_GPU_CHECK_FAULT is passed to benchmarks.roofline (see its _fault).
# To take the results elsewhere, the archive, the summary and the cost model's measurements are enough:
#   cp OUTDIR/gpu_check_all.tar.gz OUTDIR/summary.txt OUTDIR/roofline/measured.json DEST/
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
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# seconds per step, sized on the first H200 run (benchmarks/results/h200/run1: the cost model's steps and the
# in-process methods took about 25 s a shape, each peer about a minute a shape, the sweep 29 s, the device tests
# 41 s with 8 workers, the stack check 26 s). Planned: env 10 + wheels 5 + roofline 100 + peers 150 + sweep 40
# + device tests 60 + compile 25 + stack 40 + benchmark 40 = 470 s = TOTAL_S (8 minutes less the archive and the
# margin). The cost model's measurement runs first, since it is what the GPU run is for; it writes after every step.
T_ROOF=${T_ROOF:-100} T_PEERS=${T_PEERS:-150} T_SWEEP=${T_SWEEP:-40} T_DEVICE=${T_DEVICE:-60}
T_COMPILE=${T_COMPILE:-25} T_STACK=${T_STACK:-40} T_BENCH=${T_BENCH:-40} TOTAL_S=${TOTAL_S:-470}
# which methods and shapes: the roofline's in-process methods, the peers (PEER_ARGS: extra arguments, e.g.
# "--shape 8192,4096,128256" for one shape)
ROOF_GPU_METHODS=${ROOF_GPU_METHODS:-fastkto-triton,fastkto-cublas,fastkto-torch,naive}
PEER_METHODS=${PEER_METHODS:-trl,liger,cce}
DEVICE_TESTS=${DEVICE_TESTS:-"tests/test_logprob.py tests/test_loss.py tests/test_fsdp1_cuda.py"}
# the device tests that exercise the Triton path (the rest of those files also runs on the CPU in CI)
DEVICE_K=${DEVICE_K:-"triton or cuda or backend or kernel or bitwise or determin"}
START=$SECONDS
FAILED=()
: > "$OUT/steps.tsv"

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
remaining() { echo $((TOTAL_S - (SECONDS - START))); }
step() {  # step NAME LIMIT_S LOGFILE COMMAND...: run with a time limit, keep its output, record the outcome
    local name=$1 limit=$2 logfile=$3; shift 3
    if [[ -n "${GPU_CHECK_ONLY:-}" && ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
        printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$OUT/steps.tsv"
        return 0
    fi
    local left; left=$(remaining)
    (( left - 5 < limit )) && limit=$((left - 5))
    if (( limit < 5 )); then
        log "$name: not run (the script's ${TOTAL_S}s are spent)"
        printf '%s\t%s\t%s\n' "$name" "not-run" 0 >> "$OUT/steps.tsv"
        FAILED+=("$name")
        return 0
    fi
    local fault=""
    case ",${GPU_CHECK_FAULT:-}," in
        *",step:$name=hang,"*) fault=hang ;;
        *",step:$name,"* | *",step:$name=fail,"*) fault=fail ;;
    esac
    log "$name: $* (limit ${limit}s)${fault:+ [injected fault: $fault]}"
    local t0=$SECONDS rc
    if [[ $fault == hang ]]; then
        timeout --signal=TERM --kill-after=5 "$limit" sleep 3600 > "$OUT/$logfile" 2>&1
    elif [[ $fault == fail ]]; then
        echo "injected fault: step $name fails" > "$OUT/$logfile"; false
    else
        timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$logfile" 2>&1
    fi
    rc=$?
    tail -n 5 "$OUT/$logfile" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    log "$name: exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit reached)') in $((SECONDS - t0))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    [[ $rc != 0 ]] && FAILED+=("$name")
    return 0
}

finish() {
    {
        echo "gpu_check $(date -u +%FT%TZ) $([[ $DRY == 1 ]] && echo '(dry run)') in $((SECONDS - START)) s"
        printf 'step\texit\tseconds\n'
        cat "$OUT/steps.tsv"
        for part in roofline peers; do
            [[ -f "$OUT/$part/measured.json" ]] && "$PY" - "$OUT/$part/measured.json" "$part" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}:", r.get("status"), "| measured shapes:", [m["shape"] for m in r.get("measured", [])])
for k, v in (r.get("missing") or {}).items():
    print("  missing", k, ":", v[:200])
EOF
        done
        [[ -f "$OUT/bench-summary.txt" ]] && cat "$OUT/bench-summary.txt"
        if (( ${#FAILED[@]} == 0 )); then echo "RESULT: complete"; else echo "RESULT: partial (${FAILED[*]})"; fi
    } > "$OUT/summary.txt" 2>&1
    tar -czf "$OUT/gpu_check_all.tar.gz" -C "$OUT" --exclude gpu_check_all.tar.gz . 2>/dev/null
    log "done in $((SECONDS - START)) s: $(tail -n 1 "$OUT/summary.txt"); archive $OUT/gpu_check_all.tar.gz"
}

# 1. the machine (never fails the run)
{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    timeout 60 "$PY" -c 'import json; from benchmarks.roofline import environment; print(json.dumps(environment(), indent=1))' \
        || echo "environment: the probe failed"
} > "$OUT/env.txt" 2>&1
log "machine: $(grep -m1 '"torch"' "$OUT/env.txt")"
if [[ $DRY == 0 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "no CUDA device: run with --dry-run on a machine without one"
    echo "RESULT: no CUDA device" > "$OUT/summary.txt"
    exit 2
fi

# 2. peers brought as wheels (pure Python); installed apart so the image's packages stay as they are
if [[ $DRY == 1 ]]; then
    log "wheels: not installed on a dry run (they are built for the GPU image's Python 3.12)"
elif compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${TMPDIR:-/tmp}/fastkto-gpu-check-site
    step wheels 20 wheels.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl
    # PYTHONPATH precedes site-packages: only packages the image lacks are brought, so nothing of it is shadowed
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    log "wheels: no .whl/ folder (benchmarks/fetch_wheels.sh makes it); peers not on the image will be skipped"
fi

# 3. and 4. the cost model measured, then the tile sweep (on --dry-run: on the CPU under the interpreter, tiny)
if [[ $DRY == 1 ]]; then
    ROOF_ARGS=(--device cpu --dtype float32 --shape 40,32,300 --softcap 20 --repeats 1 --peer-timeout 60)
    # (Liger's kernels fail under the interpreter: that would only show the error path, which the tests cover)
    step roofline "$T_ROOF" roofline.log env TRITON_INTERPRET=1 "$PY" -m benchmarks.roofline --measure \
        "${ROOF_ARGS[@]}" --methods "${ROOF_METHODS:-fastkto-triton,fastkto-cublas,naive}" --out "$OUT/roofline"
    step peers "$T_PEERS" peers.log env TRITON_INTERPRET=1 "$PY" -m benchmarks.roofline --measure --peers-only \
        "${ROOF_ARGS[@]}" --methods "${PEER_METHODS_DRY:-trl,cce}" --out "$OUT/peers"
    step sweep "$T_SWEEP" sweep.log env TRITON_INTERPRET=1 "$PY" -m benchmarks.roofline --measure "${ROOF_ARGS[@]}" \
        --sweep-only --sweep-max 1 --out "$OUT/sweep"
else
    # shellcheck disable=SC2086  # ROOF_ARGS_GPU / PEER_ARGS are lists of arguments
    step roofline "$T_ROOF" roofline.log "$PY" -m benchmarks.roofline --measure --methods "$ROOF_GPU_METHODS" \
        ${ROOF_ARGS_GPU:-} --out "$OUT/roofline"
    # shellcheck disable=SC2086
    step peers "$T_PEERS" peers.log "$PY" -m benchmarks.roofline --measure --peers-only --methods "$PEER_METHODS" \
        ${PEER_ARGS:-} --out "$OUT/peers"
    # the sweep on the shapes' first (the largest N) at a shorter N: enough to rank configurations
    # shellcheck disable=SC2086  # SWEEP_ARGS: e.g. "--shape N,D,V --softcap 30"
    step sweep "$T_SWEEP" sweep.log "$PY" -m benchmarks.roofline --measure ${SWEEP_ARGS:---shape 8192,2304,256000 \
        --softcap 30} --repeats 3 --sweep-only --out "$OUT/sweep"
fi

# 5. and 6. the tests (in parallel where pytest-xdist is installed: the Triton JIT compilations dominate)
MODE=(-q -p no:cacheprovider)
[[ $DRY == 1 ]] && MODE+=(--collect-only)
if [[ $DRY == 0 ]] && "$PY" -c 'import xdist' 2>/dev/null; then
    MODE+=(-n 8)
fi
# shellcheck disable=SC2086  # DEVICE_TESTS is a list of paths
step device-tests "$T_DEVICE" pytest_device.log "$PY" -m pytest $DEVICE_TESTS -k "$DEVICE_K" "${MODE[@]}" \
    --junitxml="$OUT/pytest_device.xml"
# only the cuda-marked test: CI compiles every variant on its CPUs; 8 workers' start-up alone outlasted 30 s
CMODE=(-q -p no:cacheprovider -m cuda)
[[ $DRY == 1 ]] && CMODE+=(--collect-only)
step compile-checks "$T_COMPILE" pytest_compile.log "$PY" -m pytest tests/test_compile.py "${CMODE[@]}" \
    --junitxml="$OUT/pytest_compile.xml"

# 6b. the training stack (syncs, Inductor fullgraph, CUDA graphs); the dry run compiles with aot_eager on the CPU
STACK_ARGS=(--out "$OUT/stack")
[[ $DRY == 1 ]] && STACK_ARGS+=(--device cpu --tokens 32 --dim 16 --vocab 100)
step stack "$T_STACK" stack.log "$PY" -m benchmarks.stack_check "${STACK_ARGS[@]}"

# 7. the benchmark, sized to fit: the primitive workload only (one worker process per method group)
BENCH_ARGS=(--out "$OUT/bench" --workloads primitive --timeout 35)
[[ $DRY == 1 ]] && BENCH_ARGS+=(--dry-run --device cuda)
step benchmark "$T_BENCH" bench.log "$PY" -m benchmarks.run "${BENCH_ARGS[@]}"
if [[ -f "$OUT/bench/results.json" || -f "$OUT/bench/results.partial.json" ]]; then
    timeout 20 "$PY" -m benchmarks.run --summary "$OUT/bench" > "$OUT/bench-summary.txt" 2>&1
fi

# 8. summary and archive
finish
(( ${#FAILED[@]} == 0 )) && exit 0
exit 3
