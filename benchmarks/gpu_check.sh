#!/usr/bin/env bash
# The GPU check in one command, for a machine with CuPy, PyTorch and a GPU (the device
# tool's lent machines: `bash benchmarks/gpu_check.sh "$OUT"` from the repository root).
# Runs the whole test suite with the CuPy cases, the model benchmark against PyTorch,
# a per-layer profile with the CuPy kernels on and off, and the conv layer benchmark;
# writes everything into OUTDIR (default: gpu_check_out) and prints a summary.
# About two minutes on an H100.
set -u
out=${1:-gpu_check_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=.
py=${PYTHON:-python3}
run() {  # run NAME SECONDS COMMAND...: output to $out/NAME.txt, with its exit status
    local name=$1 limit=$2 s=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name: rc=$? in $((SECONDS - s)) s" | tee -a "$out/$name.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import sys, cupy, numpy, torch; print(sys.version.split()[0], 'cupy', cupy.__version__,
'numpy', numpy.__version__, 'torch', torch.__version__)"; } > "$out/env.txt" 2>&1
run tests 170 $py -m pytest -q -n 8 -rfs --tb=short -p no:cacheprovider
run bench 170 $py benchmarks/bench_models.py --backend cupy --reps 20 \
    --json "$out/performance_gpu.json" --md "$out/performance_gpu_table.md" \
    --png "$out/performance_gpu.png"
run profile 60 env DL_BACKEND=cupy $py benchmarks/profile_layers.py --batch 100
run profile_no_kernels 60 env DL_BACKEND=cupy XPNET_CUDA_KERNELS=0 \
    $py benchmarks/profile_layers.py --batch 100
run layers 60 env DL_BACKEND=cupy $py benchmarks/bench_layers.py --reps 20
cat "$out/env.txt"
tail -n 3 "$out/tests.txt"
grep -E '^\|' "$out/bench.txt" | head -n 8
grep -E 'train step' "$out/profile.txt" "$out/profile_no_kernels.txt"
