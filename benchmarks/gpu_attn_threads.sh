#!/usr/bin/env bash
# Device call for $AWQ_ATTN_THREADS=256 (decode attention blocks of 8 warps where a block has at
# most 2 query rows), session 17. carry: awq_compile/_lib.
#   bash benchmarks/gpu_attn_threads.sh   # the attention's float64 tests with it; the kernel
#                                         # graph-timed at 7B batch 1 and 8 (bench_attention --quick)
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_attn_threads_out
timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_attention.py \
  -k "eight_warp or bool_mask or every_cluster" > "$OUT/t_attn.txt" 2>&1
tail -1 "$OUT/t_attn.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t_attn.txt" | head -10
timeout 60 python3 benchmarks/bench_attention.py --quick --out "$OUT/attn.json" 2>/dev/null | tee "$OUT/attn.md" | grep -v "^$"
