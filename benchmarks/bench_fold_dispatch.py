"""The decode kernels' dispatch with and without the folded tensor-core GEMV, under CUDA graphs.

    python benchmarks/bench_fold_dispatch.py [--m 1 2 4 8] [--env NAME=VALUE ...] [--cfgs 0 1 ...] [--shapes KxN ...]
        [--fold-env NAME=VALUE ...] [--dispatch-only]

For 7B's q/k/v (3 x 4096x4096, one multi-weight call), o (4096x4096), gate/up (2 x 4096x11008),
down (11008x4096), and 8192x8192, 8192x28672, 28672x8192, at each M: the op's dispatch with the
folded kernel switched off (`AWQ_FOLD=0`: the CUDA-core GEMV at M = 1, the producer/consumer
kernel for several weights, tc / mma for one), the folded kernel alone in its default block
configuration (<16 warps, 3 stages, 1 block a SM>) and in <8, 3, 2> (`--cfgs`: any of the five
`$AWQ_FOLD_CFG` configurations instead), the op's dispatch as it is
(`_cuda.use_fold`), and cuBLAS bf16 (one F.linear a weight). Graph-timed (20 calls a graph, the
weights rotated so none is found in the L2), us, the median of 3 interleaved rounds; bf16,
group size 128. Every output is checked against float64 first (relative Frobenius error, printed
for the two dispatches). This is the table of benchmarks/RESULTS.md, section 4, session 9.

Since session 14 the decode kernels launch with programmatic dependent launch at M = 1 (sm_90), so
the 20 calls of a graph overlap each other's launch and first loads as a decode step's launches
do; run with AWQ_PDL=0 for each kernel on its own (every table before session 14).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os

import torch

from awq_compile import _cuda
from awq_compile.quant import dequantize
from profile_decode import _copies, _weight, graph_us

# $AWQ_FOLD_CFG's configurations (int4_gemv_fold.cu, FoldCfg): <warps a block, ring stages, blocks a SM>
CFG_NAMES = ("<16,3,1>", "<8,3,2>", "<16,2,1>", "<8,2,2>", "<16,4,1>")
CASES = [(4096, (4096,) * 3), (4096, (4096,)), (4096, (11008,) * 2), (11008, (4096,)), (8192, (8192,)),
         (8192, (28672,)), (28672, (8192,))]


@contextlib.contextmanager
def _env_set(env: str):
    """env: "NAME=VALUE" set for the block (a CUDA graph keeps what its capture read), or ""."""
    name, _, value = env.partition("=")
    if name:
        os.environ[name] = value
    try:
        yield
    finally:
        if name:
            os.environ.pop(name)


def _op(fold: str, env: str = ""):
    """The op's dispatch, with `env` set for the call."""
    def run(x, w, outs):
        os.environ["AWQ_FOLD"] = fold
        os.environ.pop("AWQ_FOLD_CFG", None)
        with _env_set(env):
            if len(w) == 1:
                return [torch.ops.awq.int4_linear(x, *w[0], 128, None)]
            return torch.ops.awq.int4_linear_multi(x, *([t[i] for t in w] for i in range(3)), 128, [None] * len(w))
    return run


def _fold(cfg: str, env: str = ""):
    """The folded kernel alone in configuration cfg, with `env` set for the call."""
    def run(x, w, outs):
        os.environ["AWQ_FOLD_CFG"] = cfg
        with _env_set(env):
            return _cuda.gemm_fold(x, *([t[i] for t in w] for i in range(3)), 128, [None] * len(w), outs)
    return run


def _rel_err(ys, x, w64) -> float:
    return max(((y.double() - x.double() @ w.T).norm() / (x.double() @ w.T).norm()).item() for y, w in zip(ys, w64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="more columns: the dispatch with this environment variable set (the kernels read "
                         "their switches at each launch: $AWQ_PDL, $AWQ_PDL_CLUSTER, $AWQ_SIMT_CFG, $AWQ_FOLD_CFG, ...)")
    ap.add_argument("--cfgs", nargs="+", default=["0", "1"], choices=[str(c) for c in range(len(CFG_NAMES))],
                    help="the folded kernel's block configurations ($AWQ_FOLD_CFG) to time alone")
    ap.add_argument("--fold-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="more columns: the folded kernel alone (first --cfgs configuration) with this "
                         "environment variable set, e.g. AWQ_FOLD_KS=3")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="KxN",
                    help="only these cases, named as the table's first column (e.g. 28672x8192)")
    ap.add_argument("--dispatch-only", action="store_true",
                    help="leave out the AWQ_FOLD=0 and forced-configuration columns")
    args = ap.parse_args()
    bf16: dict[int, list[torch.Tensor]] = {}
    folds = [(f"fold {CFG_NAMES[int(c)]}", _fold(c)) for c in args.cfgs]
    variants = [("AWQ_FOLD=0", _op("0")), *folds[:1], ("dispatch", _op("1")), *folds[1:]]
    if args.dispatch_only:
        variants = [("dispatch", _op("1"))]
    variants += [(f"dispatch, {e}", _op("1", e)) for e in args.env]
    variants += [(f"fold {CFG_NAMES[int(args.cfgs[0])]}, {e}", _fold(args.cfgs[0], e)) for e in args.fold_env]
    variants.append(("cuBLAS bf16", lambda x, w, outs: [torch.nn.functional.linear(x, b) for b in bf16[id(w)]]))
    print(torch.cuda.get_device_name())
    print("| weights | M | " + " | ".join(v[0] for v in variants) + " | error AWQ_FOLD=0 / dispatch |")
    print("|---" * (len(variants) + 3) + "|")
    cases = [(k, ns) for k, ns in CASES if args.shapes is None or " + ".join(f"{k}x{n}" for n in ns) in args.shapes]
    if not cases:
        ap.error(f"--shapes: none of {args.shapes} is a case")
    for k, ns in cases:
        sets = [[_weight(k, n) for n in ns] for _ in range(_copies(k, sum(ns)))]
        w64 = [dequantize(*t, 128, k, dtype=torch.float64) for t in sets[0]]
        bf16.clear()
        bf16.update({id(s): [dequantize(*t, 128, k, dtype=torch.bfloat16) for t in s] for s in sets})
        cycle = itertools.cycle(sets)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for n in ns]
            errs = {}
            for name, fn in variants[:-1]:
                errs[name] = _rel_err(fn(x, sets[0], [torch.full_like(o, float("nan")) for o in outs]), x, w64)
                assert errs[name] < 6e-3, f"{name}: relative error {errs[name]:.2e} at M={m}, {k}x{ns}"
            times = {name: [] for name, _ in variants}
            for _ in range(3):
                for name, fn in variants:
                    times[name].append(graph_us(lambda: fn(x, next(cycle), outs)))
            cells = " | ".join(f"{sorted(t)[1]:.1f}" for t in times.values())
            print(f"| {' + '.join(f'{k}x{n}' for n in ns)} | {m} | {cells} | "
                  f"{errs.get('AWQ_FOLD=0', float('nan')):.1e} / {errs['dispatch']:.1e} |", flush=True)
        del sets, w64
        bf16.clear()
        torch.cuda.empty_cache()
    os.environ.pop("AWQ_FOLD", None)


if __name__ == "__main__":
    main()
