#!/usr/bin/env bash
# One device call for branch experiment/glu-epilogue: the pair-mode tests first, then every CUDA
# test, the 7B decode end to end (gate/up + silu * up as one awq::int4_linear_glu launch), and a
# kernel trace at batch 8 (the silu * mul kernel should be gone, gate/up no slower).
#   run: bash benchmarks/gpu_glu.sh        carry: awq_compile/_lib (built from this branch: ABI 8)
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_glu_out
timeout 90 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/test_cuda_kernels.py -k glu 2>&1 | tail -5
timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t_all.txt" 2>&1; tail -1 "$OUT/t_all.txt"
grep -E "^(FAILED|ERROR)" "$OUT/t_all.txt" | head
timeout 220 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --prompt 128 --new 256 \
  --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|^NVIDIA|Error|error" | tail -6
timeout 60 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" > "$OUT/trace8.txt" 2>&1
grep -A14 "kernel time" "$OUT/trace8.txt"
