#!/usr/bin/env bash
# Session 21's last device call (carry: awq_compile/_lib, built with the tc kernel's PDL limited to
# weights of at most 16 MiB): every CUDA test, then the tc kernel against the other decode kernels
# at M = 2..8 (do_bench) and the op's dispatch graph-timed, with and without $AWQ_PDL_TC=0 (which
# should now differ only on the 4096x4096 weight).
#   bash benchmarks/gpu_session21.sh
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_session21_out
cuda_tests 330
echo '{"shapes": [[28672, 8192], [8192, 8192], [4096, 4096]], "m": [2, 4, 8], "group_size": 128}' > /tmp/s21.json
timeout 100 python3 benchmarks/bench_kernels.py --shapes /tmp/s21.json --only cublas,tc,pc,mma,sm90 \
  --out "$OUT/kernels_tc.md" > /dev/null 2>&1
grep -E "^\| [0-9]" "$OUT/kernels_tc.md" | cut -d'|' -f2,3,4,7,8,9,11
(cd benchmarks && timeout 120 python3 bench_fold_dispatch.py --dispatch-only --m 2 4 8 --env AWQ_PDL_TC=0 \
  > "$OUT/fold_dispatch.md" 2>&1)
grep -E "^\|" "$OUT/fold_dispatch.md"
