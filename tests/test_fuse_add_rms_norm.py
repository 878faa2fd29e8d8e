"""awq::int4_linear_glu_norm, awq::int4_linear_rope_cache_norm and the pass fuse_add_rms_norm (CPU):
the ops against float64 (delta as a tensor or as K-slice partials with or without bias), opcheck
and errors; which graphs the pass rewrites and which it leaves; the backend's option and counter
on a tiny Llama and on the real SmolLM2-135M decoding with a static cache, bit for bit against the
same graphs unfused when both run eagerly."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import awq_compile
from awq_compile import AWQConfig
from awq_compile.quant import dequantize, quantize
from passes import defer_split_k, fuse_add_rms_norm, fuse_gated_mlp, fuse_rope_cache, fuse_sibling_linears
from conftest import rel_err as _rel, static_cache_decode
from test_fuse_rope_cache import _block, _cos_sin, _reference64

GLU_NORM = torch.ops.awq.int4_linear_glu_norm.default
ROPE_NORM = torch.ops.awq.int4_linear_rope_cache_norm.default
GLU = torch.ops.awq.int4_linear_glu.default
ROPE = torch.ops.awq.int4_linear_rope_cache.default
PARTIALS = torch.ops.awq.int4_linear_partials.default
EPS = 1e-5
K = 64


def _norm_inputs(shape, dtype, form, seed=0):
    """residual, delta, delta_bias, norm_weight: delta of residual's dtype ("t"), or float32
    partials of 2 K slices without ("p") or with ("pb") a bias."""
    gen = torch.Generator().manual_seed(seed)
    residual = (torch.randn(shape, generator=gen) * 3).to(dtype)
    delta = torch.randn(shape if form == "t" else (2, *shape), generator=gen)
    delta = delta.to(dtype) if form == "t" else delta
    bias = torch.randn(shape[-1], generator=gen).to(dtype) if form == "pb" else None
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    return residual, delta, bias, weight


def _norm64(residual, delta, bias, weight):
    """(h, x) in float64: the formula of ops.add_rms_norm, unrounded."""
    d = delta.double() if delta.dim() == residual.dim() else delta.double().sum(0)
    h = residual.double() + d + (0 if bias is None else bias.double())
    return h, weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


def _glu_weights(n=48, g=32, dtype=torch.float32, bias=False):
    torch.manual_seed(5)
    qws = [quantize(torch.randn(n, K), g, scale_dtype=dtype) for _ in range(2)]
    biases = [torch.randn(n).to(dtype) if bias else None for _ in range(2)]
    return qws, biases


def _w(qws, biases, g):
    return [q.qweight for q in qws], [q.scales for q in qws], [q.zeros for q in qws], g, biases


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", ["t", "p", "pb"])
@pytest.mark.parametrize("shape", [(1, 1, K), (3, 2, K)])
def test_glu_norm_matches_float64(dtype, form, shape):
    residual, delta, bias, weight = _norm_inputs(shape, dtype, form)
    qws, biases = _glu_weights(dtype=dtype, bias=form == "pb")
    out, h = GLU_NORM(residual, delta, bias, weight, EPS, *_w(qws, biases, 32))
    h64, x64 = _norm64(residual, delta, bias, weight)
    gate, up = (x64 @ dequantize(q.qweight, q.scales, q.zeros, 32, K, torch.float64).T for q in qws)
    if biases[0] is not None:
        gate, up = gate + biases[0].double(), up + biases[1].double()
    assert h.dtype == out.dtype == dtype and h.shape == shape and out.shape == (*shape[:-1], 48)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(h, h64) < tol and _rel(out, F.silu(gate) * up) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", ["t", "pb"])
def test_rope_cache_norm_matches_float64(dtype, form):
    hq, hkv, d, b, s = 4, 2, 16, 2, 3
    residual, delta, bias, weight = _norm_inputs((b, s, K), dtype, form)
    qws, biases = _block(hq, hkv, d, bias=form == "pb")
    qws = [q._replace(scales=q.scales.to(dtype)) for q in qws]
    biases = [None if x is None else x.to(dtype) for x in biases]
    cos, sin = _cos_sin(1, s, d, dtype=dtype)
    pos = torch.arange(3, 3 + s)
    k_cache, v_cache = (torch.randn(b, hkv, 8, d).to(dtype) for _ in range(2))
    h64, x64 = _norm64(residual, delta, bias, weight)
    want = _reference64(x64, qws, biases, 32, cos, sin, pos, k_cache, v_cache, hq, hkv, d)
    q, h = ROPE_NORM(residual, delta, bias, weight, EPS, *_w(qws, biases, 32), cos, sin, pos, k_cache, v_cache)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(h, h64) < tol
    for got, w in zip((q, k_cache, v_cache), want):
        assert _rel(got, w) < tol


def test_ops_are_the_unfused_graph_bit_for_bit_in_bf16():
    """The reference is the eager graph it replaces: the add (the partials summed, + bias, cast),
    the norm step by step, then the projection's op."""
    residual, delta, bias, weight = _norm_inputs((2, 1, K), torch.bfloat16, "pb")
    qws, biases = _glu_weights(dtype=torch.bfloat16)
    out, h = GLU_NORM(residual, delta, bias, weight, EPS, *_w(qws, biases, 32))
    h2 = residual + (delta.sum(0) + bias).to(torch.bfloat16)
    hf = h2.to(torch.float32)
    x = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    assert torch.equal(h, h2) and torch.equal(out, GLU(x, *_w(qws, biases, 32)))


