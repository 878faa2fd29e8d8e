#!/usr/bin/env bash
# Device calls for the decode attention (csrc/decode_attention.cu, passes/swap_decode_attention.py,
# session 15). carry: awq_compile/_lib (built from this tree).
#   bash benchmarks/gpu_attention.sh a   # the attention tests, every CUDA test, the attention kernel table
#   bash benchmarks/gpu_attention.sh b   # 7B decode at batch 1 and 8: bf16, bf16 + decode attention,
#                                        # INT4, INT4 without it (--ablate decode_attention); traces at 1, 8
#   bash benchmarks/gpu_attention.sh c   # the same decode at 13B
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_attention_out
decode() {  # shape, seconds
  timeout "$2" python3 benchmarks/bench_e2e_gpu.py decode --shape "$1" --batch 1 8 --ablate decode_attention \
    --bf16-attention --out "$OUT/e2e_$1.json" 2>&1 | grep -E "^\{|Error|error" | tail -10
}
case "${1:-a}" in
a)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_attention.py > "$OUT/t_attention.txt" 2>&1
  tail -1 "$OUT/t_attention.txt"; grep -E "^(FAILED|ERROR)|Error" "$OUT/t_attention.txt" | head -20
  timeout 150 python3 benchmarks/bench_attention.py --out "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  cat "$OUT/attention.txt" | tail -20
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests --deselect tests/test_cuda_attention.py \
    > "$OUT/t.txt" 2>&1; tail -1 "$OUT/t.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head
  ;;
b)
  decode 7b 330
  for b in 1 8; do
    timeout 80 python3 benchmarks/trace_decode.py --layers 2 --batch $b --out "$OUT" > "$OUT/trace$b.txt" 2>&1
    grep -A14 "## int4" "$OUT/trace$b.txt" | tail -13; grep -A10 "kernel time" "$OUT/trace$b.txt" | tail -22
  done
  ;;
c)
  decode 13b 400
  ;;
esac
