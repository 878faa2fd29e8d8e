#!/usr/bin/env bash
# One device call: two builds of the kernel library compared on 7B decode (INT4 only, batch 1 and 8,
# the settings) in alternating processes (A B A B ...: drift over the call falls on both),
# then the decode attention graph-timed with each (bench_attention.py --quick). For a kernel change
# whose switch-off path is not the old kernel (csrc/NOTES.md, session 21: the attention's early
# first round), so that an env ablation in one library cannot answer "is it better than main".
#   python -m awq_compile.build_kernels --arch 90a --out awq_compile/_lib_b/libawq_int4.so  # on the branch
#   bash benchmarks/gpu_lib_ab.sh awq_compile/_lib/libawq_int4.so awq_compile/_lib_b/libawq_int4.so [ROUNDS]
#   carry: awq_compile/_lib, awq_compile/_lib_b
# TESTS=SECONDS first runs every CUDA test on library B (the merge condition) within that time;
# ATTENTION=0 skips the attention timing; BATCH="12 16" times other batch sizes (default "1 8").
set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_lib_ab_out
A=$1 B=$2 ROUNDS=${3:-2}
for lib in "$A" "$B"; do
  [ -f "$lib" ] || { echo "gpu_lib_ab: no library at $lib"; exit 2; }
done
if [ -n "${TESTS:-}" ]; then
  echo "CUDA tests on library B ($B):"
  AWQ_COMPILE_CUDA_LIB=$B cuda_tests "$TESTS"
fi
for i in $(seq "$ROUNDS"); do
  for tag in A B; do
    lib=$A; [ "$tag" = B ] && lib=$B
    AWQ_COMPILE_CUDA_LIB=$lib timeout 240 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch ${BATCH:-1 8} \
      --models int4 --out "$OUT/e2e_${tag}_$i.json" > "$OUT/e2e_${tag}_$i.log" 2>&1
    echo "round $i, library $tag ($lib):"
    grep -o "'batch': [0-9]*, 'ttft_ms': [0-9.]*, 'decode_tok_s': [0-9.]*" "$OUT/e2e_${tag}_$i.log"
  done
done
[ "${ATTENTION:-1}" = 0 ] && exit 0
for tag in A B; do
  lib=$A; [ "$tag" = B ] && lib=$B
  echo "library $tag ($lib):"
  AWQ_COMPILE_CUDA_LIB=$lib timeout 90 python3 benchmarks/bench_attention.py --quick 2>&1 | grep -E "^\|"
done
