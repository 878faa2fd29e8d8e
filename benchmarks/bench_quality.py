"""Quality of AWQ on the real model: WikiText-2 perplexity of float, RTN, AWQ, AWQ + clip.

    python benchmarks/bench_quality.py --group-sizes 64 128 --windows 40 --n-samples 128

Calibration: the shipped WikiText-2 validation text (awq_compile.calib.sample_calibration);
evaluation: the shipped raw test split, first `--windows` windows of 512 tokens. Prints a
markdown table (and writes it to --out); also reports the quantization wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import awq_compile
from awq_compile.calib import calibration_text, evaluation_text, sample_calibration
from awq_compile.evaluate import perplexity
from awq_compile.models import load_smollm2


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq-noclip", "awq"])
    ap.add_argument("--no-float", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=JSON",
                    help="AWQConfig overrides for the AWQ runs, e.g. clip_grid=40 "
                         "clip_separate_bounds=false (values parsed as JSON)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    text = evaluation_text()
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    calib = sample_calibration(tok, calibration_text(), args.n_samples, args.seq_len, seed=0)
    rows = []

    def ppl(m):
        return perplexity(m, tok, text, seq_len=512, max_windows=args.windows, progress=False)

    if not args.no_float:
        rows.append(("float", "-", ppl(model), "-", "-"))
        print(rows[-1], flush=True)
    for g in args.group_sizes:
        for method in args.methods:
            cfg = awq_compile.AWQConfig(**{
                **dict(n_samples=args.n_samples, seq_len=args.seq_len), **overrides,
                "group_size": g, "clip": method == "awq"})
            t0 = time.perf_counter()
            if method == "rtn":
                q = awq_compile.quantize_rtn(model, cfg)
            else:
                q = awq_compile.quantize(model, calib, cfg, progress=False)
            dt = time.perf_counter() - t0
            rows.append((method, g, ppl(q), f"{dt:.0f}", f"{_peak_rss_gib():.1f}"))
            print(rows[-1], flush=True)
            del q
    lines = [
        f"| method | group | perplexity ({args.windows} windows) | quantize s | peak RSS GiB |",
        "|---|---|---|---|---|",
    ] + [f"| {m} | {g} | {p:.2f} | {t} | {r} |" for m, g, p, t, r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"calibration: {args.n_samples} x {args.seq_len} tokens of the WikiText-2 "
                    f"validation text; {torch.get_num_threads()} CPU threads; "
                    f"overrides {overrides}\n\n{table}\n")


if __name__ == "__main__":
    main()
