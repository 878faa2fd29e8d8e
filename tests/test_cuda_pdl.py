"""Programmatic dependent launch of the decode kernels (csrc/int4_common.cuh: pdl_wait, pdl_trigger).

With it, a kernel of ours may start while the kernel before it is still running and request its
first weights; it must read nothing that kernel writes before `griddepcontrol.wait`. The check: a
7B-layer-like chain of ops, each reading the one before's output, captured in a CUDA graph; before
every replay the chain's intermediate buffers are filled with NaN, so a kernel that read its x
early would put NaN (or stale values) into what follows. Every replay must equal, bit for bit, the
same chain run eagerly with $AWQ_PDL=0 (same kernels, same plans, no overlap).

The library launches with it at one token only (kPdlMaxM in csrc/int4_common.cuh, measured), so
m = 1 is the case that overlaps by default; the chain test also runs with $AWQ_PDL=8, which
launches m = 2..8 with it as well.
Needs a CUDA GPU (sm_90 for the launch attribute to do anything) and the built library.
"""

from __future__ import annotations

import pytest
import torch

from awq_compile import ops  # noqa: F401  (registers the ops)

cuda_mod = pytest.importorskip("awq_compile._cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
]

G = 128
HIDDEN, INTER = 4096, 11008


def _weight(k, n, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    zeros = torch.randint(0, 16, (n, k // G), dtype=torch.uint8, device="cuda", generator=gen)
    # Small scales keep the chain's activations near 1 from one op to the next.
    scales = (torch.rand((n, k // G), device="cuda", generator=gen) * 0.002 + 0.0005).to(torch.bfloat16)
    return qweight, scales, zeros


@pytest.fixture(scope="module")
def weights():
    return {"o": _weight(HIDDEN, HIDDEN, 1), "gate": _weight(HIDDEN, INTER, 2), "up": _weight(HIDDEN, INTER, 3),
            "down": _weight(INTER, HIDDEN, 4)}


def _chain(x, w):
    """o -> gated MLP -> down -> (o's K-slice partials at one token) -> q/k/v-like multi -> o: the
    single-weight, pair, multi and partials launches and their split-K sums, one after another."""
    a = torch.ops.awq
    y1 = a.int4_linear(x, *w["o"], G, None)
    y2 = a.int4_linear_glu(y1, [w["gate"][0], w["up"][0]], [w["gate"][1], w["up"][1]],
                           [w["gate"][2], w["up"][2]], G, [None, None])
    y3 = a.int4_linear(y2, *w["down"], G, None)
    outs = [y1, y2, y3]
    slices = cuda_mod.split_k_slices(x.shape[0], HIDDEN, HIDDEN, HIDDEN, G, x.dtype, x.device.index)
    if slices > 1:
        outs.append(a.int4_linear_partials(y3, *w["o"], G, slices))
        y3 = (outs[-1].sum(0) + y3).to(x.dtype)
        outs.append(y3)
    outs += list(a.int4_linear_multi(y3, [w["o"][0]] * 3, [w["o"][1]] * 3, [w["o"][2]] * 3, G, [None] * 3))
    outs.append(a.int4_linear(outs[-1], *w["o"], G, None))  # the o-like launch again, on an intermediate
    return outs


@pytest.mark.parametrize("pdl,clusters,tc", [("", "", ""), ("8", "", ""), ("8", "8", ""), ("", "0", ""), ("", "", "0")],
                         ids=["default", "pdl_to_m8", "pdl_to_m8_and_clusters", "no_clusters", "no_tc"])
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_chain_in_cuda_graph_matches_eager_without_pdl(m, pdl, clusters, tc, weights, monkeypatch):
    """clusters: $AWQ_PDL_CLUSTER (default 2: the folded GEMV's K-split clusters of 2 launch with
    PDL), 8 (its clusters up to 8 too, M = 2..8 here), 0 (no cluster). tc: $AWQ_PDL_TC (default 8: the
    tc kernel, the o-like 4096 x 4096 weight at M = 2..8 here, with PDL, its first loads before the
    wait), 0 (plain)."""
    for name, value in (("AWQ_PDL", pdl), ("AWQ_PDL_CLUSTER", clusters), ("AWQ_PDL_TC", tc)):
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    x = torch.randn(m, HIDDEN, device="cuda").to(torch.bfloat16)
    with monkeypatch.context() as mp:
        mp.setenv("AWQ_PDL", "0")
        ref = _chain(x, weights)
    assert all(torch.isfinite(r).all() for r in ref)
    assert torch.equal(torch.cat([r.flatten().float() for r in _chain(x, weights)]),
                       torch.cat([r.flatten().float() for r in ref])), "eager with PDL differs"

    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _chain(static_x, weights)  # warm up (plans, occupancy queries) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _chain(static_x, weights)
    for _ in range(5):
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (o, r) in enumerate(zip(outs, ref)):
            assert torch.equal(o, r), f"output {i} of the chain differs from eager (m={m})"


@pytest.mark.parametrize("m", [1, 8])
def test_pdl_switch_is_read_per_call(m, weights, monkeypatch):
    """$AWQ_PDL=0 (never), 1, 8 (up to M = 8) and a non-number (the default) give the same bits
    eagerly: the switch changes how kernels are launched, never what they compute."""
    x = torch.randn(m, HIDDEN, device="cuda").to(torch.bfloat16)
    outs = []
    for value in ("0", "1", "8", "yes"):
        monkeypatch.setenv("AWQ_PDL", value)
        outs.append(torch.cat([o.flatten().float() for o in _chain(x, weights)]))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
