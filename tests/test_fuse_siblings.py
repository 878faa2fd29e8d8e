"""Horizontal fusion of sibling INT4 linears: the op awq::int4_linear_multi, the pass
fuse_sibling_linears on hand-built graphs (int4_linear calls and Int4Linear module calls), and
the "awq" backend on a tiny Llama (quantized by the user, or by the backend's calibration)."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import awq_compile
from awq_compile import AWQConfig, Int4Linear
from awq_compile._calibration import model_state
from awq_compile.passes import fuse_sibling_linears
from awq_compile.quant import quantize

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest: a clean torch.compile state

SINGLE = torch.ops.awq.int4_linear.default
MULTI = torch.ops.awq.int4_linear_multi.default


def _weights(ns, k, g=32, dtype=torch.float32, biases=None, seed=0):
    """Per segment (qweight, scales, zeros, bias) for weights [n, k]; biases: one bool each."""
    torch.manual_seed(seed)
    biases = biases or [False] * len(ns)
    out = []
    for n, b in zip(ns, biases):
        qw = quantize(torch.randn(n, k), g, scale_dtype=dtype)
        out.append((qw.qweight, qw.scales, qw.zeros, torch.randn(n, dtype=dtype) if b else None))
    return out


def _multi(x, segs, g=32):
    return MULTI(x, *[[s[i] for s in segs] for i in range(3)], g, [s[3] for s in segs])


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biases", [[False] * 3, [True] * 3, [True, False, True]])
@pytest.mark.parametrize("x_shape", [(1, 96), (2, 5, 96)])
def test_multi_is_bit_identical_to_separate_calls(dtype, biases, x_shape):
    segs = _weights([64, 32, 40], 96, dtype=dtype, biases=biases)  # K = 96 pads to 128 at g = 32
    x = torch.randn(x_shape, dtype=dtype)
    ys = _multi(x, segs)
    assert len(ys) == 3
    for y, (q, s, z, b) in zip(ys, segs):
        want = SINGLE(x, q, s, z, 32, b)
        assert y.shape == (*x_shape[:-1], q.shape[0]) and y.dtype == dtype
        assert torch.equal(y, want)


def test_multi_errors_name_the_problem():
    segs = _weights([16, 16], 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"int4_linear_multi: takes 1 to 4 segments, got 0"):
        MULTI(x, [], [], [], 32, [])
    with pytest.raises(ValueError, match=r"takes 1 to 4 segments, got 5"):
        _multi(x, segs * 2 + segs[:1])
    other_k = _weights([16], 128)
    with pytest.raises(ValueError, match=r"same packed K, got qweights \[\(16, 32\), \(16, 64\)\]"):
        _multi(x, segs[:1] + other_k)
    with pytest.raises(ValueError, match=r"must have the same length, got \[2, 2, 1, 2\]"):
        MULTI(x, [s[0] for s in segs], [s[1] for s in segs], [segs[0][2]], 32, [None, None])
    q, s, z, _ = segs[1]
    with pytest.raises(ValueError, match=r"segment 1: awq::int4_linear: bias must be \[16\]"):
        _multi(x, [segs[0], (q, s, z, torch.zeros(3))])


@pytest.mark.parametrize("biases", [[False, False], [True, False]])
def test_opcheck(biases):
    segs = _weights([24, 8], 64, biases=biases)
    args = (torch.randn(3, 64), *[[s[i] for s in segs] for i in range(3)], 32, [s[3] for s in segs])
    torch.library.opcheck(MULTI, args)


# ----------------------------------------------------------------------------- the pass


class _Graph:
    """A hand-built GraphModule: get_attr weights, placeholder inputs, int4_linear calls."""

    def __init__(self) -> None:
        self.root, self.g, self.n = nn.Module(), fx.Graph(), 0
        self.inputs: list[torch.Tensor] = []

    def input(self, k: int = 64, shape: tuple[int, ...] = (2, 3)) -> fx.Node:
        self.inputs.append(torch.randn(*shape, k))
        return self.g.placeholder(f"x{len(self.inputs)}")

    def weight(self, n: int, k: int = 64, g: int = 32, bias: bool = False) -> list:
        self.n += 1
        (t,) = _weights([n], k, g, biases=[bias], seed=self.n)
        nodes = []
        for leaf, v in zip(("qweight", "scales", "zeros", "bias"), t):
            if v is not None:
                self.root.register_buffer(f"w{self.n}_{leaf}", v)
            nodes.append(None if v is None else self.g.get_attr(f"w{self.n}_{leaf}"))
        return nodes

    def linear(self, x: fx.Node, w: list, g: int = 32) -> fx.Node:
        return self.g.call_function(SINGLE, (x, *w[:3], g, w[3]))

    def int4(self, x: fx.Node, n: int, k: int = 64, bias: bool = False,
             dtype: torch.dtype = torch.float32, input_scale: bool = False) -> fx.Node:
        """A call of a new Int4Linear submodule, as the backend's `rewrite_for_serving` makes."""
        self.n += 1
        ((q, s, z, b),) = _weights([n], k, biases=[bias], dtype=dtype, seed=self.n)
        scale = torch.rand(k) + 0.5 if input_scale else None
        self.root.add_module(f"awq_int4_{self.n}", Int4Linear(k, n, 32, q, s, z, b, scale))
        return self.g.call_module(f"awq_int4_{self.n}", (x,))

    def module(self, *outs: fx.Node) -> fx.GraphModule:
        self.g.output(tuple(outs))
        gm = fx.GraphModule(self.root, self.g)
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*self.inputs)
        return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _fused(b: _Graph, *outs: fx.Node):
    """Finish `b`'s graph and run the pass: (the module, its count, the multi nodes), after
    checking that the outputs are bit-identical to the graph's before the pass."""
    gm = b.module(*outs)
    before = gm(*b.inputs)
    n = fuse_sibling_linears(gm)
    after = gm(*b.inputs)
    assert len(before) == len(after) and all(torch.equal(u, v) for u, v in zip(before, after))
    return gm, n, [m for m in gm.graph.nodes if m.target is MULTI]


