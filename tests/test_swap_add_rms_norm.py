"""awq::add_rms_norm and the pass swap_add_rms_norm: the op against float64 (delta as a tensor or
as K-slice partials) and opcheck on the CPU; which graphs the pass rewrites, bit for bit against
the module; the backend's option norm_op on a tiny Llama (CPU, the pass forced); on CUDA, the
kernel against float64 and torch's ops, in a CUDA graph after a producer, and the backend's decode
with it against without."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.utils import counters

from passes import fuse_add_rms_norm, swap_add_rms_norm
from awq_compile.ops import add_rms_norm
from conftest import assert_graph_replays, decode_option_ab, rel_err as _rel, static_cache_decode
from test_fuse_add_rms_norm import (EPS, GLU_NORM, K, _Block, _block_args, _llama, _norm64, _norm_inputs,
                                    _PartialsBlock, _weight_as_constant)

NORM = torch.ops.awq.add_rms_norm.default


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("form", ["t", "p", "pb"])
def test_op_matches_float64(dtype, form):
    residual, delta, bias, weight = _norm_inputs((3, 2, K), dtype, form)
    h, x = NORM(residual, delta, bias, weight, EPS)
    h64, x64 = _norm64(residual, delta, bias, weight)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert h.dtype == x.dtype == dtype and _rel(h, h64) < tol and _rel(x, x64) < 2 * tol
    want_h, want_x = add_rms_norm(residual, delta, bias, weight, EPS)
    assert torch.equal(h, want_h) and torch.equal(x, want_x)


def test_opcheck_and_errors():
    residual, delta, bias, weight = _norm_inputs((2, 1, K), torch.bfloat16, "pb")
    torch.library.opcheck(NORM, (residual, delta, bias, weight, EPS))
    with pytest.raises(ValueError, match="add_rms_norm: norm_weight"):
        NORM(residual, delta, bias, weight[:-1], EPS)


# ----------------------------------------------------------------------------- the pass


def _run(module, args, applies=lambda x: True, first_fuse=False, prepare=None):
    """Compile `module` (test_fuse_add_rms_norm's _Block: h = residual + delta, LlamaRMSNorm, the
    gated MLP, h read after it) with a backend that runs swap_add_rms_norm on dynamo's graph, after
    fuse_add_rms_norm where `first_fuse`; returns (outputs, the number swapped, the graphs)."""
    swapped, graphs = [], []

    def backend(gm, example_inputs):
        if prepare is not None:
            prepare(gm, example_inputs)
        if first_fuse:
            fuse_add_rms_norm(gm, lambda *a: True)
        swapped.append(swap_add_rms_norm(gm, applies))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(*args)
    return out, sum(swapped), graphs


def _targets(graphs):
    return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("leak,early,mutate", [("", False, False), ("x", False, False), ("", True, False),
                                               ("", False, True)], ids=["plain", "x-read", "h-read-after",
                                                                        "delta-written-after"])
def test_pass_swaps_bit_for_bit(leak, early, mutate):
    """One call in place of the add and the norm; a second reader of x, a reader of h after the
    norm, an in-place write of delta after it: still one call (it stands where x stood), and the
    graph computes what the module does, bit for bit."""
    module = _Block(leak, early, mutate)
    want = module(*_block_args())
    got, swapped, graphs = _run(module, _block_args())
    targets = _targets(graphs)
    assert swapped == 1 and targets.count(NORM) == 1 and torch.rsqrt not in targets
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pass_reads_a_constant_norm_weight():
    """The norm weight as a get_attr without an example value, as the serving rewrite leaves a
    folded one: swapped, bit for bit."""
    module = _Block()
    want = module(*_block_args())
    got, swapped, graphs = _run(module, _block_args(), prepare=_weight_as_constant)
    call = next(n for n in graphs[0].graph.nodes if n.target is NORM)
    assert swapped == 1 and call.args[3].op == "get_attr" and torch.equal(got, want)


def test_pass_leaves_what_it_cannot_take():
    """A second reader of an intermediate (hf), applies False, the default on the CPU, and the
    norms fuse_add_rms_norm took first: nothing swapped, the module's result."""
    module = _Block("hf")
    want = module(*_block_args())
    got, swapped, _ = _run(module, _block_args())
    assert swapped == 0 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert _run(_Block(), _block_args(), lambda x: False)[1] == 0
    assert _run(_Block(), _block_args(), None)[1] == 0
    got, swapped, graphs = _run(_Block(), _block_args(), first_fuse=True)
    assert swapped == 0 and GLU_NORM in _targets(graphs)


def test_pass_takes_the_partials():
    """delta as defer_split_k leaves it: the partials and the bias go into the call."""
    module = _PartialsBlock(torch.bfloat16)
    args = [t.bfloat16() for t in _block_args()]
    want = module(*args)
    got, swapped, graphs = _run(module, [a.clone() for a in args])
    call = next(n for n in graphs[0].graph.nodes if n.target is NORM)
    assert swapped == 1 and torch.equal(got, want)
    assert call.args[1].target is torch.ops.awq.int4_linear_partials.default and call.args[2] is not None


