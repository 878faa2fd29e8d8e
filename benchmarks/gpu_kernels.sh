#!/usr/bin/env bash
# One device call: reuse the carried libawq_int4.so (or build it there), run the CUDA tests (also
# with the sm_80-sized block, which an H100/H200 picks only for M <= 8), time the two block
# configurations, then run the full kernel benchmark. Logs go to $OUT.
#   run: bash benchmarks/gpu_kernels.sh        carry: awq_compile/_lib
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_kernels_out
if ! python3 -c "import awq_compile._cuda as c, sys; sys.exit(0 if c.available() else 1)"; then
  echo "carried library missing or unloadable: building here" | tee "$OUT/build.log"
  python3 -m awq_compile.build_kernels --arch 90a -j 16 2>&1 | tee -a "$OUT/build.log"
fi
PYTEST="python3 -m pytest -q --maxfail=6 -p no:cacheprovider tests/test_cuda_kernels.py"
{ timeout 240 $PYTEST --durations=3
  echo "--- sm_80-sized block (subset)"
  AWQ_GEMV_CFG=small timeout 150 $PYTEST -k "4096 or 576 or 573 or opcheck or group_sizes"
} 2>&1 | tee "$OUT/test.log" | grep -E "passed|failed|error|Error|assert" | head -30
echo '{"shapes": [[8192, 28672], [8192, 8192]], "m": [1, 16, 64, 128], "group_size": 128}' > /tmp/variants.json
for v in "default" "AWQ_GEMV_CFG=small"; do
  env $([ "$v" = default ] || echo "$v") timeout 120 python3 benchmarks/bench_kernels.py --shapes /tmp/variants.json \
    --only mma --out /tmp/variant.md > /tmp/variant.log 2>&1
  echo "== mma variant: $v" | tee -a "$OUT/variants.txt"
  grep -E "^\| [0-9]" /tmp/variant.md | awk -F'|' '{printf "%s M=%s mma=%s us, %s of floor\n",$2,$3,$7,$11}' | tee -a "$OUT/variants.txt"
done
timeout 300 python3 benchmarks/bench_kernels.py --out "$OUT/results_kernels.md" > "$OUT/bench.log" 2>&1
grep -E "^\| [0-9]|first faster" "$OUT/results_kernels.md" | cut -c1-150