def _unchanged(b: _Graph, *outs: fx.Node) -> bool:
    gm = b.module(*outs)
    code = gm.code
    return fuse_sibling_linears(gm) == 0 and gm.code == code


def test_three_siblings_become_one_multi_call():
    b = _Graph()
    x = b.input()
    h = b.g.call_function(torch.relu, (x,))  # x of the linears is a computed node
    qkv = [b.linear(h, b.weight(n, bias=n == 32)) for n in (64, 32, 32)]
    gm, n, multi = _fused(b, *[b.g.call_function(torch.mul, (y, 2.0)) for y in qkv])
    assert n == 3 and len(multi) == 1 and SINGLE not in _targets(gm)
    (m,) = multi
    assert m.args[0] is h and len(m.args[1]) == 3
    assert [tuple(v.shape) for v in m.meta["val"]] == [(2, 3, 64), (2, 3, 32), (2, 3, 32)]
    gets = [u for u in m.users if u.target is operator.getitem]
    assert [g.args[1] for g in gets] == [0, 1, 2]
    assert [tuple(g.meta["val"].shape) for g in gets] == [(2, 3, 64), (2, 3, 32), (2, 3, 32)]


def test_different_inputs_are_not_fused():
    b = _Graph()
    x1, x2 = b.input(), b.input()
    y1, y2 = b.linear(x1, b.weight(16)), b.linear(x2, b.weight(16))
    y3 = b.linear(b.g.call_function(torch.mul, (x1, 1.0)), b.weight(16))  # same values, other node
    assert _unchanged(b, y1, y2, y3)


def test_group_size_must_match():
    b = _Graph()
    x = b.input(128)
    y64 = b.linear(x, b.weight(16, 128, 64), 64)
    ys = [b.linear(x, b.weight(16, 128, 32), 32) for _ in range(2)]
    gm, n, multi = _fused(b, y64, *ys)
    assert n == 2 and len(multi) == 1 and multi[0].args[4] == 32
    assert _targets(gm).count(SINGLE) == 1


def test_at_most_four_per_call_in_graph_order():
    b = _Graph()
    x = b.input()
    ys = [b.linear(x, b.weight(8 * (i + 1))) for i in range(6)]
    _, n, multi = _fused(b, *ys)
    assert n == 6 and [len(m.args[1]) for m in multi] == [4, 2]
    assert [m.meta["val"][0].shape[-1] for m in multi] == [8, 40]  # the first of each run