def test_applies_only_where_the_kernel_takes_the_norm(monkeypatch):
    """The pass's default rule (`_cuda.add_rms_norm_applies`), on fake CUDA tensors with a library
    stand-in: fp16 / bf16, K % 8 == 0, K <= the library's max; never without the library or off
    a GPU (elsewhere the op would run torch's ops, slower than inductor's kernel)."""
    from torch._subclasses import FakeTensorMode

    from awq_compile import _cuda

    monkeypatch.setattr(_cuda, "load_library", lambda: object())
    monkeypatch.setattr(_cuda, "_add_rms_norm_max_k", lambda: 8192)
    with FakeTensorMode():
        def x(k, dtype=torch.bfloat16, device="cuda"):
            return torch.empty(8, 1, k, dtype=dtype, device=device)

        cases = {"bf16": x(4096), "fp16": x(8192, torch.float16), "fp32": x(4096, torch.float32),
                 "k % 8": x(4100), "k > max": x(8200), "cpu": x(4096, device="cpu")}
        rule = importlib.import_module("awq_compile.passes.swap_add_rms_norm")._on_cuda
        got = {name: rule(t) for name, t in cases.items()}
    assert got == {"bf16": True, "fp16": True, "fp32": False, "k % 8": False, "k > max": False, "cpu": False}
    monkeypatch.setattr(_cuda, "load_library", lambda: None)
    with FakeTensorMode():
        assert not _cuda.add_rms_norm_applies(torch.empty(8, 4096, dtype=torch.bfloat16, device="cuda"))


def test_backend_swaps_what_fuse_norm_leaves(monkeypatch):
    """A 3-layer bf16 Llama served eagerly with option norm_op off, then on (the default), then
    with fuse_norm off, the passes forced (their defaults ask for CUDA): the norm fusion takes
    2L - 1 = 5 norms a graph and this pass the final one, or this pass all 2L = 6 that follow a
    residual add; the logits and caches are bit for bit those without it."""
    monkeypatch.setattr(importlib.import_module("awq_compile.passes.fuse_add_rms_norm"), "_library_applies",
                        lambda *a: True)
    monkeypatch.setattr(importlib.import_module("awq_compile.passes.swap_add_rms_norm"), "_on_cuda", lambda x: True)
    model, cfg = _llama()
    runs = []
    for options in ({"norm_op": False}, {}, {"fuse_norm": False}):
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model, backend="awq", fullgraph=True, options={"inductor": False, **options})
        logits, cache = static_cache_decode(model, cfg, step)
        runs.append((logits, cache, counters["awq"]["norm_ops"], counters["awq"]["norms_fused"],
                     counters["awq"]["serve_graphs"]))
    (want, want_cache, off, fused_off, graphs), (_, _, on, fused_on, _), (_, _, alone, fused_none, _) = runs
    assert off == 0 and on == graphs >= 1 and fused_off == fused_on == 5 * graphs
    assert alone == 6 * graphs and fused_none == 0
    for got, got_cache, *_ in runs[1:]:
        assert torch.equal(got, want)
        assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(got_cache.layers, want_cache.layers))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("form", ["t", "pb"])
@pytest.mark.parametrize("m,k", [(1, 4096), (8, 4096), (24, 576), (8, 5120), (3, 8192), (2, 8200)])
def test_cuda_kernel(m, k, form, dtype, cuda_library):
    """The kernel (K <= 8192; 8200 takes torch's ops): h bit for bit torch's, x against float64
    and within about an ulp of torch's (the sum of squares is added in another order);
    reproducible bit for bit."""
    residual, delta, bias, weight = (None if t is None else t.cuda()
                                     for t in _norm_inputs((m, k), dtype, form, seed=m))
    h, x = NORM(residual, delta, bias, weight, EPS)
    want_h, want_x = add_rms_norm(residual, delta, bias, weight, EPS)
    h64, x64 = _norm64(residual, delta, bias, weight)
    assert torch.equal(h, want_h)
    assert _rel(x, x64) < 8e-3
    torch.testing.assert_close(x.float(), want_x.float(), rtol=8e-3, atol=8e-3)
    h2, x2 = NORM(residual, delta, bias, weight, EPS)
    assert torch.equal(h, h2) and torch.equal(x, x2)


@pytest.mark.cuda
def test_cuda_in_a_graph_after_a_producer(cuda_library, monkeypatch):
    """int4_linear (M = 1, launched with programmatic dependent launch) then the norm of its
    output, captured in a CUDA graph, the linear's output buffer filled with NaN before each
    replay: each replay equals the chain run eagerly without PDL."""
    from awq_compile.quant import quantize

    torch.manual_seed(0)
    qw = quantize(torch.randn(4096, 4096), 128, scale_dtype=torch.bfloat16)
    w = [t.cuda() for t in (qw.qweight, qw.scales, qw.zeros)]
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    residual = torch.randn(1, 4096, device="cuda").bfloat16()
    gamma = (torch.rand(4096, device="cuda") + 0.5).bfloat16()

    def chain():
        y = torch.ops.awq.int4_linear(x, *w, 128, None)
        return (y, *NORM(residual, y, None, gamma, EPS))

    with monkeypatch.context() as mp:
        mp.setenv("AWQ_PDL", "0")
        ref = [t.clone() for t in chain()]
    monkeypatch.delenv("AWQ_PDL", raising=False)
    assert_graph_replays(chain, ref, "int4_linear -> add_rms_norm")


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_backend_decode(batch, cuda_library, cuda_llama_decode):
    """A 2-layer Llama of 7B's widths, bf16, CUDA graphs, option norm_op off, then on: the norms
    the fused projections leave (batch 1: the final one; batch 8: all 2L = 4 that follow a
    residual add) are the op's, and logits and caches agree with the unswapped decode."""
    cfg, run = cuda_llama_decode
    off, on, err = decode_option_ab(run, batch, "norm_op", "norm_ops")
    assert off == 0 and on == (1 if batch == 1 else 2 * cfg.num_hidden_layers)
    assert err < 2e-2
