#!/usr/bin/env bash
# One device call: the kernel wheel of dist/gpu (the kernels of aa20cfd, unchanged), the GPU tests of the
# changed layers, the host-time census of a training step of this tree (profile_step_host.py), and main's
# Python (build/ab/aa20cfd) vs this tree's training-step wall time, alternately (same machine, same wheel).
set -uo pipefail
O=/tmp/ab-out; mkdir -p $O
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site dist/gpu/ssm2d_kernels-*.whl || exit 1
export PYTHONUNBUFFERED=1 SSM2D_COMMIT=${NEW:-worktree}
pack() { tar -czf "$OUT/results.tgz" -C $O . 2>/dev/null; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $O/device.txt
paths() { echo /tmp/site:$1/packages/ssm2d-nn/src:$1/packages/ssm2d-vision/src:$1/packages/ssm2d-path/src; }
if [ -n "${TESTS:-1}" ]; then
  PYTHONPATH=$(paths .) timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider packages/ssm2d-nn/tests/test_layer_norm_gpu.py \
    packages/ssm2d-vision/tests/test_vmamba.py packages/ssm2d-vision/tests/test_m2d.py -k "${TESTS_K:-not compile}" > $O/gpu_tests.log 2>&1
  tail -3 $O/gpu_tests.log; pack
fi
if [ -n "${CENSUS:-}" ]; then
  PYTHONPATH=$(paths .) timeout 200 python3 benchmarks/profile_step_host.py --models ${CENSUS_MODELS:-vmamba_tiny} \
    --layout cl --steps 3 --reps 10 --top 45 --out $O/census > $O/census.log 2>&1; tail -2 $O/census.log; pack
fi
for r in ${ROUNDS:-1 2}; do
  for tree in build/ab/aa20cfd .; do
    name=$([ "$tree" = . ] && echo new || echo old)
    for lay in ${LAYOUTS:-cl}; do
      PYTHONPATH=$(paths $tree) timeout 150 python3 benchmarks/profile_step_host.py --models ${AB_MODELS:-convnext_tiny,vmamba_tiny,vmamba2d_tiny,m2d_tiny} \
        --layout $lay --steps 1 --reps ${REPS:-20} --top 30 --out $O/ab_${name}_${lay}_r$r > /dev/null 2>&1
      grep -h -e "^## " -e "Wall time" $O/ab_${name}_${lay}_r$r/profile_step_host.md | paste - - | sed "s/^/$name r$r: /" | tee -a $O/ab_walls.txt
    done
    pack
  done
done
pack
