"""Where a decode step's GPU time goes, and the kernels' times without Python in the way.

    python benchmarks/profile_decode.py [--layers 32]

1. Kernel times under CUDA graphs (a graph of 20 back-to-back calls, replayed; per call = replay
   time / 20), so the launch path (custom op, ctypes) costs nothing, as in a compiled decode
   step: each decode kernel and cuBLAS bf16 at the Llama-2-7B shapes, M = 1 and 8, cycling
   through enough weight copies that none is found in the L2; then q/k/v and gate/up as one
   multi-weight launch against one call each.
2. A torch.profiler trace of eager decode steps of the INT4 Llama-2-7B-shaped model (random
   weights, round to nearest): GPU time per kernel name, per step.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from awq_compile import _cuda
from awq_compile.quant import dequantize, quantize

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016)]


def graph_us(fn, calls: int = 20, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _weight(k, n):
    w = torch.randn(n, k, device="cuda") * 0.02
    qq = quantize(w, 128, scale_dtype=torch.bfloat16)
    return qq.qweight, qq.scales, qq.zeros


def _copies(k, n) -> int:
    """Weight copies a graph cycles through so that no call finds its weight in the L2 (50 MB on
    an H100), as in a decode step where the whole model streams by between two uses."""
    return max(2, -(-(160 << 20) // (n * k // 2)))


def kernel_table() -> None:
    pc = torch.cuda.get_device_capability()[0] >= 9
    print("| K x N | M | simt | tc | pc | mma | op | cuBLAS bf16 | floor us (int4 bytes / 3.0 TB/s H100) |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for k, n in SHAPES:
        ws = itertools.cycle([_weight(k, n) for _ in range(_copies(k, n))])
        wbs = itertools.cycle([dequantize(*_weight(k, n), 128, k, dtype=torch.bfloat16)
                               for _ in range(max(2, _copies(k, n) // 4))])
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            r = {"cublas": graph_us(lambda: F.linear(x, next(wbs))),
                 "op": graph_us(lambda: torch.ops.awq.int4_linear(x, *next(ws), 128, None)),
                 "mma": graph_us(lambda: _cuda.gemm_mma(x, *next(ws), 128, None, out)),
                 "simt": graph_us(lambda: _cuda.gemm_simt(x, *next(ws), 128, None, out)),
                 "tc": graph_us(lambda: _cuda.gemm_tc(x, *next(ws), 128, None, out))}
            r["pc"] = graph_us(lambda: _cuda.gemm_pc(x, *([t] for t in next(ws)), 128, [None], [out])) if pc else nan
            floor = (n * k / 2 + n * k / 128 * 3) / 3.0e12 * 1e6
            print(f"| {k}x{n} | {m} | {r['simt']:.1f} | {r['tc']:.1f} | {r['pc']:.1f} | {r['mma']:.1f} | "
                  f"{r['op']:.1f} | {r['cublas']:.1f} | {floor:.1f} |", flush=True)
    if not pc:
        return
    print("\nSiblings that read one x (Llama-2-7B q/k/v and gate/up): one op call each vs one launch "
          "of a multi-weight kernel, and the int4_linear_multi op (its dispatch), us")
    print("| weights | M | op per weight, summed | pc multi | simt multi | int4_linear_multi | floor us |")
    print("|---|---|---|---|---|---|---|")
    for k, ns, name in ((4096, (4096,) * 3, "q, k, v 4096x4096"), (4096, (11008,) * 2, "gate, up 4096x11008")):
        sets = itertools.cycle([[_weight(k, n) for n in ns] for _ in range(max(2, _copies(k, sum(ns))))])
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            sep = graph_us(lambda: [torch.ops.awq.int4_linear(x, *w, 128, None) for w in next(sets)])
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for n in ns]

            def multi(gemm):
                ws = next(sets)
                gemm(x, [w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws], 128, [None] * len(ws), outs)
            pc_us = graph_us(lambda: multi(_cuda.gemm_pc))
            simt_us = graph_us(lambda: multi(_cuda.gemm_simt_multi)) if m <= 1 else nan
            op_us = graph_us(lambda: torch.ops.awq.int4_linear_multi(
                x, *([w[i] for w in next(sets)] for i in range(3)), 128, [None] * len(ns)))
            floor = sum(n * k / 2 + n * k / 128 * 3 for n in ns) / 3.0e12 * 1e6
            print(f"| {name} | {m} | {sep:.1f} | {pc_us:.1f} | {simt_us:.1f} | {op_us:.1f} | {floor:.1f} |", flush=True)


def profile_decode(layers: int, steps: int = 8) -> None:
    import awq_compile
    from transformers import StaticCache

    from bench_e2e_gpu import llama_config, random_model

    cfg = llama_config(layers)
    q = awq_compile.quantize_rtn(random_model(cfg, "cuda"),
                                 awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"))
    for batch in (1, 8):
        cache = StaticCache(config=cfg, max_cache_len=256)
        ids = torch.randint(0, cfg.vocab_size, (batch, 16), device="cuda")
        with torch.no_grad():
            q(ids, past_key_values=cache, cache_position=torch.arange(16, device="cuda"), use_cache=True)
            tok = ids[:, -1:]
            for i in range(2):
                q(tok, past_key_values=cache, cache_position=torch.tensor([16 + i], device="cuda"), use_cache=True)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for i in range(steps):
                    q(tok, past_key_values=cache, cache_position=torch.tensor([18 + i], device="cuda"),
                      use_cache=True)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events) / steps
        print(f"\nbatch {batch}: GPU time per decode step {total / 1e3:.2f} ms ({layers} layers); top kernels:")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
            print(f"  {e.device_time_total / steps / 1e3:7.3f} ms  {e.count // steps:5d}x  {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="0: the kernel table only")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    kernel_table()
    if args.layers:
        profile_decode(args.layers)


if __name__ == "__main__":
    main()
