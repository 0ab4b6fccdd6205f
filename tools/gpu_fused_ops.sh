#!/usr/bin/env bash
# One device call (under ten minutes) that finishes the fused LayerNorm / StarReLU verification:
# the GPU tests of the layers and models that use them (the torch.compile paths included), then
# bench_models.py (convnext_tiny, m2d_tiny, vmamba_tiny) of this tree and of OLD_TREE in the same
# call, then one training-step profile each of m2d_tiny and vmamba_tiny. Each step tars what it has
# into $OUT/res.tgz (a call stopped at its limit still returns the steps before).
#
#   bash tools/gpu_fused_ops.sh OLD_TREE     OLD_TREE: tools/dev.py ab-tree <commit before the fused ops>
# Needs dist/gpu (tools/dev.py gpu-wheel) and OLD_TREE carried; set SSM2D_COMMIT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[ -n "${SSM2D_COMMIT:-}" ] || echo "warning: SSM2D_COMMIT is not set" >&2
OLD=${1:?usage: gpu_fused_ops.sh OLD_TREE}; old=$(cat "$OLD/COMMIT")
R=${R:-/tmp/r}; OUT=${OUT:-$R.out}; mkdir -p "$R" "$OUT"
snap() { tar -C "$R" -czf "$OUT/res.tgz" .; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/ssm2d-site dist/gpu/ssm2d_kernels-*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "/tmp/ssm2d-site-$old" "$OLD"/wheel/ssm2d_kernels-*.whl || exit 1
P=/tmp/ssm2d-site:packages/ssm2d-nn/src:packages/ssm2d-vision/src:packages/ssm2d-path/src
PO=/tmp/ssm2d-site-$old:$OLD/packages/ssm2d-nn/src:$OLD/packages/ssm2d-vision/src:$OLD/packages/ssm2d-path/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/device.txt"
echo "# GPU test log: $(cat "$R/device.txt"), $(date -u +%F), commit ${SSM2D_COMMIT:-unknown}" > "$R/gpu_tests.log"
N=packages/ssm2d-nn/tests
PYTHONPATH=$P timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider $N/test_layer_norm_gpu.py $N/test_star_relu_gpu.py \
  $N/test_norms.py $N/test_ss2d.py $N/test_m2d_layers.py $N/test_conv1x1.py packages/ssm2d-vision/tests tests 2>&1 \
  | tee -a "$R/gpu_tests.log" | tail -n 6
snap
for side in new old; do
  mkdir -p "$R/$side"
  # (this tree's bench_models times training in both layouts too: a longer limit)
  if [ $side = new ]; then PP=$P; B=benchmarks; C=${SSM2D_COMMIT:-unknown}; T=150; else PP=$PO; B=$OLD/benchmarks; C=$old; T=100; fi
  PYTHONPATH=$PP SSM2D_COMMIT=$C timeout $T python3 $B/bench_models.py convnext_tiny m2d_tiny vmamba_tiny --batch 128 \
    --steps 10 --warmup 3 --out "$R/$side/bench_models.md" 2>&1 | tail -n 4
  snap
done
for m in m2d_tiny vmamba_tiny; do
  PYTHONPATH=$P timeout 60 python3 benchmarks/profile_vmamba.py --out "$R/profile_$m" --model $m --batch 64 --steps 3 2>&1 | sed -n 5,8p
  snap
done
