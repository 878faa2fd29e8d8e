"""Launches one decode kernel on a 7B weight a few times, for Nsight Compute to profile.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section LaunchStats \\
        --section Occupancy --section SchedulerStats --section MemoryWorkloadAnalysis \\
        -k regex:gemv_KERNEL --launch-skip 2 -c 1 python benchmarks/ncu_decode_kernels.py KERNEL WEIGHTS M

KERNEL: fold, tc or simt; WEIGHTS: qkv (3 x 4096x4096), o (4096x4096), gu (2 x 4096x11008) or down
(11008x4096); M: tokens. bf16, group size 128, random INT4 weights. The ncu table of
benchmarks/RESULTS.md, section 4, session 10, came from this driver.
"""

from __future__ import annotations

import sys

import torch

from awq_compile import _cuda
from profile_decode import _weight

SHAPES = {"qkv": (4096, (4096,) * 3), "o": (4096, (4096,)), "gu": (4096, (11008,) * 2), "down": (11008, (4096,))}


def main() -> None:
    kernel, which, m = sys.argv[1], sys.argv[2], int(sys.argv[3])
    k, ns = SHAPES[which]
    w = [_weight(k, n) for n in ns]
    lists = [[t[i] for t in w] for i in range(3)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for n in ns]
    for _ in range(3):
        if kernel == "fold":
            _cuda.gemm_fold(x, *lists, 128, [None] * len(w), outs)
        elif kernel == "tc":
            _cuda.gemm_tc(x, *w[0], 128, None, outs[0])
        else:
            _cuda.gemm_simt_multi(x, *lists, 128, [None] * len(w), outs)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
