#!/usr/bin/env bash
# One device call for the rotary + KV-cache fusion (passes/fuse_rope_cache.py, session 12): every
# CUDA test, 7B decode at batch 1 and 8 with the fusion on and off (--ablate fuse_rope), and the
# batch-8 trace (inductor's three rotary/cache kernels should be one awq_rope_cache launch).
# carry: awq_compile/_lib.
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_rope_out
timeout 190 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
timeout 320 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate fuse_rope \
  --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" > "$OUT/trace8.txt" 2>&1
grep -B2 -A12 "kernel time" "$OUT/trace8.txt" | tail -32
