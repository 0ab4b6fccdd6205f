#!/usr/bin/env bash
# Same machine, same call: the wavefront2d kernels of this tree (dist/gpu/ wheel, `tools/dev.py
# gpu-wheel`) beside those of an A/B tree (`tools/dev.py ab-tree REV`, carried with it): the GPU
# tests of this tree, bench_wavefront2d.py of this tree run on both, optional extra runs of this tree
# under other strip settings, and an Nsight Compute summary at 256x256 and the M2D-T 56x56 layer.
#
#   bash tools/gpu_wave_ab.sh OLD_TREE        env: TUNES="2,2,16 4,2"  (SSM2D_WAVE_STRIP_TUNE values)
#                                                  TUNE_CASES=1,2,3  TUNE_FWD_ONLY=1 (the tune runs)
#                                                  CASES=0,1,2,3,4,6,7  SKIP_TESTS=1  SKIP_NCU=1
# Logs and tables go to $OUT (default benchmarks/results/latest).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] && [ -f "$1/COMMIT" ] || { echo "usage: tools/gpu_wave_ab.sh OLD_TREE (made by tools/dev.py ab-tree)" >&2; exit 2; }
OUT=${OUT:-benchmarks/results/latest}
# The lent machines get a copy of the tree whose git HEAD may be stale: name the commit measured.
[ -n "${SSM2D_COMMIT:-}" ] || echo "warning: SSM2D_COMMIT is not set; the tables will name the copy's git HEAD" >&2
OLD=$1
old=$(cat "$OLD/COMMIT")
CASES=${CASES:-0,1,2,3,4,6,7}
mkdir -p "$OUT/old-$old"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ssm2d-site dist/gpu/ssm2d_kernels-*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "/tmp/ssm2d-site-$old" "$OLD"/wheel/ssm2d_kernels-*.whl || exit 1
NEW_PATH=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
OLD_PATH=/tmp/ssm2d-site-$old:$OLD/packages/ssm2d-nn/src:$OLD/packages/ssm2d-vision/src:$OLD/packages/ssm2d-path/src
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "# GPU test log: $(cat "$OUT/device.txt"), $(date -u +%F), commit ${SSM2D_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
    > "$OUT/gpu_tests_wavefront2d.log"
  PYTHONPATH=$NEW_PATH python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-nn/tests/test_wavefront2d_gpu.py \
    2>&1 | tee -a "$OUT/gpu_tests_wavefront2d.log" | tail -n 4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  PYTHONPATH=$NEW_PATH python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-kernels/tests tests \
    -k "wavefront2d or wave or m2d or mamba2d" 2>&1 | tee -a "$OUT/gpu_tests_wavefront2d.log" | tail -n 3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "== old $old"
PYTHONPATH=$OLD_PATH python3 benchmarks/bench_wavefront2d.py --cases "$CASES" --no-reference --out "$OUT/old-$old" 2>&1 | tail -n 12
echo "== new"
PYTHONPATH=$NEW_PATH python3 benchmarks/bench_wavefront2d.py --cases "$CASES" --out "$OUT" 2>&1 | tail -n 12
for tune in ${TUNES:-}; do
  echo "== new, SSM2D_WAVE_STRIP_TUNE=$tune"
  mkdir -p "$OUT/tune-${tune//,/_}"
  SSM2D_WAVE_STRIP_TUNE=$tune PYTHONPATH=$NEW_PATH python3 benchmarks/bench_wavefront2d.py \
    --cases "${TUNE_CASES:-$CASES}" ${TUNE_FWD_ONLY:+--fwd-only} --no-reference --out "$OUT/tune-${tune//,/_}" 2>&1 | tail -n 8
done
if [ -z "${SKIP_NCU:-}" ]; then
  for c in 2 6; do
    PYTHONPATH=$NEW_PATH python3 benchmarks/ncu_summary.py --kernels regex:wave_ --count 3 --label "case $c" -- \
      python3 benchmarks/profile_wavefront2d.py --case $c 2>&1 | tee -a "$OUT/ncu_new.md"
  done
fi
exit $status
