"""Time awq::int4_linear's CUDA kernels against cuBLAS bf16 and torch's tinygemm int4.

    python benchmarks/bench_kernels.py [--shapes benchmarks/kernel_shapes.json] [--out results.md]

Each variant is checked against a float32 reference before it is timed. Timing: triton's do_bench
median (it flushes L2 before every run), over rotating copies of the weights. The DRAM floor of
the INT4 op is its packed bytes (qweight + scales + zeros + x + y) over a device-to-device copy
bandwidth measured in the same run (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from awq_compile import _cuda
from awq_compile.quant import dequantize, padded_k

ROT_BYTES = 512 << 20  # rotate weight copies until at least this much is cycled through


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median") * 1e3  # us


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6)


def _weights(k, n, g, copies):
    kp = padded_k(k, g)
    out = []
    for _ in range(copies):
        qw = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, device="cuda")
        z = torch.randint(0, 16, (n, kp // g), dtype=torch.uint8, device="cuda")
        s = (torch.rand(n, kp // g, device="cuda") * 0.02 + 0.002).to(torch.bfloat16)
        out.append((qw, s, z))
    return out


def _tinygemm(qw, s, z, g):
    """tinygemm's packed weight and its [K/g, N, 2] scale/zero tensor (its zero is a float offset:
    w = (q - 8) * s + zf, so zf = (8 - z) * s gives AWQ's (q - z) * s)."""
    # tinygemm wants the even k in the high nibble; NK_U8 keeps it in the low one.
    packed = torch._convert_weight_to_int4pack(((qw << 4) | (qw >> 4)).contiguous(), 8)
    zf = (8 - z.float()) * s.float()
    sz = torch.stack([s.float(), zf], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


class Rot:
    """Cycles through a list of argument sets so consecutive calls touch different memory."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def bench_shape(k, n, g, ms, bw, only=None, check=True, simt_cfgs=(), pc_cfgs=(), sm90_cfgs=()):
    wbytes = n * padded_k(k, g) // 2 + n * (padded_k(k, g) // g) * 3
    copies = max(2, min(8, math.ceil(ROT_BYTES / (n * k * 2))))
    ws = _weights(k, n, g, copies)
    wbf = [dequantize(qw, s, z, g, k, dtype=torch.bfloat16) for qw, s, z in ws]
    try:
        tg = [_tinygemm(qw, s, z, g) for qw, s, z in ws]
    except Exception as e:  # noqa: BLE001  (report, don't die: tinygemm is only a baseline)
        print(f"tinygemm unavailable: {type(e).__name__}: {e}")
        tg = None
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in ms:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = x.float() @ wbf[0].float().T
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        qw0, s0, z0 = ws[0]
        variants = {
            "cublas": (lambda w: F.linear(x, w), wbf),
            "mma": (lambda a: _cuda.gemm_mma(x, *a, g, None, out), ws),
            "deq+cublas": (lambda a: F.linear(x, _cuda.dequantize_cuda(*a, g, k)), ws),
        }
        if m <= 8:
            variants["tc"] = (lambda a: _cuda.gemm_tc(x, *a, g, None, out), ws)
        if m <= 8:
            variants["simt"] = (lambda a: _cuda.gemm_simt(x, *a, g, None, out), ws)
            for c in simt_cfgs:  # the same kernel under $AWQ_SIMT_CFG=c (experiments)
                variants[f"simt{c}"] = (lambda a: _cuda.gemm_simt(x, *a, g, None, out), ws)
        if m <= 8 and torch.cuda.get_device_capability()[0] >= 9:
            pc = (lambda a: _cuda.gemm_pc(x, [a[0]], [a[1]], [a[2]], g, [None], [out])[0], ws)
            variants["pc"] = pc
            for c in pc_cfgs:  # under $AWQ_PC_CFG=c
                variants[f"pc{c}"] = pc
        if m <= _cuda.FOLD_MAX_M and g == 128:
            variants["fold"] = (lambda a: _cuda.gemm_fold(x, [a[0]], [a[1]], [a[2]], g, [None], [out])[0], ws)
        sm90_cfg = _cuda.sm90_config(max(m, _cuda.SM90_MIN_M), n, k, g)  # also below the op's own M range
        if sm90_cfg >= 0:
            variants["sm90"] = (lambda a: _cuda.gemm_sm90(x, *a, g, None, out, sm90_cfg), ws)
            for c in sm90_cfgs:  # "C": configuration C, CUTLASS's own split; "Ca": _cuda.sm90_splits'
                cfg, auto = int(c.rstrip("a")), c.endswith("a")
                if auto and _cuda.sm90_splits(m, n, k, cfg, sms) < 2:
                    continue  # the same launch as "C"
                variants[f"sm90c{c}"] = (lambda a, cfg=cfg, sp=None if auto else 0:
                                         _cuda.gemm_sm90(x, *a, g, None, out, cfg, sp), ws)
        variants["op"] = (lambda a: torch.ops.awq.int4_linear(x, *a, g, None), ws)
        if tg is not None:
            variants["tinygemm"] = (lambda a: torch._weight_int4pack_mm(x, a[0], g, a[1]), tg)
        r = {"M": m}
        for name in list(variants):
            if only and name not in only:
                del variants[name]
                r[name] = float("nan")
        for name, (fn, sets) in variants.items():
            kernel = name.rstrip("0123456789")
            env = {"simt": "AWQ_SIMT_CFG", "pc": "AWQ_PC_CFG"}.get(kernel) if name != kernel else None
            if env is not None:
                os.environ[env] = name[len(kernel):]
            err = _rel(fn(sets[0]), ref)
            r[name + "_err"] = err
            if check and not err < 2e-2:
                r[name] = float("nan")
            else:
                rot = Rot(sets)
                r[name] = _bench(lambda: fn(rot.next()))
            if env is not None:
                os.environ.pop(env, None)
        floor_bytes = wbytes + m * k * 2 + m * n * 2
        r["floor_us"] = floor_bytes / bw * 1e6
        rows.append(r)
    del ws, wbf, tg
    torch.cuda.empty_cache()
    return rows


def _fmt(v, spec=".1f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(card, bw, results) -> str:
    lines = [f"Card: {card}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); group size 128, "
             "bf16; times are do_bench medians in us, L2 flushed.", "",
             "| K x N | M | cuBLAS bf16 | tinygemm | op (dispatch) | pc kernel | tc kernel | mma kernel | "
             "simt kernel | fold kernel | CUTLASS sm90 | deq+cuBLAS | op vs cuBLAS | op vs tinygemm | "
             "% of DRAM floor (floor us) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for (k, n), rows in results.items():
        for r in rows:
            op = r["op"] if not math.isnan(r["op"]) else r["mma"]
            cb, tgm = r["cublas"], r.get("tinygemm", nan)
            lines.append(
                f"| {k}x{n} | {r['M']} | {_fmt(cb)} | {_fmt(tgm)} | {_fmt(op)} | {_fmt(r.get('pc', nan))} | "
                f"{_fmt(r.get('tc', nan))} | {_fmt(r['mma'])} | "
                f"{_fmt(r.get('simt', nan))} | {_fmt(r.get('fold', nan))} | {_fmt(r.get('sm90', nan))} | {_fmt(r['deq+cublas'])} | {_fmt(cb / op, '.2f')}x | "
                f"{_fmt(tgm / op, '.2f')}x | {_fmt(100 * r['floor_us'] / op, '.0f')}% ({r['floor_us']:.1f}) |")
    cfgs = sorted({key for rows in results.values() for r in rows for key in r if not key.endswith("_err") and (
        key.startswith("sm90c") or (key.rstrip("0123456789") in ("simt", "pc") and key[-1].isdigit()))})
    if cfgs:
        lines += ["", "Kernel configurations (simtC: $AWQ_SIMT_CFG=C, pcC: $AWQ_PC_CFG=C, sm90cC: CUTLASS tile "
                  "configuration C; us, % of DRAM floor):", "",
                  "| K x N | M | " + " | ".join(cfgs) + " |", "|---|---|" + "---|" * len(cfgs)]
        for (k, n), rows in results.items():
            for r in rows:
                if any(c in r for c in cfgs):
                    lines.append(f"| {k}x{n} | {r['M']} | " + " | ".join(
                        f"{_fmt(r.get(c, nan))} ({_fmt(100 * r['floor_us'] / r.get(c, nan), '.0f')}%)"
                        for c in cfgs) + " |")
    return "\n".join(lines)


def crossover(results) -> str:
    """Smallest timed M at which dequantize + cuBLAS beats the mma kernel, per shape; and the
    fastest CUTLASS tile configuration per M, against the mma kernel and cuBLAS."""
    out = []
    for (k, n), rows in results.items():
        for r in sorted(rows, key=lambda r: r["M"]):
            cfgs = {key: v for key, v in r.items() if key.startswith("sm90c") and not key.endswith("_err")
                    and not math.isnan(v)}
            if cfgs:
                best = min(cfgs, key=cfgs.get)
                out.append(f"{k}x{n} M={r['M']}: best CUTLASS {best} {cfgs[best]:.1f} us; mma {_fmt(r['mma'])}, "
                           f"cuBLAS {_fmt(r['cublas'])}, deq+cuBLAS {_fmt(r['deq+cublas'])}")
    for (k, n), rows in results.items():
        cross = [r["M"] for r in sorted(rows, key=lambda r: r["M"]) if r["deq+cublas"] < r["mma"]]
        out.append(f"{k}x{n}: deq+cuBLAS first faster at M={cross[0] if cross else 'never'}; "
                   + ", ".join(f"M={r['M']}: mma {r['mma']:.0f} / deq {r['deq+cublas']:.0f}"
                               for r in sorted(rows, key=lambda r: r["M"]) if r["M"] >= 32))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", type=Path, default=Path(__file__).with_name("kernel_shapes.json"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--m", default=None, help="comma list overriding the file's M values")
    p.add_argument("--only", default=None, help="comma list of variants, e.g. mma,cublas")
    p.add_argument("--no-check", action="store_true", help="time even wrong results (experiments)")
    p.add_argument("--simt-cfgs", default="", help="comma list of $AWQ_SIMT_CFG values to time too")
    p.add_argument("--pc-cfgs", default="", help="comma list of $AWQ_PC_CFG values to time too")
    p.add_argument("--sm90-cfgs", default="", help="comma list of CUTLASS tile configurations to time too")
    args = p.parse_args()
    cfg = json.loads(args.shapes.read_text())
    assert _cuda.available(), "CUDA kernels not available: build with python -m awq_compile.build_kernels"
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    ms = sorted(set(cfg["m"]) | set(cfg.get("extra_m", [])))
    if args.m:
        ms = [int(v) for v in args.m.split(",")]
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for k, n in cfg["shapes"]:
        simt_cfgs = [c for c in args.simt_cfgs.split(",") if c]
        pc_cfgs = [c for c in args.pc_cfgs.split(",") if c]
        sm90_cfgs = [c for c in args.sm90_cfgs.split(",") if c]
        results[(k, n)] = bench_shape(k, n, cfg["group_size"], ms, bw, only, not args.no_check, simt_cfgs,
                                      pc_cfgs, sm90_cfgs)
        print(f"timed {k}x{n}", flush=True)
    text = table(card, bw, results) + "\n\nDispatcher crossover (mma vs dequantize + cuBLAS):\n" + crossover(results)
    errs = "\n".join(f"{k}x{n} M={r['M']}: " + ", ".join(f"{key[:-4]} {v:.1e}" for key, v in r.items() if key.endswith("_err"))
                     for (k, n), rows in results.items() for r in rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n\nRelative errors vs float32 reference:\n" + errs + "\n")
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {"card": card, "copy_bw": bw, "results": {f"{k}x{n}": v for (k, n), v in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