def test_opcheck():
    residual, delta, bias, weight = _norm_inputs((3, 1, K), torch.float32, "pb")
    qws, biases = _glu_weights(bias=True)
    torch.library.opcheck(GLU_NORM, (residual, delta, bias, weight, EPS, *_w(qws, biases, 32)))
    torch.library.opcheck(GLU_NORM, (residual, delta[0], None, weight, EPS, *_w(qws, biases, 32)))
    qws, biases = _block()
    residual, delta, bias, weight = _norm_inputs((2, 1, K), torch.float32, "p")
    cos, sin = _cos_sin(1, 1, 16)
    caches = (torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16))
    torch.library.opcheck(ROPE_NORM, (residual, delta, None, weight, EPS, *_w(qws, biases, 32), cos, sin,
                                      torch.tensor([3]), *caches))


def test_errors_name_the_shapes():
    residual, delta, bias, weight = _norm_inputs((2, 1, K), torch.float32, "pb")
    w = _w(*_glu_weights(), 32)
    with pytest.raises(ValueError, match=r"int4_linear_glu_norm: delta must have residual's shape and dtype, "
                                         r"or be float32 K-slice partials .*delta \(2, 2, 1, 32\)"):
        GLU_NORM(residual, delta[..., :32], bias, weight, EPS, *w)
    with pytest.raises(ValueError, match=r"delta must have residual's shape and dtype.*torch.bfloat16"):
        GLU_NORM(residual, delta[0].bfloat16(), None, weight, EPS, *w)
    with pytest.raises(ValueError, match=r"delta_bias goes with float32 partials only, as \[64\]"):
        GLU_NORM(residual, delta[0], bias, weight, EPS, *w)
    with pytest.raises(ValueError, match=r"norm_weight must be \[64\] of residual's dtype \(.*norm_weight \(32,\)"):
        GLU_NORM(residual, delta, bias, weight[:32], EPS, *w)
    with pytest.raises(ValueError, match=r"eps must be a float >= 0 \(.*eps -1e-05\)"):
        GLU_NORM(residual, delta, bias, weight, -EPS, *w)
    qws, biases = _block()
    cos, sin = _cos_sin(1, 1, 16)
    with pytest.raises(ValueError, match=r"int4_linear_rope_cache_norm: norm_weight must be \[64\]"):
        ROPE_NORM(residual, delta, bias, weight.double(), EPS, *_w(qws, biases, 32), cos, sin,
                  torch.tensor([3]), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16))


# ----------------------------------------------------------------------------- the pass


