#!/usr/bin/env bash
# Device calls for what session 19 could not finish (carry: awq_compile/_lib):
#   - session 19's call 6 (7B batch 1, INT4 only, with --ablate fuse_norm, a fresh machine) printed
#     nothing within its 390 s limit, though call 3 had run the same baseline (then
#     $AWQ_NORM_OP=1, now the default) in seconds on a warm machine. The benchmark now prints each
#     compile's time and, via --watchdog, every thread's stack if it is still running 30 s
#     before the limit: find where it stalls.
#   - fuse_norm=False at batch 1: the add + RMSNorm as our own launch (option norm_op, under PDL)
#     instead of the folded GEMV's norm prologue. Session 13 measured the prologue against
#     inductor's norm kernel (+0.9-1.3%), not against this one.
#   bash benchmarks/gpu_session20.sh a   # every CUDA test; 7B with fuse_norm off as the ablation
#   bash benchmarks/gpu_session20.sh b   # 13B, the same (and its ratios with norm_op's default)
#   bash benchmarks/gpu_session20.sh c   # traces: 13B batch 8 (2 layers: what its 2x lacks, ~1.8%),
#                                        # 7B batch 1 with fuse_norm off
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session20_out
case "${1:-a}" in
a)
  cuda_tests 200
  decode_ablations 7b 370 fuse_norm
  ;;
b)
  decode_ablations 13b 560 fuse_norm
  ;;
c)
  timeout 200 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --shape 13b --out "$OUT" > "$OUT/trace_13b_b8.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_13b_b8.txt" | head -40
  timeout 200 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --off fuse_norm --out "$OUT" \
    > "$OUT/trace_b1_fuse_norm_off.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_b1_fuse_norm_off.txt" | head -40
  rm -f "$OUT"/trace_*.json
  ;;
esac
