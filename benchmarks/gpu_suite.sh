#!/usr/bin/env bash
# One command for a GPU machine (works offline): build, GPU tests, AOT compile checks, op / module /
# model benchmarks, all gathered into benchmarks/results/gpu-<device>-<date>/ ready to commit.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root
#   SUITE_OUT=/tmp/x bash benchmarks/gpu_suite.sh
#
# It builds the extension for this machine's GPU architecture and best CPU instruction set only, and
# keeps a build (from an earlier run or a `pip install -e .`) that is newer than its sources. Every step
# has its own time budget (620 s in all, about 10.5 minutes; 380 s without the build); a step that fails or runs
# out of time is recorded in steps.tsv and the suite goes on. Benchmarks write their JSON as they
# go, so a step cut short still leaves the rows it measured.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

dev=$($PY -c 'import re,torch; print(re.sub(r"[^a-z0-9]+","-",torch.cuda.get_device_name(0).lower()).strip("-") if torch.cuda.is_available() else "nogpu")' 2>/dev/null || echo unknown)
OUT=${SUITE_OUT:-benchmarks/results/gpu-${dev}-$(date +%Y%m%d)}
mkdir -p "$OUT"
echo "results: $OUT"
printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"

step() {  # step NAME BUDGET_S LOGFILE CMD...
  local name=$1 budget=$2 log=$3; shift 3
  local t0=$SECONDS
  echo "== $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=timeout; elif [ $rc -ne 0 ]; then st="fail($rc)"; fi
  printf '%s\t%s\t%s\n' "$name" "$st" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "   $st in $((SECONDS - t0))s, log $OUT/$log"
  tail -n 3 "$OUT/$log" | sed 's/^/   | /'
}

# Environment: driver, GPU, versions.
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1 || true
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  $PY -c 'import sys,torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("archs", torch.cuda.get_arch_list())' 2>&1
  $PY -c 'import triton; print("triton", triton.__version__)' 2>&1
  nvcc --version 2>&1 | tail -n 2
  echo "cpus: $(nproc)"
} > "$OUT/versions.txt"

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build for this machine only: its GPU's architecture and the best CPU instruction set its CPU runs
# (the default build, sm_80 + sm_90 and three CPU builds, took 4 minutes on 2 cores; setuptools builds
# the extensions one after another, so more cores shorten each but not their sum). Either variable set
# by the caller is kept.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  arch=$($PY -c 'import torch; c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None; print("%d.%d" % c if c else "")' 2>/dev/null)
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=$arch
fi
if [ -z "${SCNET_FUSED_CPU_ISAS:-}" ]; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  isa=default
  if [[ $flags == *" avx2 "* && $flags == *" fma "* && $flags == *" f16c "* ]]; then isa=avx2; fi
  if [[ $isa == avx2 && $flags == *" avx512f "* && $flags == *" avx512bw "* && $flags == *" avx512vl "* \
        && $flags == *" avx512dq "* ]]; then isa=avx512; fi
  [ "$(uname -m)" = x86_64 ] || isa=default
  export SCNET_FUSED_CPU_ISAS=$isa
fi
echo "build for: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-(setup.py default)} SCNET_FUSED_CPU_ISAS=$SCNET_FUSED_CPU_ISAS" \
  | tee -a "$OUT/versions.txt"
# Budgets (seconds) sum to 620 plus a few seconds of glue (380 when the build is skipped).
# An extension already built with CUDA, newer than every file under csrc/ and setup.py, is not built
# again (pip's editable build starts from an empty build folder each time).
if $PY - <<'PYEOF' 2>/dev/null
import glob, os, sys
built = glob.glob("scnet_fused/_C*.so") + glob.glob("scnet_fused/_cpu_*.so")
sources = [p for p in glob.glob("csrc/**/*", recursive=True) + ["setup.py"] if os.path.isfile(p)]
if not built or not any(os.path.basename(p).startswith("_cpu_") for p in built):
    sys.exit(1)
if min(map(os.path.getmtime, built)) <= max(map(os.path.getmtime, sources)):
    sys.exit(1)
import scnet_fused._C as C
sys.exit(0 if C.with_cuda else 1)
PYEOF
then
  echo "== build: skipped (the built extension is newer than its sources)"
  printf 'build\tskipped (up to date)\t0\n' >> "$OUT/steps.tsv"
else
  step build 240 build.log $PY -m pip install -e . --no-build-isolation --no-deps -v
