#!/usr/bin/env bash
# One device call: reuse the carried libawq_int4.so (or build it there), run the CUDA tests, then
# the kernel benchmark. Logs go to $OUT (the device tool's output folder).
#   run: bash benchmarks/gpu_kernels.sh [pytest args...]   carry: awq_compile/_lib
set -u -o pipefail
OUT=${OUT:-/tmp/awq_kernels_out}
mkdir -p "$OUT"
# pyproject maps awq_compile.passes to ./passes; without an install, a link does the same.
[ -e awq_compile/passes ] || ln -s ../passes awq_compile/passes
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
if ! python3 -c "import awq_compile._cuda as c, sys; sys.exit(0 if c.available() else 1)"; then
  echo "carried library missing or unloadable: building here" | tee "$OUT/build.log"
  python3 -m awq_compile.build_kernels --arch 90a -j 16 2>&1 | tee -a "$OUT/build.log"
fi
timeout 300 python3 -m pytest -q --maxfail=6 --durations=5 -p no:cacheprovider tests/test_cuda_kernels.py "$@" 2>&1 | tee "$OUT/test.log" | tail -25
timeout 240 python3 benchmarks/bench_kernels.py --out "$OUT/results_kernels.md" 2>&1 | tee "$OUT/bench.log" | tail -60
