#!/usr/bin/env bash
# Device calls for $AWQ_PDL_CLUSTER (clusters launched with programmatic dependent launch), session 17.
# carry: awq_compile/_lib.
#   bash benchmarks/gpu_pdl_cluster.sh a   # every CUDA test; 7B decode at batch 1 and 8 with
#                                          # AWQ_PDL_CLUSTER=2 and =8 as ablations (each a fresh compile)
#   bash benchmarks/gpu_pdl_cluster.sh b   # the PDL and kernel tests; the decode GEMVs graph-timed with
#                                          # $AWQ_L2_PREFETCH; 7B decode with it and with AWQ_PDL_CLUSTER=0
#                                          # ($AWQ_L2_PREFETCH was slower everywhere and is gone: the
#                                          # columns now repeat the dispatch; csrc/NOTES.md, session 17)
#   bash benchmarks/gpu_pdl_cluster.sh c   # every CUDA test; 7B decode against AWQ_PDL_CLUSTER=0
#   bash benchmarks/gpu_pdl_cluster.sh d   # 13B decode against AWQ_PDL_CLUSTER=0; a batch-1 trace
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_pdl_cluster_out
decode() {  # shape, seconds, ablations...
  local shape=$1 secs=$2; shift 2
  timeout "$secs" python3 benchmarks/bench_e2e_gpu.py decode --shape "$shape" --batch 1 8 --ablate "$@" \
    --out "$OUT/e2e_$shape.json" 2>&1 | grep -E "^\{|Error|error" | tail -12
}
case "${1:-a}" in
a)
  timeout 230 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1
  tail -1 "$OUT/t.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head -20
  decode 7b 330 env:AWQ_PDL_CLUSTER=2 env:AWQ_PDL_CLUSTER=8
  ;;
b)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_pdl.py tests/test_cuda_kernels.py \
    > "$OUT/t_pdl.txt" 2>&1
  tail -1 "$OUT/t_pdl.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t_pdl.txt" | head -20
  timeout 150 python3 benchmarks/bench_fold_dispatch.py --m 1 8 --dispatch-only \
    --env AWQ_L2_PREFETCH=1048576 AWQ_L2_PREFETCH=4096 2>&1 | tee "$OUT/fold_l2.md" | grep -E "^\||Error"
  decode 7b 300 env:AWQ_L2_PREFETCH=1048576 env:AWQ_PDL_CLUSTER=0
  ;;
c)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1
  tail -1 "$OUT/t.txt"; grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head -20
  decode 7b 260 env:AWQ_PDL_CLUSTER=0
  ;;
d)
  decode 13b 420 env:AWQ_PDL_CLUSTER=0
  timeout 80 python3 benchmarks/trace_decode.py --layers 2 --batch 1 --out "$OUT" > "$OUT/trace1.txt" 2>&1
  grep -A14 "## int4" "$OUT/trace1.txt" | tail -13; grep -A10 "kernel time" "$OUT/trace1.txt" | tail -22
  ;;
esac
