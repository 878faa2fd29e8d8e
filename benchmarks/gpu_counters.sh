#!/usr/bin/env bash
# Device call for the deferred cache counters (passes/defer_cache_counters.py, session 16).
# carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_counters.sh a   # the counter and rope tests; 7B decode at batch 1 and 8: bf16,
#                                       # INT4, INT4 without it (--ablate defer_counters); traces at 1, 8
#   bash benchmarks/gpu_counters.sh b   # the same decode at 13B
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_counters_out
decode() {  # shape, seconds
  timeout "$2" python3 benchmarks/bench_e2e_gpu.py decode --shape "$1" --batch 1 8 --ablate defer_counters \
    --out "$OUT/e2e_$1.json" 2>&1 | grep -E "^\{|Error|error" | tail -10
}
case "${1:-a}" in
a)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_defer_cache_counters.py \
    tests/test_fuse_rope_cache.py tests/test_cuda_norm.py > "$OUT/t_counters.txt" 2>&1
  tail -1 "$OUT/t_counters.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/t_counters.txt" | head -20
  decode 7b 300
  for b in 1 8; do
    timeout 80 python3 benchmarks/trace_decode.py --layers 2 --batch $b --out "$OUT" > "$OUT/trace$b.txt" 2>&1
    grep -A14 "## int4" "$OUT/trace$b.txt" | tail -13; grep -A10 "kernel time" "$OUT/trace$b.txt" | tail -22
  done
  ;;
b)
  decode 13b 400
  ;;
esac
