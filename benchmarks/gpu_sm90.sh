#!/usr/bin/env bash
# One device call for the CUTLASS prefill GEMM: its tests (and the op's sweep, which now routes
# prefill M through it), then every tile configuration timed against cuBLAS bf16, the mma kernel
# and dequantize + cuBLAS. Logs go to $OUT. Knobs: SKIP_TESTS=1, SWEEP=0 (skip the op's sweep),
# CFGS (configurations, "Ca" = with _cuda.sm90_splits), MS (token counts).
#   run: bash benchmarks/gpu_sm90.sh        carry: awq_compile/_lib
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_sm90_out
python3 -c "import awq_compile._cuda as c, sys; print('lib', c.available()); sys.exit(0 if c.available() else 1)" || exit 1
PYTEST="python3 -m pytest -q -x -p no:cacheprovider"
[ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_S:-200} $PYTEST tests/test_cuda_sm90.py --durations=3 2>&1 | tee "$OUT/test_sm90.log" | tail -15
if [ -z "${SKIP_TESTS:-}" ] && [ "${SWEEP:-1}" = 1 ]; then
  timeout 200 $PYTEST tests/test_cuda_kernels.py -k "gemm_sweep or opcheck or group_sizes or poisoned or errors" 2>&1 \
    | tee "$OUT/test_kernels.log" | tail -4
fi
MS=${MS:-12,16,32,64,128,256,512,1024,2048}
echo "{\"shapes\": [[8192, 28672], [28672, 8192], [8192, 8192], [4096, 4096], [4096, 11008], [11008, 4096]],
  \"m\": [$MS], \"group_size\": 128}" > /tmp/sm90_shapes.json
CFGS=${CFGS-0,1,2,3,4,5,6,7,8,0a,1a,2a,3a,4a,6a,7a,8a}  # set CFGS= (empty) to time the dispatch only
ONLY=${ONLY:-cublas,mma,deq+cublas,op,sm90,$(echo "$CFGS" | sed 's/\([0-9a]*\)/sm90c\1/g')}
timeout ${BENCH_S:-300} python3 benchmarks/bench_kernels.py --shapes /tmp/sm90_shapes.json --sm90-cfgs "$CFGS" \
  --only $ONLY --out "$OUT/results_sm90.md" > "$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"
grep -E "best CUTLASS" "$OUT/results_sm90.md"
