#!/usr/bin/env bash
# Same machine, same call: two trees of the project measured alternately, so that the host's speed
# (host-bound training steps differ by 1.6x between lent machines) cancels out of the comparison.
# Each tree is a directory made by `tools/dev.py ab-tree REV` (build/ab/SHORT: sources, benchmarks,
# kernel wheel); carry both to the GPU machine.
#
#   bash tools/gpu_ab.sh TREE_A TREE_B [ROUNDS]      (default 2 rounds: A B A B)
#
# Per round and tree: bench_models.py (MODELS, default convnext_tiny vmamba2d_tiny vmamba_tiny;
# inference at batch 128 and one training step at 64, channels-last) and bench_op_overhead.py of
# that tree. Logs and tables go to $OUT (default benchmarks/results/latest); the last lines are the
# medians per tree (tools/ab_summary.py).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: tools/gpu_ab.sh TREE_A TREE_B [ROUNDS]" >&2; exit 2; }
OUT=${OUT:-benchmarks/results/latest}
ROUNDS=${3:-2}
mkdir -p "$OUT"
names=()
for tree in "$1" "$2"; do
  [ -f "$tree/COMMIT" ] || { echo "not an A/B tree (no COMMIT file): $tree" >&2; exit 2; }
  name=$(cat "$tree/COMMIT")
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "/tmp/ab-site-$name" \
    "$tree"/wheel/ssm2d_kernels-*.whl || exit 1
  names+=("$name")
done
export PYTHONUNBUFFERED=1
status=0
for round in $(seq 1 "$ROUNDS"); do
  for i in 0 1; do
    tree=$([ $i -eq 0 ] && echo "$1" || echo "$2")
    name=${names[$i]}
    echo "== round $round, tree $name"
    (
      export SSM2D_COMMIT=$name
      export PYTHONPATH=/tmp/ab-site-$name:$tree/packages/ssm2d-nn/src:$tree/packages/ssm2d-vision/src:$tree/packages/ssm2d-path/src
      python3 "$tree/benchmarks/bench_models.py" ${MODELS:-convnext_tiny vmamba2d_tiny vmamba_tiny} --batch 128 \
        --steps 20 --warmup 5 --layout cl --out "$OUT/ab_models_${name}_r${round}.md" 2>&1 | tail -n 6
      python3 "$tree/benchmarks/bench_op_overhead.py" --out "$OUT/ab_overhead_${name}_r${round}" 2>&1 | tail -n 9
    ) || status=1
  done
done
python3 tools/ab_summary.py "$OUT" "${names[@]}" | tee "$OUT/ab_summary.md"
exit $status