class _Block(torch.nn.Module):
    """`h = residual + delta`, LlamaRMSNorm, a gated MLP's int4_linear_glu call, and h read after
    it (the next residual), written as transformers writes them; `leak` also returns hf or x (a
    second reader), `early` reads h before the projection, `mutate` writes delta in place between
    the norm and the projection."""

    def __init__(self, leak: str = "", early: bool = False, mutate: bool = False):
        super().__init__()
        qws, _ = _glu_weights()
        self.leak, self.early, self.mutate = leak, early, mutate
        self.weight = torch.nn.Parameter(torch.rand(K) + 0.5)
        for name, qw in zip(("gate", "up"), qws):
            for leaf in ("qweight", "scales", "zeros"):
                self.register_buffer(f"{name}_{leaf}", getattr(qw, leaf))

    def forward(self, residual, delta):
        h = residual + delta
        hf = h.to(torch.float32)
        variance = hf.pow(2).mean(-1, keepdim=True)
        x = self.weight * (hf * torch.rsqrt(variance + 1e-5)).to(h.dtype)  # a literal: a constant when dynamic
        before = h.sum() if self.early else 0
        if self.mutate:
            delta.mul_(2)
        w = [[getattr(self, f"{n}_{leaf}") for n in ("gate", "up")] for leaf in ("qweight", "scales", "zeros")]
        out = GLU(x, *w, 32, [None, None]) + before
        y = out.sum(-1, keepdim=True) + h
        return (y, {"hf": hf, "x": x}[self.leak]) if self.leak else y


