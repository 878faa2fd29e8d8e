"""The host cost of one eager call of awq::int4_linear (what an eager transformers user pays a
linear, beside the kernel): a loop of calls with one synchronize at the end, so the time a call is
the host's wherever the host is slower than the kernel.

    python benchmarks/bench_op_host.py [--profile]

At M = 1 and 8 on a 4096x4096 weight (bf16, group size 128): the op through the dispatcher
(`torch.ops.awq.int4_linear`), the CUDA implementation called directly (`_cuda.int4_linear_cuda`,
no dispatcher), an `Int4Linear` module's eager forward (which calls it directly where nothing
traces), nn.Linear on the bf16 weight for comparison, and the kernel alone under a CUDA graph.
`--profile`: cProfile's top entries for the op at M = 1.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from awq_compile import _cuda, ops  # noqa: F401  (registers the ops)
from awq_compile.nn import Int4Linear
from awq_compile.quant import dequantize, quantize
from profile_decode import graph_us


def per_call_us(fn, n: int = 3000) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    k = n = 4096
    q = quantize(torch.randn(n, k, device="cuda") * 0.02, 128, scale_dtype=torch.bfloat16)
    w = (q.qweight, q.scales, q.zeros)
    wb = dequantize(*w, 128, k, dtype=torch.bfloat16)
    module = Int4Linear.from_quantized(q, 128).cuda()
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data.copy_(wb)
    print(torch.cuda.get_device_name())
    print("| M | op (dispatcher) | int4_linear_cuda (direct) | Int4Linear module | nn.Linear bf16 | kernel, graph-timed |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            op = lambda: torch.ops.awq.int4_linear(x, *w, 128, None)  # noqa: E731
            direct = lambda: _cuda.int4_linear_cuda(x, *w, 128, None)  # noqa: E731
            y = op()  # checked before anything is timed: the three INT4 paths agree bit for bit
            assert torch.equal(y, direct()) and torch.equal(y, module(x)), f"the paths differ at M={m}"
            ref = x.double() @ dequantize(*w, 128, k, dtype=torch.float64).T
            assert ((y.double() - ref).norm() / ref.norm()).item() < 6e-3, f"relative error at M={m}"
            row = [per_call_us(op), per_call_us(direct), per_call_us(lambda: module(x)), per_call_us(lambda: linear(x)),
                   graph_us(op)]
            print(f"| {m} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)
        if args.profile:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(2000):
                torch.ops.awq.int4_linear(x, *w, 128, None)
            pr.disable()
            torch.cuda.synchronize()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
