"""End to end on the GPU: decode speed of a Llama-2-7B-shaped model, and AWQ quantization at scale.

    python benchmarks/bench_e2e_gpu.py decode  --batch 1 8 --prompt 128 --new 256
    python benchmarks/bench_e2e_gpu.py quantize --layers 32 --n-samples 128

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
import json
import time

import torch


def llama7b_config(layers: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(cfg, device: str, dtype=torch.bfloat16):
    """A LlamaForCausalLM with random weights, built on the GPU (fast) and moved to `device`."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device="cuda"))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * p.shape[1] ** -0.5)
        for name, b in model.named_buffers():  # rotary inv_freq: recompute from the config
            pass
    model.model.rotary_emb.__init__(cfg, device="cuda")
    return model.to(device).eval()


@torch.no_grad()
def _decode(model, batch: int, prompt: int, new: int, compile_kwargs: dict) -> dict:
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_batch_size=batch, max_cache_len=prompt + new,
                        device="cuda", dtype=torch.bfloat16)
    step = torch.compile(model, **compile_kwargs)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")

    def run(ids):
        cache.reset()
        pos = torch.arange(prompt, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for i in range(new - 1):
            p = torch.tensor([prompt + i], device="cuda")
            tok = step(tok, past_key_values=cache, cache_position=p, use_cache=True).logits.argmax(-1)
            tok = tok.clone()
        torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    run(ids)  # compile and capture the graphs
    torch.cuda.reset_peak_memory_stats()
    ttft, dec = run(ids)
    return {"batch": batch, "ttft_ms": ttft * 1e3, "decode_tok_s": batch * (new - 1) / dec,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def decode(args) -> list[dict]:
    import awq_compile

    cfg = llama7b_config(args.layers)
    model = random_model(cfg, "cuda")
    rows = []
    for b in args.batch:
        r = _decode(model, b, args.prompt, args.new, {"mode": "reduce-overhead", "fullgraph": True})
        rows.append({"model": "bf16 inductor", **r})
        print(rows[-1], flush=True)
    # Decode speed does not depend on the weights' values: round-to-nearest gives the same
    # packed format and kernels as AWQ, in seconds.
    q = awq_compile.quantize_rtn(model, awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"))
    del model
    torch.cuda.empty_cache()
    for b in args.batch:
        r = _decode(q, b, args.prompt, args.new,
                    {"backend": "awq", "mode": "reduce-overhead", "fullgraph": True})
        rows.append({"model": "int4 awq", **r})
        print(rows[-1], flush=True)
    return rows


def quantize(args) -> list[dict]:
    import awq_compile

    cfg = llama7b_config(args.layers)
    model = random_model(cfg, "cpu")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.n_samples, 512),
                        generator=torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    q = awq_compile.quantize(model, ids, awq_compile.AWQConfig(group_size=128, compute_dtype="bfloat16"),
                             device="cuda", progress=True)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    row = {"layers": args.layers, "n_samples": args.n_samples, "seconds": dt,
           "peak_gpu_gib": peak / 2**30, "bf16_weights_gib": weight_bytes / 2**30,
           "peak_over_weights": peak / weight_bytes}
    print(row, flush=True)
    del q
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "quantize"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    rows = decode(args) if args.what == "decode" else quantize(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