def test_weight_computed_after_the_first_output_is_used_moves_up():
    """dynamo's Int4Linear.forward: `scales.to(x.dtype)` comes after the previous sibling's
    output is used (q -> view -> k's scales -> k)."""
    b = _Graph()
    x = b.input()
    wq, wk = b.weight(32), b.weight(16)
    q = b.linear(x, wq)
    q2 = b.g.call_function(torch.neg, (q,))
    wk[1] = b.g.call_method("to", (wk[1], torch.float32))
    k = b.linear(x, wk)
    gm, n, multi = _fused(b, q2, k)
    assert n == 2
    nodes = list(gm.graph.nodes)
    assert nodes.index(wk[1]) < nodes.index(multi[0]) < nodes.index(q2)


class _Half(nn.Module):
    def forward(self, t):
        return t * 1.0


def test_weight_from_a_module_call_puts_the_multi_call_after_it():
    b = _Graph()
    b.root.prep = _Half()
    x = b.input()
    wq, wk = b.weight(32), b.weight(16)
    q = b.linear(x, wq)
    wk[1] = b.g.call_module("prep", (wk[1],))  # not moved: the fused call goes after it
    k = b.linear(x, wk)
    gm, n, multi = _fused(b, b.g.call_function(torch.neg, (q,)), k)
    assert n == 2
    nodes = list(gm.graph.nodes)
    assert nodes.index(wk[1]) < nodes.index(multi[0])


