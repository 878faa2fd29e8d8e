#!/usr/bin/env bash
# Session 25's device calls, from branch experiment/fold-m16-f2's checkout
# (carry: awq_compile/_lib = main's library, awq_compile/_lib_i = the branch's).
#   bash benchmarks/gpu_session25.sh a  # every CUDA test on both libraries (two processes side by
#     side: correctness only), then 28672x8192 at M = 2..8 in every block configuration of the
#     folded GEMV against the dispatch and cuBLAS (graph-timed, main's library)
#   bash benchmarks/gpu_session25.sh b  # 7B decode at batch 12 and 16, main's library against the
#     branch's in alternating processes (gpu_lib_ab.sh, two rounds)
#   bash benchmarks/gpu_session25.sh c  # (from main after the merge, carry awq_compile/_lib): every
#     decode shape at M = 1..8, the folded GEMV alone with at least n K slices ($AWQ_FOLD_KS)
#     beside its own plan, the dispatch and cuBLAS (graph-timed); the dispatch alone at 12 and 16 tokens
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session25_out
A=awq_compile/_lib/libawq_int4.so B=awq_compile/_lib_i/libawq_int4.so
case "${1:-a}" in
a)
  for tag in main f2; do
    lib=$A; [ "$tag" = f2 ] && lib=$B
    AWQ_COMPILE_CUDA_LIB=$lib timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests \
      > "$OUT/t_$tag.txt" 2>&1 &
  done
  wait
  for tag in main f2; do
    echo "CUDA tests, library $tag: $(tail -1 "$OUT/t_$tag.txt")"
    grep -E "^(FAILED|ERROR)" "$OUT/t_$tag.txt" | head -20
  done
  (cd benchmarks && AWQ_COMPILE_CUDA_LIB=../$A timeout 150 python3 bench_fold_dispatch.py --m 2 4 6 8 \
    --cfgs 0 1 2 3 4 --shapes 28672x8192 > "$OUT/fold_dispatch_28672.md" 2>&1)
  grep -E "^\||Error" "$OUT/fold_dispatch_28672.md"
  ;;
b)
  BATCH="12 16" ATTENTION=0 bash benchmarks/gpu_lib_ab.sh "$A" "$B" 2
  ;;
c)
  (cd benchmarks && timeout 330 python3 bench_fold_dispatch.py --m 1 2 4 8 --cfgs 0 \
    --fold-env AWQ_FOLD_KS=2 AWQ_FOLD_KS=3 AWQ_FOLD_KS=4 AWQ_FOLD_KS=5 AWQ_FOLD_KS=8 > "$OUT/fold_ks.md" 2>&1)
  grep -E "^\||Error" "$OUT/fold_ks.md"
  (cd benchmarks && timeout 150 python3 bench_fold_dispatch.py --m 12 16 --dispatch-only > "$OUT/dispatch_m12_16.md" 2>&1)
  grep -E "^\||Error" "$OUT/dispatch_m12_16.md"
  ;;
esac
