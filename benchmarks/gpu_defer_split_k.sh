#!/usr/bin/env bash
# One device call for the K-slice sum left to the graph (passes/defer_split_k.py, session 11): its
# tests, the kernel tests and the backend's CUDA test, 7B decode at batch 1 (the path it changes),
# and the batch-1 trace (the simt_finalize kernels should be gone). carry: awq_compile/_lib.
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_defer_out
timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_defer_split_k.py tests/test_cuda_kernels.py \
  tests/test_backend.py > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/t.txt" | head
timeout 150 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 --out "$OUT/e2e_7b_b1.json" 2>&1 \
  | grep -E "^\{|Error|error" | tail -4
timeout 60 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --out "$OUT" > "$OUT/trace1.txt" 2>&1
grep -A10 "## int4" "$OUT/trace1.txt" | head -30; grep -A9 "kernel time" "$OUT/trace1.txt" | tail -10
