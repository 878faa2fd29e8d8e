"""What a decode layer's launches cost beyond the bytes they stream: three dependent GEMV launches
against the same weights in one launch, under CUDA graphs.

    python benchmarks/bench_launch_cost.py [--m 1 8]

7B's q/k/v (4096 -> 12288, one weight), o (4096 -> 4096) and gate/up (4096 -> 22016, one weight)
all have K = 4096, so the three can also run as one multi-weight launch over the same x. Timed
(graph-timed, us, median of 3 interleaved rounds; the weight sets rotated so that none is found in
the L2; bf16, group size 128):
- `chain`: q/k/v, o, gate/up as three launches in one stream through the op's dispatch, as a
  decode step runs them: each kernel waits for the one before (stream order; with programmatic
  dependent launch at one token, its wait), whatever it reads, so all three read x here;
- `alone`: each of the three launches timed alone, summed;
- `one launch, fold` / `one launch, simt`: all three weights in one launch of the folded GEMV and of
  the CUDA-core GEMV (int4_gemv_fold.cu, int4_gemv_simt.cu);
- `floor`: the int4 bytes (weights, scales, zeros) over 4.25 TB/s, the H200's measured copy.

`chain` minus the better one-launch time is what the two launch boundaries cost: the most a
kernel that ran the three phases in one launch (a persistent kernel a layer) could take off, before
the cost of its own grid-wide waits. csrc/NOTES.md, session 25, has the figures.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from awq_compile import _cuda
from awq_compile.quant import dequantize
from profile_decode import _weight, graph_us

K = 4096
NS = {"q/k/v": 3 * 4096, "o": 4096, "gate/up": 2 * 11008}
COPY_TBS = 4.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    first = [_weight(K, n) for n in NS.values()]
    set_bytes = sum(t.numel() * t.element_size() for w in first for t in w)
    sets = [first] + [[_weight(K, n) for n in NS.values()] for _ in range(max(1, -(-(160 << 20) // set_bytes) - 1))]
    cycle = itertools.cycle(sets)
    op = torch.ops.awq.int4_linear
    print(torch.cuda.get_device_name())
    cols = ["chain", "alone (sum)", "q/k/v alone", "o alone", "gate/up alone", "one launch, fold", "one launch, simt",
            "floor"]
    print("| M | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    w64 = [dequantize(*w, 128, K, dtype=torch.float64) for w in first]
    for m in args.m:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for n in NS.values()]
        refs = [x.double() @ w.T for w in w64]

        def check(name, ys):  # every output against float64 before anything is timed
            for y, ref in zip(ys, refs):
                err = ((y.double() - ref).norm() / ref.norm()).item()
                assert err < 6e-3, f"{name}: relative error {err:.2e} at M={m}"

        def chain():
            return [op(x, *w, 128, None) for w in next(cycle)]

        def alone(i):
            return lambda: op(x, *next(cycle)[i], 128, None)

        def one(kernel, w):
            return kernel(x, *([t[i] for t in w] for i in range(3)), 128, [None] * 3, outs)

        def rotating(kernel):
            return lambda: one(kernel, next(cycle))

        # the CUDA-core GEMV takes 8 tokens at most
        kernels = {"fold": _cuda.gemm_fold, **({"simt": _cuda.gemm_simt_multi} if m <= 8 else {})}
        variants = {"chain": chain, "q/k/v alone": alone(0), "o alone": alone(1), "gate/up alone": alone(2),
                    **{f"one launch, {name}": rotating(kernel) for name, kernel in kernels.items()}}
        check("chain", [op(x, *w, 128, None) for w in first])
        for name, kernel in kernels.items():
            for o in outs:
                o.fill_(float("nan"))
            check(name, one(kernel, first))
        times = {name: [] for name in variants}
        for _ in range(3):
            for name, fn in variants.items():
                times[name].append(graph_us(fn))
        t = {name: sorted(v)[1] for name, v in times.items()}
        t["alone (sum)"] = t["q/k/v alone"] + t["o alone"] + t["gate/up alone"]
        t["floor"] = set_bytes / (COPY_TBS * 1e6)
        print(f"| {m} | " + " | ".join(f"{t[c]:.1f}" if c in t else "-" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
