"""Where a decode step's GPU time goes, and the kernels' times without Python in the way.

    python benchmarks/profile_decode.py [--layers 32]

1. Kernel times under CUDA graphs (a graph of 20 back-to-back calls, replayed; per call = replay
   time / 20), so the launch path (custom op, ctypes) costs nothing, as in a compiled decode
   step: each decode kernel and cuBLAS bf16 at the Llama-2-7B shapes, M = 1 and 8.
2. A torch.profiler trace of eager decode steps of the INT4 Llama-2-7B-shaped model (random
   weights, round to nearest): GPU time per kernel name, per step.
"""

from __future__ import annotations

import argparse

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


def kernel_table() -> None:
    print("| K x N | M | simt | tc | mma | op | cuBLAS bf16 | floor us (int4 bytes / 3.0 TB/s H100) |")
    print("|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        qq = quantize(w, 128, scale_dtype=torch.bfloat16)
        qw, s, z = qq.qweight, qq.scales, qq.zeros
        wb = dequantize(qw, s, z, 128, k, dtype=torch.bfloat16)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            r = {"cublas": graph_us(lambda: F.linear(x, wb)),
                 "op": graph_us(lambda: torch.ops.awq.int4_linear(x, qw, s, z, 128, None)),
                 "mma": graph_us(lambda: _cuda.gemm_mma(x, qw, s, z, 128, None, out))}
            r["simt"] = graph_us(lambda: _cuda.gemm_simt(x, qw, s, z, 128, None, out))
            r["tc"] = graph_us(lambda: _cuda.gemm_tc(x, qw, s, z, 128, None, out))
            floor = (n * k / 2 + n * k / 128 * 3) / 3.0e12 * 1e6
            print(f"| {k}x{n} | {m} | {r['simt']:.1f} | {r['tc']:.1f} | {r['mma']:.1f} | {r['op']:.1f} | "
                  f"{r['cublas']:.1f} | {floor:.1f} |", flush=True)


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
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    kernel_table()
    profile_decode(args.layers)


if __name__ == "__main__":
    main()
