#!/usr/bin/env bash
# Device calls for the rotary + KV-cache fusion (passes/fuse_rope_cache.py, session 12).
# carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_rope.sh a   # every CUDA test, 7B decode at batch 1 and 8 with the fusion
#                                   # on and off (--ablate fuse_rope), the batch-8 trace
#   bash benchmarks/gpu_rope.sh b   # the rope tests, 7B and 13B decode, the batch-8 trace
#   bash benchmarks/gpu_rope.sh c   # (the folded GEMV's rope epilogue) every CUDA test, 7B decode,
#                                   # the batch-8 trace
# The batch-1 A/B of the rope mode at one token (RESULTS.md, section 3, session 12) ran as
# bench_e2e_gpu.py decode --batch 1 --models int4, twice with the rule and twice without.
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_rope_out
if [ "${1:-a}" = c ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  timeout 210 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
elif [ "${1:-a}" = a ]; then
  timeout 190 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  timeout 320 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate fuse_rope \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
else
  timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_fuse_rope_cache.py 2>&1 | tail -2
  timeout 210 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
  timeout 250 python3 benchmarks/bench_e2e_gpu.py decode --shape 13b --batch 1 8 \
    --out "$OUT/e2e_13b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
fi
timeout 65 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" > "$OUT/trace8.txt" 2>&1
grep -B2 -A12 "kernel time" "$OUT/trace8.txt" | tail -32
