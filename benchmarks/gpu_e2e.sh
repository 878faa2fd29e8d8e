#!/usr/bin/env bash
# One device call for the end-to-end figures (issue 7's, and the backend under CUDA graphs):
#   run: bash benchmarks/gpu_e2e.sh LAYERS     carry: awq_compile/_lib (the CUDA library)
#   SKIP_QUANT=1 / SKIP_DECODE=1 skip one half; QUANT_TIMEOUT / DECODE_TIMEOUT (s) bound each;
#   SHAPE=13b for Llama-2-13B's shapes (LAYERS=40 for all of them); UNFUSED="1 8" also decodes
#   with fuse_siblings=False at those batch sizes.
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_e2e_out
LAYERS=${1:-32}
python3 -c "import awq_compile._cuda as c; print('cuda kernels:', c.available())"
[ -n "${SKIP_QUANT:-}" ] || timeout "${QUANT_TIMEOUT:-70}" python3 benchmarks/bench_e2e_gpu.py quantize --shape "${SHAPE:-7b}" --layers "$LAYERS" --n-samples 128 \
  --out "$OUT/quantize.json" 2>&1 | tr '\r' '\n' | grep -E "^\{|Error|error|[0-9]+/[0-9]+ \[" | awk 'NR % 8 == 1 || /^\{|rror/' | tail -40
[ -n "${SKIP_DECODE:-}" ] || timeout "${DECODE_TIMEOUT:-150}" python3 benchmarks/bench_e2e_gpu.py decode --shape "${SHAPE:-7b}" --layers "$LAYERS" --batch 1 8 \
  --unfused ${UNFUSED:-} --prompt 128 --new 256 --out "$OUT/decode.json" 2>&1 | grep -E "^\{|^NVIDIA|Error|error" | tail -12
