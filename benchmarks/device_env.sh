# Sourced by the gpu_*.sh scripts (one device call each): OUT (default: the script's argument to
# this file) created, awq_compile/passes linked to ./passes (what the pyproject mapping does in an
# install), PYTHONPATH on the checkout, and the card recorded in $OUT/gpu.txt.
OUT=${OUT:-$1}
mkdir -p "$OUT"
[ -e awq_compile/passes ] || ln -s ../passes awq_compile/passes
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
