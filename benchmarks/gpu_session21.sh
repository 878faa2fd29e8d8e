#!/usr/bin/env bash
# Session 21's device calls (carry: awq_compile/_lib).
#   bash benchmarks/gpu_session21.sh a  # the library with the tc kernel's PDL limited to weights of
#     at most 16 MiB: every CUDA test, then the tc kernel against the other decode kernels at
#     M = 2..8 (do_bench) and the op's dispatch graph-timed, with and without $AWQ_PDL_TC=0 (which
#     should now differ only on the 4096x4096 weight)
#   bash benchmarks/gpu_session21.sh b  # on branch experiment/attn-early's library only (main's
#     kernel has no such switch): the decode attention's early first round (one query row a
#     block): its tests, 7B decode with $AWQ_ATTN_EARLY=0 as the ablation, the attention
#     graph-timed both ways, then every CUDA test
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session21_out
case "${1:-a}" in
a)
  cuda_tests 330
  echo '{"shapes": [[28672, 8192], [8192, 8192], [4096, 4096]], "m": [2, 4, 8], "group_size": 128}' > /tmp/s21.json
  timeout 100 python3 benchmarks/bench_kernels.py --shapes /tmp/s21.json --only cublas,tc,pc,mma,sm90 \
    --out "$OUT/kernels_tc.md" > /dev/null 2>&1
  grep -E "^\| [0-9]" "$OUT/kernels_tc.md" | cut -d'|' -f2,3,4,7,8,9,11
  (cd benchmarks && timeout 120 python3 bench_fold_dispatch.py --dispatch-only --m 2 4 8 --env AWQ_PDL_TC=0 \
    > "$OUT/fold_dispatch.md" 2>&1)
  grep -E "^\|" "$OUT/fold_dispatch.md"
  ;;
b)
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_attention.py 2>&1 | tail -3
  BATCH="1 8" decode_ablations 7b 200 env:AWQ_ATTN_EARLY=0 --models int4
  timeout 60 python3 benchmarks/bench_attention.py --quick 2>&1 | tail -12
  cuda_tests 200
  ;;
esac
