#!/usr/bin/env bash
# Device calls for the gated MLP in one launch (awq::int4_linear_glu, the folded GEMV's pair mode;
# session 11). carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_glu.sh a   # the pair-mode tests, every CUDA test, 7B decode, batch-8 trace
#   bash benchmarks/gpu_glu.sh b   # 13B decode, batch-1 trace
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_glu_out
if [ "${1:-a}" = a ]; then
  timeout 90 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/test_cuda_kernels.py -k glu 2>&1 | tail -5
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t_all.txt" 2>&1; tail -1 "$OUT/t_all.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t_all.txt" | head
  timeout 220 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --prompt 128 --new 256 \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|^NVIDIA|Error|error" | tail -6
  timeout 60 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" > "$OUT/trace8.txt" 2>&1
  grep -A14 "kernel time" "$OUT/trace8.txt"
else
  timeout 60 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --out "$OUT" > "$OUT/trace1.txt" 2>&1
  grep -A14 "kernel time" "$OUT/trace1.txt"
  timeout 300 python3 benchmarks/bench_e2e_gpu.py decode --shape 13b --batch 1 8 --prompt 128 --new 256 \
    --out "$OUT/e2e_13b.json" 2>&1 | grep -E "^\{|^NVIDIA|Error|error" | tail -6
fi
