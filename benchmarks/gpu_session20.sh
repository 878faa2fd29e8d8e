#!/usr/bin/env bash
# Ran in session 20: part a (its INT4 compile stalled: inductor's eager IR formatting, fixed by
# backend.register_fallbacks); b's and c's measurements were made by calls 2-4 instead (RESULTS.md,
# section 3, session 20).
# Device calls for what session 19 could not finish (carry: awq_compile/_lib):
#   - session 19's call 6 (7B batch 1, INT4 only, with --ablate fuse_norm, a fresh machine) printed
#     nothing within its 390 s limit, though call 3 had run the same baseline (then
#     $AWQ_NORM_OP=1, now the default) among six runs in 97 s on a warm machine. The benchmark now prints each
#     compile's time and, via --watchdog, every thread's stack if it is still running 30 s
#     before the limit: find where it stalls.
#   - fuse_norm=False at batch 1: the add + RMSNorm as our own launch (option norm_op, under PDL)
#     instead of the folded GEMV's norm prologue. Session 13 measured the prologue against
#     inductor's norm kernel (+0.9-1.3%), not against this one.
#   - $AWQ_PDL=8 (PDL at every M) once more: it lost at batch 8 in sessions 14 and 18 (-6.4%), but
#     then the folded GEMVs followed inductor's norm kernels; now they follow our add + RMSNorm
#     (option norm_op), 8 blocks at batch 8, beside which their blocks could load weights.
#   bash benchmarks/gpu_session20.sh a   # 7B: fuse_norm off, AWQ_PDL=8 as ablations
#   bash benchmarks/gpu_session20.sh b   # 13B at batch 8 (its 2x lacks ~1.8%): AWQ_PDL=8; then
#                                        # batch 1 with fuse_norm off, INT4 only
#   bash benchmarks/gpu_session20.sh c   # every CUDA test; traces: 13B batch 8 (2 layers), 7B
#                                        # batch 1 with fuse_norm off
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session20_out
case "${1:-a}" in
a)
  decode_ablations 7b 560 fuse_norm env:AWQ_PDL=8
  ;;
b)
  BATCH=8 decode_ablations 13b 330 env:AWQ_PDL=8
  timeout 230 python3 benchmarks/bench_e2e_gpu.py decode --shape 13b --batch 1 --models int4 --ablate fuse_norm \
    --out "$OUT/e2e_13b_b1.json" --watchdog 200 2>&1 | grep -E "^\{|^\[e2e\]|Error|error|^Thread|^  File" | tail -20
  ;;
c)
  cuda_tests 200
  timeout 180 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --shape 13b --out "$OUT" > "$OUT/trace_13b_b8.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_13b_b8.txt" | head -40
  timeout 150 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --off fuse_norm --out "$OUT" \
    > "$OUT/trace_b1_fuse_norm_off.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_b1_fuse_norm_off.txt" | head -40
  rm -f "$OUT"/trace_*.json
  ;;
esac
