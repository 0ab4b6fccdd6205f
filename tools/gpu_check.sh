#!/usr/bin/env bash
# On a GPU machine (torch with CUDA, pytest, Python >= 3.10): install the kernel wheel built by
# `tools/dev.py gpu-wheel` (dist/gpu/), run the GPU tests and the benchmarks in phases, and leave the
# logs and tables in $OUT (default: benchmarks/results/latest). Set SSM2D_COMMIT to the commit
# measured when the tree has no .git (as on the lent GPU machines).
#
#   bash tools/gpu_check.sh [PHASE ...]      PHASE: tests vision bench overhead models mil all (default: tests bench)
#
# Each phase fits one call of at most 10 minutes on an H200:
#   tests     the GPU tests of tests/, ssm2d-kernels and ssm2d-nn            -> gpu_tests.log
#   vision    the GPU tests of ssm2d-vision (they compile with inductor)     -> gpu_tests_vision.log
#   bench     bench_scan2d, bench_wavefront2d, profile_scan2d                -> bench_*.md, profile_scan2d.txt
#   overhead  bench_op_overhead (host time per op call)                      -> op_overhead.md
#   models    bench_models (convnext_tiny and the project's models, one run; each in the faster
#             layout, the other's img/s beside it) and one profiled vmamba2d_tiny training step
#                                                                            -> bench_models.md, vmamba2d_tiny/
#   mil       one 2DMambaMIL training step at 150k patches, bf16, with its device time per kernel
#                                                                            -> bench_mil_150k.md
# Environment: WHEEL_DIR (the kernel wheel's folder; default dist/gpu), TESTS_K (a pytest -k expression
# for the tests phases), SKIP_SCAN2D_BENCH=1 (bench phase: wavefront2d only), MODELS (models phase;
# default below), MODEL_REPEATS (models phase: bench_models that many times; medians by tools/ab_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ssm2d-site \
  "${WHEEL_DIR:-dist/gpu}"/ssm2d_kernels-*.whl || exit 1
export PYTHONPATH=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
export PYTHONUNBUFFERED=1
PHASES=("$@")
[ ${#PHASES[@]} -gt 0 ] || PHASES=(tests bench)
[ "${PHASES[0]}" != all ] || PHASES=(tests vision bench overhead models mil)
status=0

header() {
  echo "# $1"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "date $(date -u +%F), commit ${SSM2D_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  python3 -c "import torch, ssm2d_kernels as k; print('torch', torch.__version__, '| kernels', k.build_info(), '| devices', k.cuda_device_count())"
}

run_tests() {  # log, then the test paths
  local log=$1; shift
  header "GPU test log" | tee "$OUT/$log"
  python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} "$@" 2>&1 | tee -a "$OUT/$log" | tail -n 15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

for phase in "${PHASES[@]}"; do
  echo "== phase $phase"
  case $phase in
    tests) run_tests gpu_tests.log tests packages/ssm2d-kernels/tests packages/ssm2d-nn/tests ;;
    vision) run_tests gpu_tests_vision.log packages/ssm2d-vision/tests ;;
    bench)
      [ -n "${SKIP_SCAN2D_BENCH:-}" ] || python3 benchmarks/bench_scan2d.py --out "$OUT" 2>&1 | tail -n 20
      python3 benchmarks/bench_wavefront2d.py --out "$OUT" 2>&1 | tail -n 16
      [ -n "${SKIP_SCAN2D_BENCH:-}" ] || python3 benchmarks/profile_scan2d.py --cases 0,2,3 2>&1 | grep -v Warning |
        tee "$OUT/profile_scan2d.txt" | tail -n 30 ;;
    overhead) python3 benchmarks/bench_op_overhead.py --out "$OUT" 2>&1 | tail -n 14 ;;
    models)
      models=${MODELS:-convnext_tiny vmamba_tiny vmamba2d_tiny m2d_tiny}
      if [ "${MODEL_REPEATS:-1}" -le 1 ]; then
        python3 benchmarks/bench_models.py $models --batch 128 --steps 20 --warmup 5 --out "$OUT/bench_models.md" 2>&1 |
          tail -n 12
      else  # the whole list each time (drift falls on every model alike); medians by tools/ab_summary.py
        name=${SSM2D_COMMIT:-this}
        for r in $(seq 1 "$MODEL_REPEATS"); do
          python3 benchmarks/bench_models.py $models --batch 128 --steps 20 --warmup 5 \
            --out "$OUT/ab_models_${name}_r$r.md" 2>&1 | tail -n 8
        done
        python3 tools/ab_summary.py "$OUT" "$name" | tee "$OUT/bench_models_repeats.md"
      fi
      python3 benchmarks/profile_vmamba.py --model vmamba2d_tiny --channels-last --out "$OUT/vmamba2d_tiny" 2>&1 |
        tail -n 5 ;;
    mil) python3 benchmarks/bench_mil.py --models 2dmambamil --sizes 150000 --precision bf16 --profile --top 12 \
           2>&1 | tee "$OUT/bench_mil_150k.md" | tail -n 24 ;;
    *) echo "unknown phase: $phase (tests vision bench overhead models mil all)" >&2; exit 2 ;;
  esac
done
exit $status
