"""awq::int4_linear_partials and the pass defer_split_k: the op's reference against float64, its
fake and errors (CPU); which calls the pass rewrites, with the kernel's plan stubbed on the CPU;
the backend's option and counter on a tiny Llama; and on CUDA, the kernel's partials against the
CUDA-core GEMV bit for bit and the backend end to end."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

import awq_compile
from awq_compile import AWQConfig
from awq_compile.nn import Int4Linear
from awq_compile.quant import dequantize, quantize
from passes import defer_split_k

PARTIALS = torch.ops.awq.int4_linear_partials.default
LINEAR = torch.ops.awq.int4_linear.default


@pytest.mark.parametrize("k,g,slices", [(256, 64, 1), (256, 64, 2), (200, 64, 3), (576, 128, 5), (96, 32, 2)])
def test_partials_sum_to_the_product(k, g, slices):
    """Whole groups a slice (empty slices past K are zero); the sum is x @ W^T."""
    torch.manual_seed(0)
    qw = quantize(torch.randn(24, k), g)
    x = torch.randn(2, 3, k)
    p = PARTIALS(x, qw.qweight, qw.scales, qw.zeros, g, slices)
    assert p.shape == (slices, 2, 3, 24) and p.dtype == torch.float32
    ref = x.double() @ dequantize(qw.qweight, qw.scales, qw.zeros, g, k, torch.float64).T
    assert ((p.double().sum(0) - ref).norm() / ref.norm()).item() < 1e-6
    if slices > 1:  # each slice is its own K range: none holds the whole product
        assert all((p[i].double() - ref).norm() > 1e-3 * ref.norm() for i in range(slices) if p[i].any())


def test_partials_opcheck_and_errors():
    qw = quantize(torch.randn(16, 128), 64)
    torch.library.opcheck(PARTIALS, (torch.randn(3, 128), qw.qweight, qw.scales, qw.zeros, 64, 2))
    with pytest.raises(ValueError, match=r"int4_linear_partials: slices must be >= 1, got 0"):
        PARTIALS(torch.randn(1, 128), qw.qweight, qw.scales, qw.zeros, 64, 0)
    with pytest.raises(ValueError, match=r"x has K=60 features"):
        PARTIALS(torch.randn(1, 60), qw.qweight, qw.scales, qw.zeros, 64, 2)


# ----------------------------------------------------------------------------- the pass

K, N = 128, 16


class _Net(torch.nn.Module):
    """An Int4Linear module call, and the same weight as an op call on another input."""

    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(1)
        qw = quantize(torch.randn(N, K), 32)
        self.lin = Int4Linear.from_quantized(qw, 32, torch.randn(N) if bias else None)
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(f"w_{name}", getattr(qw, name))
        self.register_buffer("w_bias", torch.randn(N) if bias else None)

    def forward(self, x, x2):
        y = LINEAR(x2, self.w_qweight, self.w_scales, self.w_zeros, 32, self.w_bias)
        return torch.relu(self.lin(x)) + y


def _traced(mod: torch.nn.Module, *args) -> fx.GraphModule:
    """A symbolic trace with Int4Linear kept as a module call, and `val` metadata."""

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Int4Linear) or super().is_leaf_module(m, name)

    gm = fx.GraphModule(mod, Leaf().trace(mod))
    fx.passes.shape_prop.ShapeProp(gm).propagate(*args)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            tm = n.meta["tensor_meta"]
            n.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype)
    return gm


@pytest.mark.parametrize("bias", [True, False])
def test_pass_rewrites_where_the_plan_splits(bias):
    mod = _Net(bias).eval()
    x, x2 = torch.randn(2, K), torch.randn(2, K)
    gm = _traced(mod, x, x2)
    seen = []

    def plan(m, n, k, kp, g, dtype, device):
        seen.append((m, n, k, kp, g, dtype, device.type))
        return 3

    assert defer_split_k(gm, plan) == 2
    assert seen == [(2, N, K, K, 32, torch.float32, "cpu")] * 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(PARTIALS) == 2 and LINEAR not in targets
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert all(n.args[-1] == 3 for n in gm.graph.nodes if n.target is PARTIALS)
    torch.testing.assert_close(gm(x, x2), mod(x, x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slices", [0, 1])
def test_pass_leaves_unsplit_calls(slices):
    mod = _Net().eval()
    gm = _traced(mod, torch.randn(1, K), torch.randn(1, K))
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert defer_split_k(gm, lambda *a: slices) == 0
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_pass_leaves_cpu_calls_by_default():
    """Without a plan stub the library decides, and it has none for a CPU tensor."""
    mod = _Net().eval()
    gm = _traced(mod, torch.randn(1, K), torch.randn(1, K))
    assert defer_split_k(gm) == 0


# ----------------------------------------------------------------------------- the backend



@pytest.mark.parametrize("defer", [True, False])
def test_backend_defers_the_split_k_sums(tiny_llama, defer, monkeypatch):
    """With the plan stubbed to 2 slices everywhere (as the o and down projections have at one
    token on an H200), the single linears left after the fusions (o, down: 2 a layer) become
    partials + sum, inductor compiles the sum downstream, and the logits match eager."""
    monkeypatch.setattr(importlib.import_module("awq_compile.passes.defer_split_k"), "_library_slices",
                        lambda *a: 2)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiny_llama, backend="awq", options={"defer_split_k": defer})
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = compiled(ids, use_cache=False).logits
        want = tiny_llama(ids, use_cache=False).logits
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert counters["awq"]["split_k_deferred"] == (4 if defer else 0)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n,g", [(4096, 4096, 128), (11008, 4096, 128), (2999, 200, 32)])
def test_cuda_partials_are_the_gemv_slices(k, n, g, dtype, cuda_library):
    """Where the CUDA-core GEMV splits K at M = 1, the op's partials summed in slice order, + bias,
    rounded, are its output bit for bit; with another slice count the op falls back to
    int4_linear's result in slice 0."""
    from awq_compile import _cuda
    from test_cuda_kernels import _random_weight

    qw, s, z, b = _random_weight(k, n, g, dtype, seed=7)
    x = torch.randn(1, k, device="cuda").to(dtype)
    slices = _cuda.split_k_slices(1, n, k, qw.shape[1] * 2, g, dtype, x.device.index)
    if slices < 2:
        pytest.skip(f"not split on this device ({slices} slices)")
    p = PARTIALS(x, qw, s, z, g, slices)
    acc = p[0].clone()
    for i in range(1, slices):
        acc += p[i]
    y = LINEAR(x, qw, s, z, g, b)
    assert torch.equal((acc + b.float()).to(dtype), y)
    ref = x.double() @ dequantize(qw, s, z, g, k, torch.float64).T
    assert ((acc.double() - ref).norm() / ref.norm()).item() < 1e-5
    other = PARTIALS(x, qw, s, z, g, slices + 1)
    assert torch.equal(other[0], LINEAR(x, qw, s, z, g, None).float()) and not other[1:].any()


@pytest.mark.cuda
def test_cuda_backend_defers_at_one_token(cuda_library):
    """A 4096 x 4096 INT4 linear at one token on the GPU: one int4_linear_partials call where the
    plan splits K, and the compiled output close to the kernel's own."""
    awq_compile.backend.register()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 64))
    model = awq_compile.quantize_rtn(model.to(torch.bfloat16).cuda().eval(), AWQConfig(group_size=128))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for defer in (True, False):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="awq", options={"defer_split_k": defer})
        with torch.no_grad():
            outs[defer] = compiled(x)
        n = counters["awq"]["split_k_deferred"]
        assert (n >= 1) if defer else n == 0
    err = ((outs[True].double() - outs[False].double()).norm() / outs[False].double().norm()).item()
    assert err < 1e-2