fi
step info 10 info.txt $PY -m scnet_fused info
step check 20 check.txt $PY -m scnet_fused check --dtype fp32,bf16
step tests-gpu 90 pytest-gpu.log $PY -m pytest tests -m gpu -q -x --junitxml="$OUT/pytest-gpu.xml" -p no:cacheprovider
aot_tests=()
for t in tests/test_aot_compile.py tests/test_cuda_build.py; do [ -f "$t" ] && aot_tests+=("$t"); done
if [ ${#aot_tests[@]} -gt 0 ]; then
  step tests-aot 50 pytest-aot.log $PY -m pytest "${aot_tests[@]}" -q --junitxml="$OUT/pytest-aot.xml" -p no:cacheprovider
fi
# Resource reports (registers, spills, shared memory) the AOT tests leave behind, if any.
for f in build/resource_report* benchmarks/results/*resources*; do [ -e "$f" ] && cp -r "$f" "$OUT/"; done

T="--warmup-ms 10 --rep-ms 40 --no-plot --out $OUT"
# Op level, SCNet-50 stage shapes: bf16 at N = 256 against eager and torch.compile (compiled per shape),
# then fp32 at N = 256 (with the k2 pool and BatchNorm + ReLU against their ATen forms) and bf16 at N = 64
# against eager.
step ops-bf16-n256 60 bench-ops-bf16-n256.log $PY -m scnet_fused bench --ops gate,gate_bn --dtype bf16 \
  --batch-size 256 --name ops_bf16_n256 $T
step ops-fp32-n256 20 bench-ops-fp32-n256.log $PY -m scnet_fused bench --ops gate,gate_bn,avgpool,bn_relu,bn_add_relu --dtype fp32 \
  --batch-size 256 --providers eager,triton,cuda --name ops_fp32_n256 $T
step ops-bf16-n64 15 bench-ops-bf16-n64.log $PY -m scnet_fused bench --ops gate,gate_bn --dtype bf16 \
  --batch-size 64 --providers eager,triton,cuda --name ops_bf16_n64 $T
# Module level: SCConv train step and eval forward, channels_last + bf16 autocast, N = 64.
step scconv 25 bench-scconv.log $PY -m scnet_fused bench --ops scconv --dtype bf16 --channels-last \
  --batch-size 64 --name scconv_bf16_cl_n64 $T
# The bottleneck's stacked entry convolution against two, at batch 2 (below the module's size rule
# for 2048x7x7, above it for 1024x14x14): whether that rule, measured on a CPU, suits a GPU.
step conv1-stack 15 bench-conv1-stack.log $PY benchmarks/bench_conv1_stack.py --batch-size 2 --amp bf16 \
  --channels-last --shapes 1024x14x14,2048x7x7 --rounds 2 --min-run-time 0.2 --device cuda --out "$OUT"
# k2's BatchNorm inside the gate kernels against the module on the pooled map, SCNet-50's SCConv shapes
# at N = 64: the launches the fusion saves against its extra statistics pass.
step pooled-bn 15 bench-pooled-bn.log $PY benchmarks/bench_pooled_bn.py --batch-size 64 --amp bf16 \
  --channels-last --rounds 2 --min-run-time 0.2 --device cuda --out "$OUT"
# Model level: scnet50 training, N = 256, bf16 autocast, channels_last, reference vs fused.
# SUITE_FULL=1 adds the compiled models (time to first step), which needs several more minutes.
MODEL_PROVIDERS=eager,fused
[ "${SUITE_FULL:-0}" = 1 ] && MODEL_PROVIDERS=eager,fused,compile,compile_fused
step model 40 bench-model.log $PY benchmarks/bench_model.py --model scnet50 --batch-size 256 --amp bf16 \
  --channels-last --steps 5 --warmup 1 --providers $MODEL_PROVIDERS --out "$OUT" --name model_scnet50

# Model inference: reference vs fused eval forward, bf16 autocast, channels_last, N = 64, with the
# error of each against a float64 run (writes its own table).
step infer 20 bench-infer.log $PY benchmarks/bench_infer.py --model scnet50 --batch-size 64 --amp bf16 \
  --channels-last --rounds 2 --out "$OUT"

# Tables and plots from whatever JSON exists (also from steps cut short).
$PY - "$OUT" <<'PYEOF' > "$OUT/plots.log" 2>&1
import glob, json, os, sys
from scnet_fused import bench
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    try:
        rows = json.load(open(path))
    except Exception as exc:
        print("skip", path, exc)
        continue
    if not isinstance(rows, list) or not rows or "op" not in rows[0] or "shape" not in rows[0]:
        continue  # not harness rows (bench_infer writes its own table)
    name = os.path.splitext(os.path.basename(path))[0]
    bench.write_markdown(rows, os.path.join(out, name + ".md"), title=name)
    bench.write_plot(rows, os.path.join(out, name + ".png"), title=name)
    print("wrote", name)
PYEOF
cat "$OUT/steps.tsv"
echo "done: $OUT"