class _PartialsBlock(_Block):
    """_Block with delta the deferred K sum of a linear on another input, as defer_split_k leaves
    it, the bias of `bias_dtype`."""

    def __init__(self, bias_dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(6)
        qw = quantize(torch.randn(K, K), 32, scale_dtype=torch.bfloat16)
        for leaf in ("qweight", "scales", "zeros"):
            self.register_buffer(f"o_{leaf}", getattr(qw, leaf))
        self.register_buffer("o_bias", torch.randn(K).to(bias_dtype))
        self.weight = torch.nn.Parameter(self.weight.detach().bfloat16())

    def forward(self, residual, attn):
        parts = PARTIALS(attn, self.o_qweight, self.o_scales, self.o_zeros, 32, 2)
        return super().forward(residual, torch.add(parts.sum(0), self.o_bias).to(residual.dtype))


def _run_pass(module, args, applies=None, dynamic=False, prepare=None):
    """Compile `module` with a backend that runs fuse_add_rms_norm on dynamo's graph (after
    `prepare(gm, example_inputs)`); returns (outputs, the number fused, the graphs)."""
    fused, graphs = [], []

    def backend(gm, example_inputs):
        if prepare is not None:
            prepare(gm, example_inputs)
        fused.append(fuse_add_rms_norm(gm, applies))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return out, sum(fused), graphs


def _block_args():
    torch.manual_seed(3)
    return [torch.randn(2, 1, K), torch.randn(2, 1, K)]


def test_pass_fuses_the_block_bit_for_bit():
    seen = []

    def applies(*a):
        seen.append(a)
        return True

    module = _Block()
    want = module(*_block_args())
    got, fused, _ = _run_pass(module, _block_args(), applies)
    assert fused == 1 and torch.equal(got, want)
    kind, x, qweights, g, head_dim = seen[0]
    assert (kind, tuple(x.shape), [tuple(q.shape) for q in qweights], g, head_dim) == (
        "glu", (2, 1, K), [(48, K // 2)] * 2, 32, 0)


def _weight_as_constant(gm, example_inputs):
    """What rewrite_for_serving does to a folded norm weight: a get_attr of a new buffer, with
    no example value."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph = next(n for n in phs if n.target.endswith("_weight_"))
    gm.register_buffer("awq_tensor_weight", example_inputs[phs.index(ph)].detach().clone())
    with gm.graph.inserting_before(phs[-1].next):
        ph.replace_all_uses_with(gm.graph.get_attr("awq_tensor_weight"))
    gm.recompile()


def test_pass_reads_a_constant_norm_weight():
    module = _Block()
    want = module(*_block_args())
    got, fused, graphs = _run_pass(module, _block_args(), lambda *a: True, prepare=_weight_as_constant)
    call = next(n for n in graphs[0].graph.nodes if n.target is GLU_NORM)
    assert fused == 1 and call.args[3].op == "get_attr" and torch.equal(got, want)


@pytest.mark.parametrize("leak,early,mutate", [("hf", False, False), ("x", False, False), ("", True, False),
                                               ("", False, True)], ids=["hf-read", "x-read", "h-read-early",
                                                                        "delta-written"])
def test_pass_leaves_what_it_cannot_move(leak, early, mutate):
    """Another reader of an intermediate, a reader of h before the projection (it would read h
    before the call makes it), or an in-place write of an input between the add and the
    projection: not fused, and the graph computes what the module does."""
    module = _Block(leak, early, mutate)
    want = module(*_block_args())
    got, fused, _ = _run_pass(module, _block_args(), lambda *a: True)
    assert fused == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pass_asks_applies_and_the_library_by_default():
    """applies returning False, the default on the CPU (the library's kernel needs a CUDA
    tensor), and an x of dynamic size (the kernel's plan is per size): nothing fused."""
    assert _run_pass(_Block(), _block_args(), lambda *a: False)[1] == 0
    assert _run_pass(_Block(), _block_args())[1] == 0
    assert _run_pass(_Block(), _block_args(), lambda *a: True, dynamic=True)[1] == 0


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_pass_takes_partials_where_the_op_accepts_them(bias_dtype):
    """A bias of residual's dtype goes into the op with the partials; a float32 bias the op
    refuses (it adds a bias of residual's dtype), so the cast sum stays and is the op's delta.
    Bit for bit either way."""
    module = _PartialsBlock(bias_dtype)
    args = [t.bfloat16() for t in _block_args()]
    want = module(*args)
    got, fused, graphs = _run_pass(module, [a.clone() for a in args], lambda *a: True)
    call = next(n for n in graphs[0].graph.nodes if n.target is GLU_NORM)
    assert fused == 1 and torch.equal(got, want)
    if bias_dtype == torch.bfloat16:
        assert call.args[1].target is PARTIALS and call.args[2] is not None
    else:
        assert call.args[1].target == "to" and call.args[2] is None


# ----------------------------------------------------------------------------- a tiny Llama


def _llama(layers=3, bias=False, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=K, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
                      attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return awq_compile.quantize_rtn(model, AWQConfig(group_size=32, compute_dtype=str(dtype)[6:])), cfg


def _same_caches(a, b) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


def _targets(graphs):
    return [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture
def spy(monkeypatch):
    """Forces the norm fusion's `applies` (the backend's default asks the CUDA library) and
    records the graphs the backend serves, as its passes left them."""
    monkeypatch.setattr(importlib.import_module("awq_compile.passes.fuse_add_rms_norm"), "_library_applies",
                        lambda *a: True)
    graphs, serve = [], awq_compile.backend.serve_graph

    def record(state, gm, *args, **kwargs):
        out = serve(state, gm, *args, **kwargs)
        graphs.append(gm)
        return out

    monkeypatch.setattr(awq_compile.backend, "serve_graph", record)
    return graphs


def _compiled_decode(model, cfg, graphs, **options):
    torch._dynamo.reset()
    counters.clear()
    graphs.clear()
    step = torch.compile(model, backend="awq", fullgraph=True, options=options)
    logits, cache = static_cache_decode(model, cfg, step)
    assert counters["awq"]["serve_graphs"] == len(graphs) >= 1
    return logits, cache, counters["awq"]["norms_fused"], list(graphs)


def test_backend_fuses_a_llama_bit_for_bit_eagerly(spy):
    """3 layers, bf16: 2L - 1 = 5 norms fused a graph (layer 0's input norm reads the embedding,
    the final norm feeds lm_head), and the logits and caches bit for bit those of the same graphs
    with the fusion off, for 4 decode steps."""
    model, cfg = _llama()
    want, want_cache, off, plain = _compiled_decode(model, cfg, spy, inductor=False, fuse_norm=False)
    got, got_cache, on, fused = _compiled_decode(model, cfg, spy, inductor=False)
    assert off == 0 and on == 5 * len(fused)
    assert GLU_NORM not in _targets(plain) and ROPE_NORM not in _targets(plain)
    targets = _targets(fused)
    assert [targets.count(t) for t in (GLU_NORM, ROPE_NORM, GLU, ROPE)] == [3 * len(fused), 2 * len(fused), 0,
                                                                            len(fused)]
    assert torch.equal(got, want) and _same_caches(got_cache, want_cache)
    assert got_cache.layers[2].keys[:, :, 4:8].abs().sum() > 0


def _serve_partials(fuse: bool, graphs: list):
    """A backend running the "awq" backend's serving passes on a quantized model's graph, with
    every single linear's K sum deferred (2 slices, as on an H200 at one token) and the norm
    fusion forced on where `fuse`, then the graph eagerly."""
    def backend(gm, example_inputs):
        fuse_gated_mlp(gm)
        fuse_sibling_linears(gm)
        fuse_rope_cache(gm)
        defer_split_k(gm, lambda *a: 2)
        graphs.append((fuse_add_rms_norm(gm, lambda *a: True) if fuse else 0, gm))
        return gm.forward

    return backend


@pytest.mark.parametrize("bias", [False, True])
def test_pass_takes_the_deferred_split_k_sum(bias):
    """Where defer_split_k left `(partials.sum(0) + bias).to(dtype)` before the residual add (o
    and down), the fused op takes the partials and the bias, the sum is gone, and the results
    are bit for bit the unfused graph's."""
    model, cfg = _llama(bias=bias)
    runs = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        graphs = []
        step = torch.compile(model, backend=_serve_partials(fuse, graphs), fullgraph=True)
        runs[fuse] = (*static_cache_decode(model, cfg, step, steps=2), graphs)
    (want, want_cache, _), (got, got_cache, graphs) = runs[False], runs[True]
    assert all(n == 5 for n, _ in graphs)
    for _, gm in graphs:
        calls = [n for n in gm.graph.nodes if n.target in (GLU_NORM, ROPE_NORM)]
        assert all(c.args[1].target is PARTIALS for c in calls)
        assert all((c.args[2] is not None) == bias for c in calls)
        sums = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "sum"]
        assert len(sums) == 1  # the last layer's down projection, read by the final norm
    assert torch.equal(got, want) and _same_caches(got_cache, want_cache)


def test_backend_with_inductor(spy, monkeypatch):
    """With inductor (and the K sums deferred): the fused graphs within bf16 rounding of the
    unfused ones run eagerly."""
    monkeypatch.setattr(importlib.import_module("awq_compile.passes.defer_split_k"), "_library_slices",
                        lambda *a: 2)
    model, cfg = _llama()
    want, want_cache, _, _ = _compiled_decode(model, cfg, spy, inductor=False, fuse_norm=False)
    got, got_cache, on, fused = _compiled_decode(model, cfg, spy)
    assert on == 5 * len(fused) and counters["awq"]["split_k_deferred"] == 6 * len(fused)
    assert _rel(got, want) < 1e-2
    for a, b in zip(got_cache.layers, want_cache.layers):
        assert _rel(a.keys, b.keys) < 1e-2 and _rel(a.values, b.values) < 1e-2


def test_backend_fuses_smollm2_bit_for_bit(smollm2_decode, spy):
    """The real SmolLM2-135M (30 layers), RTN INT4, batch 2 decoding real text with a static
    cache, served eagerly: 2 * 30 - 1 = 59 norms fused a graph, and the logits and caches bit for
    bit those of the same graphs with the fusion off."""
    q, decode = smollm2_decode
    want, want_cache = decode({"fuse_norm": False}, 2)
    off = counters["awq"]["norms_fused"]
    spy.clear()
    got, got_cache = decode({"fuse_norm": True}, 2)
    on, graphs = counters["awq"]["norms_fused"], len(spy)
    assert off == 0 and on == (2 * q.config.num_hidden_layers - 1) * graphs == 59 * graphs
    assert torch.equal(got, want) and _same_caches(got_cache, want_cache)
