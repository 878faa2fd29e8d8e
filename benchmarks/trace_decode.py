"""Kernel by kernel: one compiled decode step (CUDA graphs), bf16 inductor and INT4 backend="awq".

    python benchmarks/trace_decode.py [--layers 4] [--batch 1] [--out DIR] [--shape 13b] [--off OPTION ...]

Llama-2-7B (or 13B) shapes with --layers layers (random bf16 weights; INT4 by round to nearest, the same
kernels as AWQ), batch --batch (1), a 128-token prompt, a 384-token static cache. Both models are compiled
with mode="reduce-overhead"; after 6 steps (warm-up, recording), 4 steps run under torch.profiler.
Prints the kernels of the last step in order (start us, duration us, gap to the one before), then
the step's GPU time by kind of kernel. The Chrome traces go to --out (trace_bf16.json,
trace_int4.json). benchmarks/RESULTS.md, section 3 (session 6), has the table this gave.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import torch

from bench_e2e_gpu import llama_config, random_model


def kind(name: str) -> str:
    """A kernel's kind, from its name."""
    for key, label in (("gemv_simt", "INT4 GEMV (CUDA cores)"), ("gemv_tc", "INT4 GEMV (tensor cores)"),
                       ("gemv_pc", "INT4 GEMV (producer/consumer)"), ("gemv_fold", "INT4 GEMV (folded, tensor cores)"),
                       ("simt_finalize", "INT4 split-K sum"), ("rope_cache_kernel", "rotary + KV-cache write (ours)"), ("decode_attention_kernel", "attention (ours)"), ("add_rms_norm_kernel", "add + RMSNorm (ours)"), ("fold_finalize", "INT4 split-K sum"),
                       ("nvjet", "cuBLAS"), ("splitKreduce", "cuBLAS"), ("sdpa", "attention"),
                       ("flash", "attention"), ("rsqrt", "add + RMSNorm"), ("silu", "silu * mul"),
                       ("ArgMax", "argmax"), ("triton", "other Triton (rotary, cache, copies)")):
        if key in name:
            return label
    return "other"


@torch.no_grad()
def trace(model, cfg, tag: str, compile_kwargs: dict, out: str, batch: int = 1) -> None:
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=384)
    step = torch.compile(model, **compile_kwargs)
    ids = torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda")
    model(ids, past_key_values=cache, cache_position=torch.arange(128, device="cuda"), use_cache=True)
    tok = ids[:, -1:]
    pos = torch.arange(128, 384, device="cuda")
    for i in range(6):
        tok = step(tok, past_key_values=cache, cache_position=pos[i:i + 1], use_cache=True).logits.argmax(-1).clone()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(6, 10):
            tok = step(tok, past_key_values=cache, cache_position=pos[i:i + 1], use_cache=True).logits.argmax(-1).clone()
        torch.cuda.synchronize()
    path = os.path.join(out, f"trace_{tag}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        kernels = sorted((e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        print(f"{tag}: the profiler saw no kernels")
        return
    one = kernels[-(len(kernels) // 4):]  # the last of the 4 steps
    print(f"\n## {tag}: {len(one)} kernels a step")
    t0, prev = one[0]["ts"], one[0]["ts"]
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for e in one:
        print(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f} gap {e['ts'] - prev:5.1f}  {e['name'][:100]}")
        prev = e["ts"] + e["dur"]
        entry = by_kind[kind(e["name"])]
        entry[0] += 1
        entry[1] += e["dur"]
    print(f"kernel time {sum(v[1] for v in by_kind.values()):.1f} us, first start to last end {prev - t0:.1f} us")
    for k, (n, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {k:40s} {n:4d} {us:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("--shape", choices=["7b", "13b"], default="7b")
    ap.add_argument("--off", nargs="*", default=[], metavar="OPTION",
                    help="backend options turned off in the INT4 compile (e.g. fuse_norm)")
    args = ap.parse_args()
    import awq_compile
    from awq_compile.backend import register

    register()  # a bare checkout on the GPU machine has no entry point installed
    print(torch.cuda.get_device_name())
    os.makedirs(args.out, exist_ok=True)
    cfg = llama_config(args.layers, shape=args.shape)
    model = random_model(cfg, "cuda")
    trace(model, cfg, "bf16", {"mode": "reduce-overhead", "fullgraph": True}, args.out, args.batch)
    q = awq_compile.quantize_rtn(model, awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"))
    del model
    torch.cuda.empty_cache()
    options = {"mode": "reduce-overhead", **{name: False for name in args.off}}
    trace(q, cfg, "int4", {"backend": "awq", "options": options, "fullgraph": True}, args.out, args.batch)


if __name__ == "__main__":
    main()
