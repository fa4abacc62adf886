#!/usr/bin/env bash
# Every GPU path that the CPU-only CI cannot run, in one go, within a time budget:
#   1. the machine (nvidia-smi, versions, ONNX Runtime's providers),
#   2. the Triton kernel tests compiled for real (no TRITON_INTERPRET) on the GPU,
#   3. benchmarks/triton_kernels.py (fused TLM / GRASP vs eager vs torch.compile at the 7B shapes),
#   4. training on CUDA against the same run on the CPU (tests/test_train.py's CUDA test),
#   5. `fusar-edge bench` on CUDA: the built-in demo, and random 7B weights at true size,
#   6. the demo's answers on CUDA (bf16) against the CPU's (fp32) on fresh synthetic scenes (validation rows),
#   7. a scene scanned on CUDA in batches of 8 beside the same scan on the CPU (summaries kept),
#   8. ONNX Runtime's CUDA provider, when the installed onnxruntime has it,
#   9. with the time left, the whole test suite on the GPU machine.
#
#     benchmarks/gpu_check.sh OUTDIR [SECONDS]      # default budget 540 s
#     GPU_CHECK_SKIP="bench-demo train-cuda" benchmarks/gpu_check.sh OUTDIR   # steps by name
#
# Each step has its own timeout and its exit status is logged; one failing step does not stop
# the others. Everything lands in OUTDIR: log.txt plus the JSON the steps write.
set -u
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR [SECONDS]}
BUDGET=${2:-540}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/log.txt
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

step() {  # step NAME TIMEOUT CMD...: run with a timeout cut to the budget left
    local name=$1 limit=$2 left t0 rc
    shift 2
    case " ${GPU_CHECK_SKIP:-} " in *" $name "*) echo "=== $name: skipped (GPU_CHECK_SKIP)" | tee -a "$LOG"; return ;; esac
    left=$((BUDGET - ($(date +%s) - START) - 10))
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

step machine 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton, transformers, onnxruntime as ort; \
print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); \
print(\"triton\", triton.__version__, \"transformers\", transformers.__version__); \
print(\"onnxruntime\", ort.__version__, ort.get_available_providers())'"
step kernel-tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_tlm.py tests/test_kernels_grasp.py
step grasp-rows 60 $PY benchmarks/gpu_grasp_rows.py
step kernel-bench 150 $PY benchmarks/triton_kernels.py --out "$OUTDIR/kernels.json"
step train-cuda 90 $PY -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda -rs
step bench-demo 90 $PY -m fusar_edge.cli bench --device cuda --runs 20 --json "$OUTDIR/bench-demo-cuda.json"
step bench-7b 150 $PY -m fusar_edge.cli bench --preset qwen2.5-vl-7b --device cuda --runs 5 \
    --json "$OUTDIR/bench-7b-cuda.json"
# GPU_CHECK_PYTEST_ARGS: e.g. --ignore=tests/test_serve.py where uvicorn is not installed
WORK=$(mktemp -d)  # scratch data and bundles: only the small reports go to OUTDIR
step eval-demo-cuda 180 bash -c "$PY -m fusar_edge.cli data synth --out $WORK/set --n 200 --seed 7 --chip 224 \
    --per-region 4 --json > /dev/null && for d in cpu cuda; do $PY -m fusar_edge.cli eval --data $WORK/set/stage2-val.jsonl \
    --out $WORK/eval-\$d --device \$d --json > $OUTDIR/eval-demo-\$d.json || exit 1; done"
step scan-cuda 150 bash -c "$PY -m fusar_edge.cli sample $WORK/scan-scene --size 1024 > /dev/null && \
    $PY -m fusar_edge.cli scan $WORK/scan-scene/scene.tif --out $WORK/scan-cuda --tiles $WORK/scan-scene/tiles \
    --device cuda --batch 8 --quiet && $PY -m fusar_edge.cli scan $WORK/scan-scene/scene.tif --out $WORK/scan-cpu \
    --tiles $WORK/scan-scene/tiles --device cpu --quiet && cp $WORK/scan-cuda/scene/summary.json $OUTDIR/scan-cuda.json \
    && cp $WORK/scan-cpu/scene/summary.json $OUTDIR/scan-cpu.json"
step ort-cuda 120 bash -c "if ! $PY -c 'import onnxruntime as o, sys; sys.exit(\"CUDAExecutionProvider\" not in o.get_available_providers())'; \
    then echo 'skipped: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)'; exit 0; fi; \
    $PY -m fusar_edge.cli sample $WORK/sample && $PY -m fusar_edge.cli export --out $WORK/demo-onnx --onnx && \
    $PY -m fusar_edge.cli ask $WORK/sample/scene.tif 'How many ships are there?' --tiles $WORK/sample/tiles \
    --bundle $WORK/demo-onnx --backend onnxruntime --device cuda --json"
step test-suite 600 $PY -m pytest -q -p no:cacheprovider --maxfail=25 -n 8 ${GPU_CHECK_PYTEST_ARGS:-} tests
echo "=== done after $(($(date +%s) - START)) s" | tee -a "$LOG"
