#!/usr/bin/env bash
# One device call (under ten minutes): whole models and the MIL step with this tree's kernel wheel
# (WHEEL_DIR): bench_models (convnext_tiny and the project's backbones in one run, training timed in
# both layouts), one 2DMambaMIL training step at 150k patches (bf16) with its device-time profile, then
# the GPU tests of ssm2d-vision (torch.compile paths included) and EXTRA_TESTS. Each step tars what it has into
# $OUT/res.tgz (a call stopped at its limit still returns the steps before).
#
#   bash tools/gpu_models.sh [WHEEL_DIR]      (default dist/gpu; carry it; set SSM2D_COMMIT)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[ -n "${SSM2D_COMMIT:-}" ] || echo "warning: SSM2D_COMMIT is not set" >&2
R=${R:-/tmp/r}; OUT=${OUT:-$R.out}; mkdir -p "$R" "$OUT"
snap() { tar -C "$R" -czf "$OUT/res.tgz" .; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ssm2d-site "${1:-dist/gpu}"/ssm2d_kernels-*.whl || exit 1
export PYTHONPATH=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/device.txt"
timeout ${T_MODELS:-260} python3 benchmarks/bench_models.py ${MODELS:-convnext_tiny vmamba_tiny vmamba2d_tiny m2d_tiny} \
  --batch 128 --steps 10 --warmup 3 --out "$R/bench_models.md" 2>&1 | tail -n 8
snap
timeout ${T_MIL:-120} python3 benchmarks/bench_mil.py --models 2dmambamil --sizes 150000 --precision bf16 --profile --top 12 \
  2>&1 | tee "$R/bench_mil_150k.md" | tail -n 24
snap
echo "# GPU test log: $(cat "$R/device.txt"), $(date -u +%F), commit ${SSM2D_COMMIT:-unknown}" > "$R/gpu_tests_vision.log"
timeout ${T_TESTS:-180} python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-vision/tests ${EXTRA_TESTS:-} 2>&1 \
  | tee -a "$R/gpu_tests_vision.log" | tail -n 6
snap
