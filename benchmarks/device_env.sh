# Sourced by the gpu_*.sh scripts (one device call each): OUT (default: the script's argument to
# this file) created, awq_compile/passes linked to ./passes (what the pyproject mapping does in an
# install), PYTHONPATH on the checkout, and the card recorded in $OUT/gpu.txt.
OUT=${OUT:-$1}
mkdir -p "$OUT"
[ -e awq_compile/passes ] || ln -s ../passes awq_compile/passes
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"

# decode_ablations SHAPE SECONDS ABLATION...: the decode benchmark at batch 1 and 8 ($BATCH
# to choose others, e.g. BATCH=8) with the ablations in the same process, into $OUT/e2e_SHAPE.json
# (rewritten after each row); its whole output goes to $OUT/e2e_SHAPE.log. Prints the result rows,
# each compile's time, and, if the run is still going 30 s before its limit (--watchdog: every
# thread's stack, innermost frame first, at most 100 frames a thread), each thread's innermost
# frames: the log has the rest.
decode_ablations() {
  local shape=$1 secs=$2
  shift 2
  timeout "$secs" python3 benchmarks/bench_e2e_gpu.py decode --shape "$shape" --batch ${BATCH:-1 8} --ablate "$@" \
    --out "$OUT/e2e_$shape.json" --watchdog $((secs - 30)) > "$OUT/e2e_$shape.log" 2>&1
  grep -E "^\{|^\[e2e\]|Error|error" "$OUT/e2e_$shape.log" | tail -40
  grep -E -A8 "^Thread|^Current thread" "$OUT/e2e_$shape.log" | head -60
}

# cuda_tests SECONDS: every CUDA test into $OUT/t.txt; prints the summary and the failures.
cuda_tests() {
  timeout "$1" python3 -m pytest -q -p no:cacheprovider -m cuda tests > "$OUT/t.txt" 2>&1
  tail -1 "$OUT/t.txt"
  grep -E "^(FAILED|ERROR)" "$OUT/t.txt" | head -20
}
