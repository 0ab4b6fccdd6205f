#!/usr/bin/env bash
# On a GPU machine (torch with CUDA, pytest, Python 3.12): install the kernel wheel built by
# `tools/dev.py gpu-wheel` (dist/gpu/), run the GPU tests and the benchmarks, and leave the log and
# tables in $OUT (default: benchmarks/results/latest). Set SSM2D_COMMIT to the commit measured
# when the tree has no .git (as on the lent GPU machines).
#
#   bash tools/gpu_check.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ssm2d-site dist/gpu/ssm2d_kernels-*.whl || exit 1
export PYTHONPATH=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
export PYTHONUNBUFFERED=1
{
  echo "# GPU test log"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "date $(date -u +%F), commit ${SSM2D_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  python3 -c "import torch, ssm2d_kernels as k; print('torch', torch.__version__, '| kernels', k.build_info(), '| devices', k.cuda_device_count())"
} | tee "$OUT/gpu_tests.log"
python3 -m pytest -q -m gpu -p no:cacheprovider ${1:+-k "$1"} tests packages/ssm2d-kernels/tests packages/ssm2d-nn/tests \
  2>&1 | tee -a "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
[ -n "${SKIP_SCAN2D_BENCH:-}" ] || python3 benchmarks/bench_scan2d.py --out "$OUT" 2>&1 | tail -n 20
python3 benchmarks/bench_wavefront2d.py --out "$OUT" 2>&1 | tail -n 16
[ -n "${SKIP_SCAN2D_BENCH:-}" ] || python3 benchmarks/profile_scan2d.py --cases 0,2,3 2>&1 | grep -v Warning | tee "$OUT/profile_scan2d.txt" | tail -n 30
exit $status
