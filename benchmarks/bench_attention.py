"""Decode attention on the GPU: awq::decode_attention's kernel against torch's attention.

    python benchmarks/bench_attention.py [--out results.json]

One query token a sequence against a static KV cache of L positions of which the first `valid`
are filled (the mask is a boolean [B, 1, 1, L], as transformers makes it for a StaticCache), for
Llama-2-7B's attention (32 heads, head dim 128) and 13B's (40 heads) with the decode benchmark's
cache (L = 384; valid 129, 256, 384: the first, middle and last step of 256 generated after a
128-token prompt), and a grouped-query one (Llama-3-8B: 32 query heads on 8 KV heads, L = 4096).
Rows: the op (library's split choice; blocks of 8 warps where a block has at most 2 query rows and
the grid fits in one wave), the op with blocks of 4 warps ($AWQ_ATTN_THREADS=128), the kernel
with the split forced to 1, 2, 4, 8 blocks a (batch, KV head) ($AWQ_ATTN_SPLITS), torch's
scaled_dot_product_attention as dispatched (what the bf16 graph runs), with each backend that
takes a mask forced (cuDNN, memory-efficient), and flash attention over the filled prefix without
a mask (a bound: it needs to know the length). Graph-timed
(20 calls a graph, caches rotated so that none is found in the L2), us, median of 20 replays,
bf16. The floor: the filled positions' K and V bytes over the copy bandwidth measured here. Every
variant is first checked against a float64 reference (relative Frobenius error).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from awq_compile import _cuda  # noqa: E402  (registers the CUDA kernels)
from conftest import attention_reference  # noqa: E402
from profile_decode import graph_us  # noqa: E402

CASES = [  # name, B, Hq, Hkv, L, valid lengths
    ("7B", 1, 32, 32, 384, (129, 256, 384)),
    ("7B", 8, 32, 32, 384, (129, 256, 384)),
    ("7B", 1, 32, 32, 2048, (1024,)),
    ("7B", 8, 32, 32, 2048, (1024,)),
    ("13B", 1, 40, 40, 384, (256,)),
    ("13B", 8, 40, 40, 384, (256,)),
    ("GQA 32/8", 1, 32, 8, 4096, (1024, 4096)),
    ("GQA 32/8", 8, 32, 8, 4096, (1024,)),
]
D = 128


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us(lambda: b.copy_(a), calls=5)
    return 2 * a.numel() / (us * 1e-6)


def _env_op(splits: str, threads: str = ""):
    """The op with $AWQ_ATTN_SPLITS and $AWQ_ATTN_THREADS set for the call ("": unset)."""
    def run(q, k, v, mask):
        for name, value in (("AWQ_ATTN_SPLITS", splits), ("AWQ_ATTN_THREADS", threads)):
            if value:
                os.environ[name] = value
            else:
                os.environ.pop(name, None)
        return torch.ops.awq.decode_attention(q, k, v, mask, None, k.shape[1] != q.shape[1])
    return run


def _sdpa(backend):
    def run(q, k, v, mask):
        gqa = k.shape[1] != q.shape[1]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return run


def _flash_prefix(valid: int):
    def run(q, k, v, mask):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k[:, :, :valid], v[:, :, :valid],
                                                  enable_gqa=k.shape[1] != q.shape[1])
    return run


VARIANTS = [("op", _env_op("")), ("op, 4 warps", _env_op("", "128")),
            *[(f"op, split {s}", _env_op(str(s))) for s in (1, 2, 4, 8)],
            ("torch sdpa", _sdpa(None)), ("sdpa cuDNN", _sdpa(SDPBackend.CUDNN_ATTENTION)),
            ("sdpa mem-efficient", _sdpa(SDPBackend.EFFICIENT_ATTENTION))]


def bench_case(name, b, hq, hkv, length, valid, bw) -> dict:
    copies = max(2, math.ceil((200 << 20) / (2 * b * hkv * length * D * 2)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    caches = [(torch.randn(b, hkv, length, D, device="cuda", generator=gen).to(torch.bfloat16),
               torch.randn(b, hkv, length, D, device="cuda", generator=gen).to(torch.bfloat16))
              for _ in range(copies)]
    q = torch.randn(b, hq, 1, D, device="cuda", generator=gen).to(torch.bfloat16)
    mask = (torch.arange(length, device="cuda") < valid).expand(b, 1, 1, length)
    want = attention_reference(q, *caches[0], mask, D ** -0.5)
    row = {"case": name, "B": b, "Hq": hq, "Hkv": hkv, "L": length, "valid": valid,
           "floor_us": 2 * b * hkv * valid * D * 2 / bw * 1e6, "us": {}, "rel_err": {}}
    for label, fn in [*VARIANTS, ("flash, filled prefix, no mask", _flash_prefix(valid))]:
        try:
            got = fn(q, *caches[0], mask)
            row["rel_err"][label] = ((got.double() - want).norm() / want.norm()).item()
            it = itertools.cycle(caches)
            row["us"][label] = graph_us(lambda: fn(q, *next(it), mask))
        except RuntimeError as e:  # a backend that refuses these sizes
            row["us"][label] = None
            row["rel_err"][label] = str(e).splitlines()[0][:80]
    os.environ.pop("AWQ_ATTN_SPLITS", None)
    os.environ.pop("AWQ_ATTN_THREADS", None)
    return row


def table(card: str, bw: float, rows: list[dict]) -> str:
    labels = list(rows[0]["us"])
    out = [f"{card}; copy bandwidth {bw / 1e12:.2f} TB/s; bf16, one query token, head dim {D}; graph-timed us.", "",
           "| case | B | L | filled | floor | " + " | ".join(labels) + " |",
           "|---|---|---|---|---|" + "---|" * len(labels)]
    for r in rows:
        cells = ["-" if r["us"][lb] is None else f"{r['us'][lb]:.1f}" for lb in labels]
        out.append(f"| {r['case']} | {r['B']} | {r['L']} | {r['valid']} | {r['floor_us']:.1f} | " + " | ".join(cells)
                   + " |")
    worst = max((e for r in rows for lb, e in r["rel_err"].items() if lb.startswith("op") and isinstance(e, float)))
    out += ["", f"largest relative error of the op's rows against float64: {worst:.2e}"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="7B at batch 1 and 8 only, the op against torch")
    args = ap.parse_args()
    if not _cuda.available():
        raise SystemExit("bench_attention: needs a CUDA GPU and the built library")
    card, bw = torch.cuda.get_device_name(), copy_bandwidth()
    cases = [c for c in CASES if c[0] == "7B" and c[4] == 384] if args.quick else CASES
    if args.quick:
        VARIANTS[:] = [v for v in VARIANTS if v[0] in ("op", "op, 4 warps", "torch sdpa")]
    rows = [bench_case(n, b, hq, hkv, length, v, bw) for n, b, hq, hkv, length, vs in cases for v in vs]
    print(table(card, bw, rows))
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"card": card, "copy_bw": bw, "rows": rows}, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
