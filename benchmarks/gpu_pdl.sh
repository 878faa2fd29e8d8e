#!/usr/bin/env bash
# Device calls for programmatic dependent launch of the decode kernels (csrc/int4_common.cuh,
# session 14). carry: awq_compile/_lib (built from this tree). Session 14's four calls were this
# script's `a` (without the traces from call 3 on) on four successive libraries, plus `b` in call 3.
#   bash benchmarks/gpu_pdl.sh a   # every CUDA test (tests/test_cuda_pdl.py among them), 7B decode at
#                                  # batch 1 and 8 with PDL on and off (--ablate pdl), traces at 8 and 1
#   bash benchmarks/gpu_pdl.sh b   # 13B decode with PDL on and off
#   bash benchmarks/gpu_pdl.sh c   # not run yet: why PDL loses at batch 8. The PDL tests, then batch-8
#                                  # traces with PDL up to M = 8 (AWQ_PDL=8), without and with the
#                                  # down projection's cluster (AWQ_FOLD_CLUSTER=0: workspace + sum kernel)
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_pdl_out
decode() {  # shape, seconds
  timeout "$2" python3 benchmarks/bench_e2e_gpu.py decode --shape "$1" --batch 1 8 --ablate pdl \
    --out "$OUT/e2e_$1.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
}
if [ "${1:-a}" = a ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  decode 7b 250
  for b in 8 1; do
    timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch $b --out "$OUT" > "$OUT/trace$b.txt" 2>&1
    grep -A12 "kernel time" "$OUT/trace$b.txt" | tail -13
  done
elif [ "$1" = b ]; then
  decode 13b 280
else
  timeout 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_pdl.py > "$OUT/t_pdl.txt" 2>&1
  tail -1 "$OUT/t_pdl.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t_pdl.txt" | head
  for env in "AWQ_PDL=0" "AWQ_PDL=8" "AWQ_PDL=8 AWQ_FOLD_CLUSTER=0"; do
    tag=$(echo "$env" | tr ' =' '_-')
    env $env timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" \
      > "$OUT/trace8_$tag.txt" 2>&1
    echo "$env"; grep -A12 "kernel time" "$OUT/trace8_$tag.txt" | tail -13
  done
fi
