#!/usr/bin/env bash
# One device call for the producer/consumer decode kernel: its CUDA tests, then its timings next to
# the other decode kernels (do_bench with L2 flushed, and under CUDA graphs at the 7B shapes), and
# the dispatch with and without the folded GEMV (bench_fold_dispatch.py).
#   run: bash benchmarks/gpu_pc.sh        carry: awq_compile/_lib
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_pc_out
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py \
  -k "${TESTS:-pc}" 2>&1 | tee "$OUT/test.log" | tail -8
echo '{"shapes": [[8192, 28672], [28672, 8192], [8192, 8192], [4096, 4096]], "m": [1, 2, 4, 8], "group_size": 128}' \
  > /tmp/pc_shapes.json
timeout ${BENCH_TIMEOUT:-220} python3 benchmarks/bench_kernels.py --shapes /tmp/pc_shapes.json \
  --only cublas,tinygemm,simt,tc,pc,${PC_CFGS_ONLY:-pc1,pc2,pc3,pc4} --pc-cfgs ${PC_CFGS:-1,2,3,4} \
  ${BENCH_ARGS:-} --out "$OUT/kernels.md" > "$OUT/bench.log" 2>&1
grep -E "^\| [0-9]|^Card" "$OUT/kernels.md" | cut -c1-200
timeout ${GRAPH_TIMEOUT:-150} python3 benchmarks/profile_decode.py --layers 0 2>&1 | tee "$OUT/graph.log" | tail -25
timeout ${FOLD_TIMEOUT:-150} python3 benchmarks/bench_fold_dispatch.py 2>&1 | tee "$OUT/fold.log" | tail -30
