set -u -o pipefail
source benchmarks/device_env.sh /tmp/awq_m1_out
AWQ_ROPE_FOLD_M1=1 timeout 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_fuse_rope_cache.py 2>&1 | tail -1
for v in 0 1 0 1; do
  AWQ_ROPE_FOLD_M1=$v timeout 100 python3 benchmarks/bench_e2e_gpu.py decode --shape 7b --batch 1 --models int4 \
    --out "$OUT/e2e_m1_$v.json" 2>&1 | grep -E "^\{|Error|error" | sed "s/^/M1=$v /"
done
