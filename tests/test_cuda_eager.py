"""Int4Linear's eager path on CUDA: a plain forward calls awq::int4_linear's CUDA implementation
itself (no dispatcher, no custom-op autograd layer: their host cost exceeded a decode kernel's
time), with the op's result bit for bit; anything that must see the op still does.

Needs a CUDA GPU and the built library; skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from awq_compile.nn import Int4Linear
from awq_compile.quant import dequantize, quantize

cuda_mod = pytest.importorskip("awq_compile._cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
]


@pytest.fixture
def layer():
    torch.manual_seed(0)
    k, n = 1024, 768
    w = torch.randn(n, k, device="cuda") * 0.02
    qw = quantize(w, 128, scale_dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    return Int4Linear.from_quantized(qw, 128, bias=bias).cuda()


@pytest.fixture
def direct_calls(monkeypatch):
    """Counts the module's direct calls of int4_linear_cuda (the op's registration holds the
    original function, so calls through the dispatcher are not counted)."""
    calls = []
    real = cuda_mod.int4_linear_cuda
    monkeypatch.setattr(cuda_mod, "int4_linear_cuda", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def _op(layer, x):
    return torch.ops.awq.int4_linear(x, layer.qweight, layer.scales, layer.zeros, 128, layer.bias)


@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_eager_forward_calls_the_implementation_directly(layer, direct_calls, m):
    x = torch.randn(2, m, layer.in_features, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        want = _op(layer, x)
    assert direct_calls == [x.shape]
    assert torch.equal(y, want)
    w64 = dequantize(layer.qweight, layer.scales, layer.zeros, 128, layer.in_features, dtype=torch.float64)
    ref = x.double() @ w64.T + layer.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 6e-3


def test_grad_wanted_takes_the_op(layer, direct_calls):
    x = torch.randn(4, layer.in_features, device="cuda").to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert direct_calls == []
    assert torch.equal(y.detach(), _op(layer, x.detach()))
    with torch.no_grad():  # no gradient wanted after all: direct
        layer(x)
    assert len(direct_calls) == 1


def test_a_dispatch_mode_sees_the_op(layer, direct_calls):
    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, layer.in_features, device="cuda").to(torch.bfloat16)
    with torch.no_grad(), Seen() as mode:
        layer(x)
    assert direct_calls == []
    assert "awq.int4_linear.default" in mode.ops


def test_torch_compile_traces_the_op(layer, direct_calls):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    x = torch.randn(4, layer.in_features, device="cuda").to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert any("awq.int4_linear" in t for t in graphs[0])
    assert direct_calls == []
    assert torch.equal(y, _op(layer, x))


def test_jit_trace_records_the_op(layer, direct_calls):
    x = torch.randn(4, layer.in_features, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)  # its check would rerun the module eagerly
        y = traced(x)
    assert "awq::int4_linear" in {n.kind() for n in traced.graph.nodes()}
    assert direct_calls == []  # a ctypes launch would be missing from the trace
    assert torch.equal(y, _op(layer, x))


def test_vmap_takes_the_op(layer, direct_calls):
    x = torch.randn(3, 2, layer.in_features, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y = torch.func.vmap(layer)(x)
    assert direct_calls == []
    assert torch.equal(y, torch.stack([_op(layer, xi) for xi in x]))
