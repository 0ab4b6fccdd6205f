#!/usr/bin/env bash
# One device call for the fused LayerNorm / StarReLU kernels (branch wip/fused-ln-starrelu): their GPU tests,
# bench_fused_ops.py, bench_models.py (convnext_tiny, m2d_tiny, vmamba_tiny), the m2d_tiny inference
# profile and the m2d GPU tests of ssm2d-vision; each step tars what it has into $OUT/res.tgz.
# Needs dist/gpu (tools/dev.py gpu-wheel) carried; set SSM2D_COMMIT.
set -u
export PYTHONUNBUFFERED=1
[ -n "${SSM2D_COMMIT:-}" ] || echo "warning: SSM2D_COMMIT is not set" >&2
R=${R:-/tmp/r}; OUT=${OUT:-$R.out}; mkdir -p $R $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ssm2d-site dist/gpu/ssm2d_kernels-*.whl || exit 1
P=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/device.txt
echo "# GPU test log: $(cat $R/device.txt), $(date -u +%F), commit $SSM2D_COMMIT" > $R/gpu_tests.log
PYTHONPATH=$P timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-nn/tests/test_layer_norm_gpu.py packages/ssm2d-nn/tests/test_star_relu_gpu.py 2>&1 | tee -a $R/gpu_tests.log | tail -15
tar -C $R -czf $OUT/res.tgz .
PYTHONPATH=$P timeout 90 python3 benchmarks/bench_fused_ops.py --out $R 2>&1 | tail -12
tar -C $R -czf $OUT/res.tgz .
PYTHONPATH=$P timeout 240 python3 benchmarks/bench_models.py convnext_tiny m2d_tiny vmamba_tiny --batch 128 --steps 10 --warmup 3 --out $R/bench_models.md 2>&1 | tail -6
tar -C $R -czf $OUT/res.tgz .
PYTHONPATH=$P timeout 80 python3 benchmarks/profile_vmamba.py --out $R --model m2d_tiny --batch 128 --inference --channels-last --steps 5 2>&1 | sed -n 5,22p
tar -C $R -czf $OUT/res.tgz .
PYTHONPATH=$P timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-vision/tests/test_m2d.py 2>&1 | tee -a $R/gpu_tests.log | tail -4
tar -C $R -czf $OUT/res.tgz .
