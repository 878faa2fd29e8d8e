#!/usr/bin/env bash
# Device calls for programmatic dependent launch of the decode kernels (csrc/int4_common.cuh,
# session 14). carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_pdl.sh a   # every CUDA test (tests/test_cuda_pdl.py among them), 7B decode at
#                                  # batch 1 and 8 with PDL on and off (--ablate pdl), the batch-1 trace
#   bash benchmarks/gpu_pdl.sh b   # graph-timed kernels with PDL on and off, 13B decode
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_pdl_out
if [ "${1:-a}" = a ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  timeout 330 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate pdl \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
  timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --out "$OUT" > "$OUT/trace1.txt" 2>&1
  grep -A12 "kernel time" "$OUT/trace1.txt" | tail -13
elif [ "$1" = c ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_pdl.py tests/test_cuda_kernels.py \
    -k "pdl or simt or tc or int4_linear" > "$OUT/t_pdl.txt" 2>&1; tail -1 "$OUT/t_pdl.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t_pdl.txt" | head
  timeout 330 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate pdl \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
  for b in 8 1; do
    timeout 70 python3 benchmarks/trace_decode.py --layers 2 --batch $b --out "$OUT" > "$OUT/trace$b.txt" 2>&1
    grep -A12 "kernel time" "$OUT/trace$b.txt" | tail -13
  done
elif [ "$1" = d ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_pdl.py tests/test_cuda_norm.py \
    tests/test_cuda_kernels.py -k "pdl or fold or glu or norm or decode" > "$OUT/t_d.txt" 2>&1; tail -1 "$OUT/t_d.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t_d.txt" | head
  for s in 7b 13b; do
    timeout 280 python3 benchmarks/bench_e2e_gpu.py decode --shape $s --batch 1 8 --ablate pdl \
      --out "$OUT/e2e_$s.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
  done
elif [ "$1" = e ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_pdl.py tests/test_cuda_norm.py \
    tests/test_cuda_kernels.py -k "pdl or simt or tc or fold or glu or norm or decode or int4_linear" \
    > "$OUT/t_e.txt" 2>&1; tail -1 "$OUT/t_e.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t_e.txt" | head
  timeout 250 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 8 --ablate pdl \
    --out "$OUT/e2e_7b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
else
  for p in 1 0; do
    AWQ_PDL=$p timeout 120 python3 benchmarks/bench_fold_dispatch.py --out "$OUT/dispatch_pdl$p.md" \
      > "$OUT/dispatch_pdl$p.txt" 2>&1; tail -20 "$OUT/dispatch_pdl$p.txt"
  done
  timeout 260 python3 benchmarks/bench_e2e_gpu.py decode --shape 13b --batch 1 8 --ablate pdl \
    --out "$OUT/e2e_13b.json" 2>&1 | grep -E "^\{|Error|error" | tail -8
fi
