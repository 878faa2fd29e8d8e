#!/usr/bin/env bash
# Device calls for session 18's experiments, written after its device time (carry: awq_compile/_lib):
#   $AWQ_SIMT_CFG=2  the CUDA-core GEMV with 3 steps a warp, 2 blocks a SM: 7B's o projection at one
#                    token then requests all of its weights before its PDL wait, while our
#                    attention runs;
#   $AWQ_FOLD_CFG=4  the folded GEMV with 4 stages: q/k/v at one token requests 3 before its wait;
#   $AWQ_NORM_OP=1   the residual add + RMSNorm the projections do not take in (batch 8: all of
#                    them) as awq::add_rms_norm, one launch of csrc/add_rms_norm.cu each (since
#                    session 19 the default, backend option norm_op: the ablation turns it off).
#   bash benchmarks/gpu_deep_prime.sh a   # every CUDA test (the new kernel's, the configurations'
#                                         # sweeps, the decode A/Bs under inductor's deterministic
#                                         # mode); 7B decode with each as an ablation
#   bash benchmarks/gpu_deep_prime.sh b   # 13B decode, the same; the batch-1 trace of 2 7B layers
#                                         # with the two rings
#   bash benchmarks/gpu_deep_prime.sh c   # the kernels alone, graph-timed at M = 1 and 8 (chains of
#                                         # 20 PDL launches), each ring; the decode A/B tests
#                                         # once more (reproducible under the deterministic mode?);
#                                         # the batch-8 trace (norm_op on)
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_deep_prime_out
ABLATIONS="env:AWQ_SIMT_CFG=2 norm_op env:AWQ_FOLD_CFG=4"
decode() { decode_ablations "$1" "$2" $ABLATIONS; }  # shape, seconds
case "${1:-a}" in
a)
  cuda_tests 240
  decode 7b 350
  ;;
b)
  decode 13b 420
  AWQ_SIMT_CFG=2 AWQ_FOLD_CFG=4 timeout 120 python3 benchmarks/trace_decode.py --layers 2 --batch 1 \
    --out "$OUT" > "$OUT/trace_b1.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_b1.txt" | head -40
  ;;
c)
  timeout 200 python3 benchmarks/bench_fold_dispatch.py --m 1 8 --dispatch-only \
    --env AWQ_SIMT_CFG=2 AWQ_FOLD_CFG=4 2>/dev/null | tee "$OUT/kernels.md" | grep -v "^$"
  timeout 120 python3 benchmarks/trace_decode.py --layers 2 --batch 8 --out "$OUT" \
    > "$OUT/trace_b8.txt" 2>&1
  grep -A40 "## int4" "$OUT/trace_b8.txt" | head -40
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_attention.py tests/test_cuda_norm.py \
    tests/test_defer_cache_counters.py tests/test_fuse_rope_cache.py -k "decode or backend" 2>&1 | tail -1
  ;;
esac
