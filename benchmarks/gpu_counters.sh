#!/usr/bin/env bash
# Device calls for the deferred cache counters (passes/defer_cache_counters.py) and the shared
# decode mask (swap_decode_attention._share_masks), session 16. carry: awq_compile/_lib.
#   bash benchmarks/gpu_counters.sh a   # the counter and rope tests; 7B decode at batch 1 and 8: bf16,
#                                       # INT4, INT4 without it (--ablate defer_counters); traces at 1, 8
#   bash benchmarks/gpu_counters.sh b   # the same decode at 13B
#   bash benchmarks/gpu_counters.sh c   # every CUDA test; 7B decode with the PDL up to M = 8 ablation
#                                       # ($AWQ_PDL=8: batch 8 changes, batch 1 is an A/A); trace at 1
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_counters_out
decode() {  # shape, seconds, ablation
  timeout "$2" python3 benchmarks/bench_e2e_gpu.py decode --shape "$1" --batch 1 8 --ablate "$3" \
    --out "$OUT/e2e_$1.json" 2>&1 | grep -E "^\{|Error|error" | tail -10
}
trace() {  # batch
  timeout 80 python3 benchmarks/trace_decode.py --layers 2 --batch "$1" --out "$OUT" > "$OUT/trace$1.txt" 2>&1
  grep -A14 "## int4" "$OUT/trace$1.txt" | tail -13; grep -A10 "kernel time" "$OUT/trace$1.txt" | tail -22
}
case "${1:-a}" in
a)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_defer_cache_counters.py \
    tests/test_fuse_rope_cache.py tests/test_cuda_norm.py > "$OUT/t_counters.txt" 2>&1
  tail -1 "$OUT/t_counters.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/t_counters.txt" | head -20
  decode 7b 300 defer_counters
  trace 1; trace 8
  ;;
b)
  decode 13b 400 defer_counters
  ;;
c)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1
  tail -1 "$OUT/t.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  decode 7b 260 env:AWQ_PDL=8
  trace 1
  ;;
esac
