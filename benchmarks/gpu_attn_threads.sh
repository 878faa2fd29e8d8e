#!/usr/bin/env bash
# Device calls for $AWQ_ATTN_THREADS=256 (decode attention blocks of 8 warps where a block has at
# most 2 query rows and the grid fits in one wave) and $AWQ_PDL_TC=8 (the tc kernel, 7B's o
# projection at batch 8, launched with PDL: its weights load during the attention), sessions
# 17-18. carry: awq_compile/_lib. Both became defaults in session 18 (after b and c), so these
# ablations now measure nothing: benchmarks/gpu_session18.sh ablates them off.
#   bash benchmarks/gpu_attn_threads.sh a   # the attention's float64 tests with it; the kernel
#                                           # graph-timed at 7B batch 1 and 8 (bench_attention --quick)
#   bash benchmarks/gpu_attn_threads.sh b   # every CUDA test (the mma kernel's ordered split-K too);
#                                           # 7B decode with each of the two, and both, as ablations
#   bash benchmarks/gpu_attn_threads.sh c   # 13B decode, the same (its batch 8 keeps 4 warps: two waves)
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_attn_threads_out
ABLATIONS="env:AWQ_ATTN_THREADS=256 env:AWQ_PDL_TC=8 env:AWQ_ATTN_THREADS=256,AWQ_PDL_TC=8"
decode() { decode_ablations "$1" "$2" $ABLATIONS; }  # shape, seconds
case "${1:-a}" in
a)
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_attention.py \
    -k "eight_warp or bool_mask or every_cluster" > "$OUT/t_attn.txt" 2>&1
  tail -1 "$OUT/t_attn.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t_attn.txt" | head -10
  timeout 60 python3 benchmarks/bench_attention.py --quick --out "$OUT/attn.json" 2>/dev/null | tee "$OUT/attn.md" | grep -v "^$"
  ;;
b)
  cuda_tests 240
  decode 7b 360
  ;;
c)
  decode 13b 540
  ;;
esac
