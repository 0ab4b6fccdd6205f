#!/usr/bin/env bash
# Same machine, same call: the scan2d kernels of two A/B trees (`tools/dev.py ab-tree REV`, both
# carried), OLD then NEW per run so that the GPU's state cancels out of the comparison: the scan2d GPU
# tests on NEW's kernels, bench_scan2d.py's VMamba 1D routes (case 5) per dtype and its MIL cases
# (0-2, fwd and fwd+bwd), and an Nsight Compute summary of NEW's backwards and MIL training forward
# (benchmarks/ncu_summary.py).
#
#   bash tools/gpu_scan_ab.sh OLD_TREE NEW_TREE    env: ROUNDS=2  ROW_DTYPES="bfloat16 float32"
#                                                       MIL_CASES=0,1,2  MIL_DTYPES=float32
#                                                       PHASES="tests row mil ncu"
#   (PHASES may add "chan": Nsight Compute of both trees' chan kernels at 2DVMamba-T stage 3)
#   (PHASES may add "src": NEW's per-instruction stall samples as CSV, read offline)
# Each phase writes into $OUT (default benchmarks/results/latest) as it finishes, so a call cut short
# by its time limit still returns the phases it completed.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] && [ -f "$1/COMMIT" ] && [ -f "$2/COMMIT" ] ||
  { echo "usage: tools/gpu_scan_ab.sh OLD_TREE NEW_TREE (each made by tools/dev.py ab-tree)" >&2; exit 2; }
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
declare -A TREE=([old]=$1 [new]=$2)
for t in old new; do
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "/tmp/scan-ab-$t" \
    "${TREE[$t]}"/wheel/ssm2d_kernels-*.whl || exit 1
done
# The tables name the commit measured: NEW's (the lent machines' copy has no usable git HEAD).
export PYTHONUNBUFFERED=1 SSM2D_COMMIT=$(cat "$2/COMMIT")
path() { echo "/tmp/scan-ab-$1:${TREE[$1]}/packages/ssm2d-nn/src:${TREE[$1]}/packages/ssm2d-vision/src:${TREE[$1]}/packages/ssm2d-path/src"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; echo "old $(cat "$1/COMMIT"), new $SSM2D_COMMIT"; } |
  tee "$OUT/device.txt"
status=0
for phase in ${PHASES:-tests row mil ncu}; do
  case $phase in
    tests)
      PYTHONPATH=$(path new) timeout "${TEST_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
        packages/ssm2d-nn/tests/test_scan2d_gpu.py packages/ssm2d-nn/tests/test_scan2d_routes_gpu.py \
        > "$OUT/gpu_tests.log" 2>&1 || status=1
      tail -n 2 "$OUT/gpu_tests.log" ;;
    row|mil)
      if [ "$phase" = row ]; then cases=5 dtypes=${ROW_DTYPES:-bfloat16 float32}
      else cases=${MIL_CASES:-0,1,2} dtypes=${MIL_DTYPES:-float32}; fi
      for r in $(seq 1 "${ROUNDS:-2}"); do
        for dt in $dtypes; do
          for t in old new; do
            echo "== $phase $t $dt r$r"
            PYTHONPATH=$(path $t) timeout 120 python3 benchmarks/bench_scan2d.py --cases "$cases" --dtype "$dt" \
              --no-reference --out "$OUT/${phase}_${t}_${dt}_r$r" 2>&1 | grep "^| [MV2]"
          done
        done
      done ;;
    ncu)
      PYTHONPATH=$(path new) timeout 150 python3 benchmarks/ncu_summary.py --kernels regex:bwd_row --count 1 \
        --label "1D routes bf16" -- python3 benchmarks/profile_scan2d.py --once --cases 5 --dtype bfloat16 \
        2>&1 | tee "$OUT/ncu_new.md"
      PYTHONPATH=$(path new) timeout 150 python3 benchmarks/ncu_summary.py --kernels "regex:lanes_(fwd|bwd)_kernel" --count 3 \
        --label "MIL 128x128" -- python3 benchmarks/profile_scan2d.py --once --cases 0 2>&1 | tee -a "$OUT/ncu_new.md" ;;
    chan)  # Nsight Compute of OLD's and NEW's chan kernels (N = 1, small grids) at 2DVMamba-T stage 3
      for t in old new; do
        PYTHONPATH=$(path $t) timeout 150 python3 benchmarks/ncu_summary.py --kernels "regex:scan2d_chan" --count 2 \
          --label "stage 3 $t" -- python3 benchmarks/profile_scan2d.py --once --cases 4 2>&1 | tee -a "$OUT/ncu_chan.md"
      done ;;
    src)  # per-instruction stall samples (the source page as CSV, SASS) of NEW's MIL lanes forward and
          # backward and its bf16 row backward (or SRC_SET's), for reading offline; not in the default phases
      # SRC_SET: "kernel-regex case dtype" entries separated by ';'
      IFS=';' read -ra set <<< "${SRC_SET:-lanes_fwd_kernel 0 float32;lanes_bwd_kernel 0 float32;bwd_row 5 bfloat16}"
      for k in "${set[@]}"; do
        read -r kern cs dt <<< "$k"
        PYTHONPATH=$(path new) timeout 150 ncu --set full -k "regex:$kern" -c 1 -f -o "/tmp/src_$kern" \
          python3 benchmarks/profile_scan2d.py --once --cases "$cs" --dtype "$dt" > /dev/null 2>&1 &&
          ncu -i "/tmp/src_$kern.ncu-rep" --page source --csv --print-source sass > "$OUT/src_$kern.csv" 2> "$OUT/src_$kern.err"
        echo "src $kern: $(wc -l < "$OUT/src_$kern.csv" 2>/dev/null || echo none) lines"
      done ;;
    *) echo "unknown phase: $phase" >&2; exit 2 ;;
  esac
done
exit $status
