"""End to end on the GPU: decode speed of a Llama-2-7B-shaped model, and AWQ quantization at scale.

    python benchmarks/bench_e2e_gpu.py decode  --batch 1 8 --prompt 128 --new 256
    python benchmarks/bench_e2e_gpu.py quantize --n-samples 128 [--shape 13b]

decode: random bf16 weights at Llama-2-7B shapes (speed does not depend on their values), static
KV cache, CUDA graphs on both sides (torch.compile mode="reduce-overhead"): bf16 inductor vs the
INT4 model (Int4Linear -> awq::int4_linear CUDA kernels) through backend="awq". Reports decode
tokens/s, time to first token (the prefill of the prompt) and peak GPU memory.

quantize: the same shapes, weights kept on the CPU, `awq_compile.quantize(..., device="cuda")`
streaming them through the GPU (calibration n_samples x 512 random token ids, grid 20, clip
search). Reports wall time and peak GPU memory against the bf16 weight bytes.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import torch


DEV = "cuda"  # --device cpu (with --tiny) smoke-tests this script where there is no GPU


# hidden, intermediate, heads of Llama-2 7B and 13B (both 32000 tokens, untied lm_head)
SHAPES = {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40)}


def llama_config(layers: int | None = None, tiny: bool = False, shape: str = "7b"):
    """Llama-2-7B's (or 13B's) shapes, `layers` of them (default: all), or a tiny stand-in for a
    smoke test."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers or 2,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
    hidden, inter, heads = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or heads,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(cfg, device: str, dtype=torch.bfloat16):
    """A LlamaForCausalLM with random weights, filled where computing is fast (the GPU), then
    moved to `device`."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=DEV).to(dtype)
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            r = torch.randn(p.shape, generator=gen, device=DEV)
            p.copy_(1 + 0.1 * r if p.dim() == 1 else r * p.shape[-1] ** -0.5)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(DEV)  # meta left it empty
    return model.to(device).eval()


@torch.no_grad()
def _decode(model, batch: int, prompt: int, new: int, compile_kwargs: dict | None) -> dict:
    """compile_kwargs None: eager (no torch.compile; the same static cache and loop)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=prompt + new)
    torch._dynamo.utils.counters["awq"].clear()
    step = model if compile_kwargs is None else torch.compile(model, **compile_kwargs)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=DEV)
    positions = torch.arange(prompt, prompt + new, device=DEV)
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)

    def run(ids):
        cache.reset()
        pos = torch.arange(prompt, device=DEV)
        sync()
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        sync()
        t1 = time.perf_counter()
        for i in range(new - 1):
            p = positions[i:i + 1]  # on the device already: no host-to-device copy a step
            tok = step(tok, past_key_values=cache, cache_position=p, use_cache=True).logits.argmax(-1)
            tok = tok.clone()  # the next step's input must not alias a CUDA graph's output
        sync()
        return t1 - t0, time.perf_counter() - t1

    t = time.perf_counter()
    run(ids)  # compile and capture the graphs
    print(f"[e2e] batch {batch}: compiled and captured in {time.perf_counter() - t:.1f} s", file=sys.stderr,
          flush=True)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ttft, dec = run(ids)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    counts = dict(torch._dynamo.utils.counters["awq"])  # what the backend's passes did, all graphs so far
    return {"batch": batch, "ttft_ms": ttft * 1e3, "decode_tok_s": batch * (new - 1) / dec,
            "peak_gib": peak, "awq_counters": counts}