def _modules(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_three_int4_modules_become_one_multi_call_on_their_buffers():
    b = _Graph()
    x = b.input()
    qkv = [b.int4(x, n, bias=n == 32) for n in (64, 32, 48)]
    gm, n, multi = _fused(b, *[b.g.call_function(torch.mul, (y, 2.0)) for y in qkv])
    assert n == 3 and len(multi) == 1 and _modules(gm) == []
    (m,) = multi
    assert m.args[0] is x and m.args[4] == 32
    assert [a.target for a in m.args[1]] == ["awq_int4_1.qweight", "awq_int4_2.qweight",
                                             "awq_int4_3.qweight"]
    assert [a and a.target for a in m.args[5]] == [None, "awq_int4_2.bias", None]
    assert [tuple(v.shape) for v in m.meta["val"]] == [(2, 3, 64), (2, 3, 32), (2, 3, 48)]
    assert all(tuple(a.meta["val"].shape) == (n, 32) for a, n in zip(m.args[1], (64, 32, 48)))


def test_int4_modules_and_int4_linear_calls_fuse_together():
    b = _Graph()
    x = b.input()
    ys = [b.int4(x, 16), b.linear(x, b.weight(24)), b.int4(x, 8, bias=True)]
    gm, n, multi = _fused(b, *ys)
    assert n == 3 and len(multi) == 1 and _modules(gm) == [] and SINGLE not in _targets(gm)


def test_int4_module_with_input_scale_is_not_fused():
    b = _Graph()
    x = b.input()
    ys = [b.int4(x, 16), b.int4(x, 16, input_scale=True), b.int4(x, 16)]
    gm, n, multi = _fused(b, *ys)
    assert n == 2 and len(multi) == 1 and _modules(gm) == ["awq_int4_2"]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int4_modules_with_fp16_scales_fuse_with_the_modules_conversion(x_dtype):
    # scales and bias fp16 (the default compute_dtype): the fused call reads them through the
    # `.to(x.dtype)` each module's forward makes, so it stays bit-identical (checked by _fused)
    b = _Graph()
    x = b.g.call_method("to", (b.input(), x_dtype))
    ys = [b.int4(x, 16, dtype=x_dtype), b.int4(x, 24, bias=True, dtype=torch.float16),
          b.int4(x, 8, dtype=x_dtype)]
    gm, n, multi = _fused(b, *ys)
    assert n == 3 and len(multi) == 1 and _modules(gm) == []
    (m,) = multi
    scales, biases = m.args[2], m.args[5]
    assert [a.op for a in scales] == ["get_attr", "call_method", "get_attr"]
    to = [scales[1], biases[1]]
    assert [(t.target, t.args[0].target, t.args[1]) for t in to] == [
        ("to", "awq_int4_2.scales", x_dtype), ("to", "awq_int4_2.bias", x_dtype)]
    assert all(t.meta["val"].dtype == x_dtype and t.args[0].meta["val"].dtype == torch.float16
               for t in to)
    assert [a and a.meta["val"].dtype for a in (*scales, *biases)] == [x_dtype] * 3 + [
        None, x_dtype, None]
    assert sum(n.target == "to" for n in gm.graph.nodes) == 3  # x's, and the two above


def test_int4_modules_on_an_input_of_unknown_dtype_are_not_fused():
    b = _Graph()
    x = b.input()
    ys = [b.int4(x, 16), b.int4(x, 16)]
    gm = b.module(*ys)
    x.meta.clear()
    assert fuse_sibling_linears(gm) == 0 and len(_modules(gm)) == 2


def test_unfusable_orders_are_left_alone():
    # k's scales read q's output: k cannot run together with q
    b = _Graph()
    x = b.input()
    wq, wk = b.weight(16), b.weight(16)
    q = b.linear(x, wq)
    wk[1] = b.g.call_function(torch.add, (wk[1], b.g.call_function(torch.sum, (q,))))
    assert _unchanged(b, q, b.linear(x, wk))
    # one sibling's output is another's bias (x is a vector, so both are [16])
    b = _Graph()
    x = b.input(shape=())
    q = b.linear(x, b.weight(16))
    assert _unchanged(b, b.linear(x, [*b.weight(16)[:3], q]))
    # an in-place op on x between the siblings: they read different values
    b = _Graph()
    x = b.input()
    y1 = b.linear(x, b.weight(16))
    b.g.call_method("add_", (x, 1.0))
    assert _unchanged(b, y1, b.linear(x, b.weight(16)))


# ----------------------------------------------------------------------------- the backend


LAYERS = 2




@pytest.mark.parametrize("inductor, fuse, atol", [(False, True, 0.0), (True, True, 1e-5),
                                                  (False, False, 0.0)])
def test_backend_fuses_qkv_and_gate_up(tiny_llama, inductor, fuse, atol):
    compiled = torch.compile(tiny_llama, backend="awq",  # gate/up as siblings, not as a GLU
                             options={"inductor": inductor, "fuse_siblings": fuse, "fuse_activation": False})
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = compiled(ids, use_cache=False).logits
        want = tiny_llama(ids, use_cache=False).logits
    torch.testing.assert_close(y, want, rtol=0 if atol == 0 else 1e-5, atol=atol)
    assert counters["awq"]["serve_graphs"] == 1
    assert counters["awq"]["siblings_fused"] == (2 * LAYERS if fuse else 0)


SEARCH = dict(n_grid=2, clip_grid=2, max_search_tokens=128, max_clip_tokens=32)


@pytest.fixture(scope="module", params=["float32", "float16"])
def calibrated_llama(request):
    """A float32 2-layer Llama the backend calibrated itself: its serving graphs call the
    Int4Linear modules `rewrite_for_serving` swaps in. Scales in float32 (the model's dtype), or
    in float16 (the default compute_dtype), which each module converts to float32 in forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=128,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    dtype = {} if request.param == "float16" else {"compute_dtype": request.param}
    assert AWQConfig().compute_dtype == "float16"
    compiled = torch.compile(model, backend="awq", options={"group_size": 32, **dtype, **SEARCH})
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), awq_compile.calibration(compiled):
        compiled(ids, use_cache=False)
    torch._dynamo.reset()
    return model, getattr(torch, request.param)


@pytest.mark.parametrize("inductor, atol", [(False, 0.0), (True, 1e-5)])
def test_backend_fuses_the_int4_modules_it_swaps_in(calibrated_llama, inductor, atol):
    model, scale_dtype = calibrated_llama
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    ys = {}
    for fuse, glu in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="awq",
                                 options={"inductor": inductor, "fuse_siblings": fuse, "fuse_activation": glu})
        with torch.no_grad():
            ys[fuse, glu] = compiled(ids, use_cache=False).logits
        assert counters["awq"]["serve_graphs"] == 1 and counters["awq"]["quantize"] == 0
        assert counters["awq"]["linears_swapped"] == 7 * LAYERS
        assert counters["awq"]["siblings_fused"] == ((1 if glu else 2) * LAYERS if fuse else 0)
        assert counters["awq"]["mlps_fused"] == (LAYERS if glu else 0)  # gate/up modules and silu * up
    plan = model_state(model).plan  # the Int4Linear modules the graphs call
    assert {m.scales.dtype for m in plan.linears.values()} == {scale_dtype}
    assert ys[True, True].dtype == torch.float32
    for key in ((True, False), (True, True)):
        torch.testing.assert_close(ys[key], ys[False, False], rtol=0 if atol == 0 else 1e-5, atol=atol)
