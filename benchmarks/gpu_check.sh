#!/usr/bin/env bash
# The GPU check in one command, for a machine with CuPy, PyTorch and a GPU (the device
# tool's lent machines: `bash benchmarks/gpu_check.sh "$OUT" [PART ...]` from the
# repository root).  PARTs (default: tests bench zoo profile layers):
#   tests    the whole test suite with the CuPy cases
#   bench    the model benchmark against PyTorch (xpnet's train step as a CUDA graph,
#            and eager), JSON + Markdown + PNG
#   zoo      VGG, GoogLeNet and ResNet against PyTorch (their twins built from the layer tree)
#   profile  the per-layer profile of the eager DeepConvNet step
#   layers   the conv layer benchmark
#   train    the book's SimpleConvNet and DeepConvNet runs (20 epochs, CUDA graph)
#   seeds    SimpleConvNet with seeds 0-9 and DeepConvNet with seeds 0-4 (about 3 min on
#            an H100), the final accuracies collected in seeds.json
# Everything goes into OUTDIR (default: gpu_check_out), one file per part.
set -u
out=${1:-gpu_check_out}
shift || true
parts=${*:-tests bench zoo profile layers}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
run() {  # run NAME SECONDS COMMAND...: output to $out/NAME.txt, with its exit status
    local name=$1 limit=$2 s=$SECONDS
    shift 2
    timeout "$limit" "$@" >> "$out/$name.txt" 2>&1
    echo "$name: rc=$? in $((SECONDS - s)) s" | tee -a "$out/$name.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import sys, cupy, numpy, torch; print(sys.version.split()[0], 'cupy', cupy.__version__,
'numpy', numpy.__version__, 'torch', torch.__version__)"; } > "$out/env.txt" 2>&1
for part in $parts; do
    case $part in
    tests) run tests 170 $py -m pytest -q -n 8 -rfs --tb=short -p no:cacheprovider ;;
    bench) run bench 240 $py benchmarks/bench_models.py --backend cupy --reps 20 \
        --json "$out/performance_gpu.json" --md "$out/performance_gpu_table.md" \
        --png "$out/performance_gpu.png" ;;
    zoo) run zoo 120 $py benchmarks/bench_models.py --backend cupy --reps 10 \
        --models vgg googlenet resnet --skip-sweep --skip-memory \
        --json "$out/performance_gpu_zoo.json" --md "$out/performance_gpu_zoo.md" ;;
    profile) run profile 60 env DL_BACKEND=cupy $py benchmarks/profile_layers.py --batch 100 ;;
    layers) run layers 60 env DL_BACKEND=cupy $py benchmarks/bench_layers.py --reps 20 ;;
    train)
        run train 150 env DL_BACKEND=cupy $py examples/ch7_simple_convnet.py --cuda-graph \
            --out /tmp/xpnet_ch7
        cp /tmp/xpnet_ch7/summary.json "$out/ch7_summary.json" 2>/dev/null
        run train 240 env DL_BACKEND=cupy $py examples/ch8_deep_convnet.py --cuda-graph \
            --fp16-backends cupy --out /tmp/xpnet_ch8
        cp /tmp/xpnet_ch8/summary.json "$out/ch8_summary.json" 2>/dev/null ;;
    seeds)
        rm -rf /tmp/xpnet_seeds  # seeds.json collects every run found there
        for s in 0 1 2 3 4 5 6 7 8 9; do
            run seeds 60 env DL_BACKEND=cupy $py examples/ch7_simple_convnet.py --cuda-graph \
                --seed $s --out /tmp/xpnet_seeds/ch7_s$s
        done
        for s in 0 1 2 3 4; do
            run seeds 90 env DL_BACKEND=cupy $py examples/ch8_deep_convnet.py --cuda-graph \
                --fp16-backends cupy --fp16-samples 1000 --seed $s --out /tmp/xpnet_seeds/ch8_s$s
        done
        $py -c "import glob, json, sys
runs = {p.split('/')[-2]: json.load(open(p)) for p in sorted(glob.glob('/tmp/xpnet_seeds/*/summary.json'))}
json.dump({k: {'seed': r['seed'], 'final_test_acc': r['results']['final_test_acc'],
               'train_seconds': r['results']['train_seconds'],
               'device': r['environment'].get('device')} for k, r in runs.items()},
          open(sys.argv[1], 'w'), indent=1)" "$out/seeds.json" ;;
    *) echo "unknown part: $part" >&2 ;;
    esac
done
cat "$out/env.txt"
for f in "$out"/*.txt; do tail -n 2 "$f"; done
grep -hE '^\|' "$out/bench.txt" 2>/dev/null | head -n 8