def decode(args, emit) -> None:
    """The decode rows, each passed to `emit` as it is measured."""
    import awq_compile

    from awq_compile.backend import register

    register()  # a bare checkout on the GPU machine has no entry point installed
    cfg = llama_config(args.layers, args.tiny, args.shape)
    model = random_model(cfg, DEV)
    for b in args.batch if args.models in ("both", "bf16") else ():
        r = _decode(model, b, args.prompt, args.new, None if args.eager else {"mode": "reduce-overhead", "fullgraph": True})
        emit({"model": "bf16 eager" if args.eager else "bf16 inductor", **r})
    if args.bf16_attention and args.models in ("both", "bf16"):
        torch._dynamo.reset()
        for b in args.batch:  # the bf16 side with the same attention as the INT4 side
            r = _decode(model, b, args.prompt, args.new, {"backend": _bf16_decode_attention, "fullgraph": True})
            emit({"model": "bf16 inductor + decode_attention", **r})
        torch._dynamo.reset()
    if args.models == "bf16":
        return
    # Decode speed does not depend on the weights' values: round-to-nearest gives the same
    # packed format and kernels as AWQ, in seconds.
    q = awq_compile.quantize_rtn(model, awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"))
    del model
    torch.cuda.empty_cache()
    for b in args.batch:
        r = _decode(q, b, args.prompt, args.new,
                    None if args.eager else {"backend": "awq", "mode": "reduce-overhead", "fullgraph": True})
        emit({"model": "int4 eager" if args.eager else "int4 awq", **r})
    ablations = [("fuse_siblings", b) for b in args.unfused] + [(o, b) for o in args.ablate for b in args.batch]
    for option, b in ablations:  # the INT4 model with one backend option off
        if option == "pdl":  # not a backend option: the kernel library's $AWQ_PDL, read at capture
            r = _with_env(q, b, args, {"AWQ_PDL": "0"})
        elif option.startswith("env:"):  # env:NAME=VALUE[,NAME=VALUE...]: kernel library switches read at capture
            r = _with_env(q, b, args, dict(pair.partition("=")[::2] for pair in option[4:].split(",")))
        else:
            r = _decode(q, b, args.prompt, args.new, {"backend": "awq", "fullgraph": True, "options": {
                "mode": "reduce-overhead", option: False}})
        emit({"model": f"int4 awq, {option}" if option.startswith("env:") else f"int4 awq, {option}=False", **r})


def _bf16_decode_attention(gm, example_inputs):
    """A torch.compile backend: the bf16 graph with awq_compile's decode attention
    (passes.swap_decode_attention), then inductor with CUDA graphs, as mode="reduce-overhead"."""
    from awq_compile import passes
    from torch._inductor.compile_fx import compile_fx

    passes.swap_decode_attention(gm)
    return compile_fx(gm, example_inputs, config_patches=dict(torch._inductor.list_mode_options("reduce-overhead")))


def _with_env(q, batch: int, args, env: dict[str, str]) -> dict:
    """The INT4 decode with the variables of env set while the graphs are captured (dynamo's
    caches are dropped so that they are): "pdl" is {"AWQ_PDL": "0"}, the kernels without
    programmatic dependent launch."""
    import os

    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        torch._dynamo.reset()
        return _decode(q, batch, args.prompt, args.new, {"backend": "awq", "mode": "reduce-overhead",
                                                          "fullgraph": True})
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        torch._dynamo.reset()


def quantize(args, emit) -> None:
    import awq_compile

    cfg = llama_config(args.layers, args.tiny, args.shape)
    model = random_model(cfg, "cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.n_samples, 512),
                        generator=torch.Generator().manual_seed(0))
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    q = awq_compile.quantize(model, ids, awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"),
                             device=DEV, stream=True, progress=True)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else float("nan")
    row = {"shape": args.shape, "layers": cfg.num_hidden_layers, "n_samples": args.n_samples, "seconds": dt,
           "peak_gpu_gib": peak / 2**30, "bf16_weights_gib": weight_bytes / 2**30,
           "peak_over_weights": peak / weight_bytes}
    emit(row)
    del q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "quantize"])
    ap.add_argument("--layers", type=int, default=None, help="default: all of the shape's")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--unfused", type=int, nargs="*", default=[],
                    help="batch sizes to also decode with fuse_siblings=False (ablation)")
    ap.add_argument("--ablate", nargs="*", default=[], metavar="OPTION",
                    help="backend options to turn off one at a time, at each --batch (ablation); "
                         "'pdl': the kernels without programmatic dependent launch ($AWQ_PDL=0); "
                         "'env:NAME=VALUE[,NAME=VALUE...]': kernel library switches set while the graphs are "
                         "captured")
    ap.add_argument("--models", choices=["both", "bf16", "int4"], default="both",
                    help="decode: which side(s) to run (an A/B of two kernel libraries needs bf16 once)")
    ap.add_argument("--bf16-attention", action="store_true",
                    help="decode: also the bf16 model with awq_compile's decode attention (the share of "
                         "the INT4 side's speed-up that attention alone gives)")
    ap.add_argument("--eager", action="store_true",
                    help="both models without torch.compile (the custom ops called one by one, as an eager "
                         "transformers user runs them); no ablations")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny config, to smoke-test the script")
    ap.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                    help="print every thread's Python stack to stderr after SECONDS, and again each "
                         "SECONDS after (where a run that does not finish is)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(card, flush=True)
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, repeat=True)
    rows = []

    def emit(row: dict) -> None:  # printed, and --out rewritten (atomically), as each row comes
        rows.append(row)
        print(row, flush=True)
        if args.out:
            tmp = f"{args.out}.tmp"
            with open(tmp, "w") as f:
                json.dump({"card": card, "rows": rows}, f, indent=1)
            os.replace(tmp, args.out)

    (decode if args.what == "decode" else quantize)(args, emit)


if __name__ == "__main__":
    main()
