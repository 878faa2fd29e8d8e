#!/usr/bin/env bash
# Device calls of session 18, after blocks of 8 warps in the decode attention and the tc kernel's
# PDL became defaults. carry: awq_compile/_lib.
#   bash benchmarks/gpu_session18.sh a   # every CUDA test; 7B decode with the new defaults against
#                                        # the old (AWQ_ATTN_THREADS=128,AWQ_PDL_TC=0), and PDL at
#                                        # every M with and without the folded GEMV's clusters
#   bash benchmarks/gpu_session18.sh b   # 13B decode, the same ablations
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session18_out
ABLATIONS="env:AWQ_ATTN_THREADS=128,AWQ_PDL_TC=0 env:AWQ_PDL=8 env:AWQ_PDL=8,AWQ_FOLD_CLUSTER=0"
decode() { decode_ablations "$1" "$2" $ABLATIONS; }  # shape, seconds
case "${1:-a}" in
a)
  cuda_tests 240
  decode 7b 400
  ;;
b)
  decode 13b 540
  ;;
esac
