"""awq::int4_linear_glu and the pass fuse_gated_mlp (CPU): the op's reference against float64,
opcheck and errors; which graphs the pass rewrites and which it leaves; the backend's option and
counters on a tiny Llama."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters

from awq_compile.nn import Int4Linear
from awq_compile.quant import dequantize, quantize
from passes import fuse_gated_mlp

GLU = torch.ops.awq.int4_linear_glu.default


def _weights(k, n, g, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return [quantize(torch.randn(n, k), g, scale_dtype=dtype) for _ in range(2)]


def _args(qws):
    return [q.qweight for q in qws], [q.scales for q in qws], [q.zeros for q in qws]


@pytest.mark.parametrize("m,k,n,g", [(1, 64, 8, 32), (3, 576, 40, 128), (5, 96, 16, 64)])
def test_op_matches_float64(m, k, n, g):
    qws = _weights(k, n, g)
    x, bg, bu = torch.randn(m, k), torch.randn(n), torch.randn(n)
    h = GLU(x, *_args(qws), g, [bg, bu])
    gate = x.double() @ dequantize(*qws[0][:3], g, k, torch.float64).t() + bg.double()
    up = x.double() @ dequantize(*qws[1][:3], g, k, torch.float64).t() + bu.double()
    ref = F.silu(gate) * up
    assert (h.double() - ref).norm() / ref.norm() < 1e-6


def test_op_is_the_unfused_graph_in_half():
    """The reference rounds as the unfused eager graph does: bit-identical to it."""
    qws = _weights(128, 16, 64, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    h = GLU(x, *_args(qws), 64, [None, None])
    g, u = (torch.ops.awq.int4_linear(x, q.qweight, q.scales, q.zeros, 64, None) for q in qws)
    assert h.shape == (2, 3, 16) and torch.equal(h, F.silu(g) * u)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    qws = _weights(576, 16, 128)
    b = [torch.randn(16), torch.randn(16)] if bias else [None, None]
    torch.library.opcheck(GLU, (torch.randn(3, 576), *_args(qws), 128, b))


def test_errors_name_the_shapes():
    qws = _weights(64, 8, 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"int4_linear_glu: takes 2 weights \(gate, up\), got 1"):
        GLU(x, *([a[0]] for a in _args(qws)), 32, [None])
    other = quantize(torch.randn(12, 64), 32)
    with pytest.raises(ValueError, match=r"gate and up must have the same rows.*\(8, 32\), \(12, 32\)"):
        GLU(x, [qws[0].qweight, other.qweight], [qws[0].scales, other.scales], [qws[0].zeros, other.zeros],
            32, [None, None])
    with pytest.raises(ValueError, match=r"int4_linear_glu: awq::int4_linear_multi: segment 0.*group_size"):
        GLU(x, *_args(qws), 48, [None, None])


# ----------------------------------------------------------------------------- the pass

K, N = 64, 8


class _MLP(torch.nn.Module):
    """silu(gate(x)) * up(x) in the forms dynamo and hand-written graphs produce."""

    def __init__(self, form: str = "functional", bias: bool = True, n_up: int = N):
        super().__init__()
        wg, wu = quantize(torch.randn(N, K), 32), quantize(torch.randn(n_up, K), 32)
        self.gate = Int4Linear.from_quantized(wg, 32, torch.randn(N) if bias else None)
        self.up = Int4Linear.from_quantized(wu, 32, torch.randn(n_up) if bias else None)
        self.act = torch.nn.SiLU()
        self.form = form

    def forward(self, x, x2):
        g, u = self.gate(x), self.up(x)
        if self.form == "functional":
            return F.silu(g) * u
        if self.form == "module_swapped":
            return u * self.act(g)
        if self.form == "method":
            return F.silu(g).mul(u)
        if self.form == "torch_mul":
            return torch.mul(F.silu(g), u)
        if self.form == "inplace":
            return F.silu(g, inplace=True) * u
        if self.form == "gate_used":
            return F.silu(g) * u + g
        if self.form == "act_used":
            a = F.silu(g)
            return a * u + a
        if self.form == "up_used":
            return F.silu(g) * u + u
        if self.form == "other_input":
            return F.silu(g) * self.up(x2)
        if self.form == "other_rows":
            return F.silu(g) * u[..., :N]
        raise AssertionError(self.form)


def _traced(mod: torch.nn.Module, *args) -> fx.GraphModule:
    """A symbolic trace with Int4Linear and SiLU kept as module calls, and `val` metadata."""

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, (Int4Linear, torch.nn.SiLU)) or super().is_leaf_module(m, name)

    gm = fx.GraphModule(mod, Leaf().trace(mod))
    fx.passes.shape_prop.ShapeProp(gm).propagate(*args)
    for n in gm.graph.nodes:  # ShapeProp writes tensor_meta; the pass reads val
        if "tensor_meta" in n.meta:
            tm = n.meta["tensor_meta"]
            n.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype)
    return gm


@pytest.mark.parametrize("form", ["functional", "module_swapped", "method", "torch_mul"])
@pytest.mark.parametrize("bias", [True, False])
def test_pass_fuses_the_gated_forms(form, bias):
    mod = _MLP(form, bias).eval()
    x = torch.randn(3, K)
    gm = _traced(mod, x, x)
    assert fuse_gated_mlp(gm) == 1
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(GLU) == 1 and F.silu not in ops and operator.mul not in ops
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, x), mod(x, x), rtol=0, atol=0)


@pytest.mark.parametrize("form", ["inplace", "gate_used", "act_used", "up_used", "other_input"])
def test_pass_leaves_what_it_cannot_fuse(form):
    mod = _MLP(form).eval()
    x = torch.randn(3, K)
    gm = _traced(mod, x.clone(), torch.randn(3, K))
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert fuse_gated_mlp(gm) == 0
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


def test_pass_leaves_projections_of_other_sizes():
    mod = _MLP("other_rows", n_up=2 * N).eval()
    x = torch.randn(3, K)
    gm = _traced(mod, x, x)
    assert fuse_gated_mlp(gm) == 0


# ----------------------------------------------------------------------------- the backend



@pytest.mark.parametrize("inductor, fuse, atol", [(False, True, 0.0), (True, True, 1e-5), (False, False, 0.0)])
def test_backend_fuses_the_gated_mlp(tiny_llama, inductor, fuse, atol):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(tiny_llama, backend="awq", options={"inductor": inductor, "fuse_activation": fuse})
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = compiled(ids, use_cache=False).logits
        want = tiny_llama(ids, use_cache=False).logits
    torch.testing.assert_close(y, want, rtol=0 if atol == 0 else 1e-5, atol=atol)
    assert counters["awq"]["mlps_fused"] == (2 if fuse else 0)
    assert counters["awq"]["siblings_fused"] == (2 if fuse else 4)  # q/k/v, and gate/up when not a GLU
