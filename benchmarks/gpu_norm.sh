#!/usr/bin/env bash
# Device calls for the residual add + RMSNorm in the folded GEMV's staging (passes/fuse_add_rms_norm.py,
# session 13). carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_norm.sh a   # the norm tests, 7B decode at batch 1 and 8 with the fusion on and
#                                   # off (--ablate fuse_norm), the batch-8 and batch-1 traces
#   bash benchmarks/gpu_norm.sh b   # every CUDA test, 13B decode
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_norm_out
if [ "${1:-a}" = a ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_norm.py > "$OUT/t_norm.txt" 2>&1
  tail -1 "$OUT/t_norm.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t_norm.txt" | head
  timeout 330 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate fuse_norm \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
  for b in 8 1; do
    timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch $b --out "$OUT" > "$OUT/trace$b.txt" 2>&1
    grep -A12 "kernel time" "$OUT/trace$b.txt" | tail -13
  done
else
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  timeout 260 python3 benchmarks/bench_e2e_gpu.py decode --shape 13b --batch 1 8 \
    --out "$OUT/e2e_13b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
fi
