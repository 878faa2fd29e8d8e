"""awq::int4_linear_rope_cache and the pass fuse_rope_cache: the op against float64 (q rotated, k
rotated and v written into the caches at the positions, nothing else touched), its fake and
errors (CPU); which graphs the pass rewrites; the backend's option and counter on a tiny Llama
decoding with a static cache, eager and with inductor; and on CUDA, the kernel against float64 and
the backend end to end."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from awq_compile.ops import rotate_heads
from awq_compile.quant import dequantize, quantize
from conftest import decode_option_ab, smollm2_option_ab, static_cache_decode
from passes import fuse_rope_cache

ROPE = torch.ops.awq.int4_linear_rope_cache.default
MULTI = torch.ops.awq.int4_linear_multi.default


def _block(hq=4, hkv=2, d=16, k=64, g=32, bias=False, seed=0):
    """q/k/v weights of an attention block (GQA: hkv heads of k and v) and their biases."""
    torch.manual_seed(seed)
    qws = [quantize(torch.randn(h * d, k), g) for h in (hq, hkv, hkv)]
    biases = [torch.randn(h * d) if bias else None for h in (hq, hkv, hkv)]
    return qws, biases


def _cos_sin(b, s, d, start=3, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(start, start + s, dtype=torch.float64)[:, None] * inv
    emb = torch.cat((ang, ang), -1)[None, None].expand(b, 1, s, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _reference64(x, qws, biases, g, cos, sin, pos, k_cache, v_cache, hq, hkv, d):
    """q (as [B, S, hq * d]) and the caches after the writes, in float64 from the dequantized weights."""
    b, s, k = x.shape
    ys = []
    for qw, bias in zip(qws, biases):
        y = x.double() @ dequantize(qw.qweight, qw.scales, qw.zeros, g, k, torch.float64).T
        ys.append(y if bias is None else y + bias.double())
    c, sn = cos.double(), sin.double()
    q = rotate_heads(ys[0].view(b, s, hq, d).transpose(1, 2), c, sn)
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kc[:, :, pos] = rotate_heads(ys[1].view(b, s, hkv, d).transpose(1, 2), c, sn)
    vc[:, :, pos] = ys[2].view(b, s, hkv, d).transpose(1, 2)
    return q.transpose(1, 2).reshape(b, s, hq * d), kc, vc


def _args(qws, biases, g):
    return ([q.qweight for q in qws], [q.scales for q in qws], [q.zeros for q in qws], g, biases)


@pytest.mark.parametrize("b,s,cos_rows,bias", [(2, 1, 1, False), (3, 1, 3, True), (2, 4, 1, False), (1, 5, 1, True)])
def test_op_matches_float64(b, s, cos_rows, bias):
    hq, hkv, d, length, g = 4, 2, 16, 12, 32
    qws, biases = _block(hq, hkv, d, bias=bias)
    x = torch.randn(b, s, 64)
    cos, sin = _cos_sin(cos_rows, s, d)
    pos = torch.arange(3, 3 + s)
    k_cache, v_cache = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    want_q, want_k, want_v = _reference64(x, qws, biases, g, cos, sin, pos, k_cache, v_cache, hq, hkv, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = ROPE(x, *_args(qws, biases, g), cos, sin, pos, k_cache, v_cache)
    assert q.shape == (b, s, hq * d) and q.dtype == x.dtype
    for got, want in ((q, want_q), (k_cache, want_k), (v_cache, want_v)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-6
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(k_cache[:, :, untouched], before_k[:, :, untouched])
    assert torch.equal(v_cache[:, :, untouched], before_v[:, :, untouched])


def test_op_is_the_unfused_graph_bit_for_bit_in_bf16():
    """The reference is the eager graph it replaces: multi, view/transpose, rotate, index_copy_."""
    hq, hkv, d, g = 4, 2, 16, 32
    qws, biases = _block(hq, hkv, d)
    x = torch.randn(2, 1, 64).bfloat16()
    cos, sin = (t.bfloat16() for t in _cos_sin(1, 1, d))
    pos = torch.tensor([5])
    kc, vc = torch.zeros(2, hkv, 8, d, dtype=torch.bfloat16), torch.zeros(2, hkv, 8, d, dtype=torch.bfloat16)
    kc2, vc2 = kc.clone(), vc.clone()
    scales = [q.scales.bfloat16() for q in qws]
    args = ([q.qweight for q in qws], scales, [q.zeros for q in qws], g, biases)
    got = ROPE(x, *args, cos, sin, pos, kc, vc)
    yq, yk, yv = MULTI(x, *args)
    heads = lambda t, h: t.view(2, 1, h, d).transpose(1, 2)  # noqa: E731
    kc2.index_copy_(2, pos, rotate_heads(heads(yk, hkv), cos, sin))
    vc2.index_copy_(2, pos, heads(yv, hkv))
    want = rotate_heads(heads(yq, hq), cos, sin).transpose(1, 2).reshape(2, 1, hq * d)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_op_opcheck_and_errors():
    qws, biases = _block()
    x = torch.randn(2, 1, 64)
    cos, sin = _cos_sin(1, 1, 16)
    pos = torch.tensor([3])
    caches = (torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16))
    torch.library.opcheck(ROPE, (x, *_args(qws, biases, 32), cos, sin, pos, *caches))
    with pytest.raises(ValueError, match=r"int4_linear_rope_cache: takes 3 weights \(q, k, v\), got 2"):
        ROPE(x, *[a[:2] if isinstance(a, list) else a for a in _args(qws, biases, 32)], cos, sin, pos, *caches)
    with pytest.raises(ValueError, match=r"cos must be \[batch or 1, 1, tokens, head dim\] of x's dtype"):
        ROPE(x, *_args(qws, biases, 32), cos.double(), sin, pos, *caches)
    with pytest.raises(ValueError, match=r"the caches must have x's dtype"):
        ROPE(x, *_args(qws, biases, 32), cos, sin, pos, *(c.half() for c in caches))
    with pytest.raises(ValueError, match=r"whole heads of the caches' head dim"):
        ROPE(x, *_args(qws, biases, 32), cos, sin, pos, torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8, 16))
    with pytest.raises(ValueError, match=r"cache_position must be int64 \[tokens\]"):
        ROPE(x, *_args(qws, biases, 32), cos, sin, pos.int(), *caches)
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, K\]"):
        ROPE(x[0], *_args(qws, biases, 32), cos, sin, pos, *caches)


# ----------------------------------------------------------------------------- the pass


class _Attention(torch.nn.Module):
    """q/k/v as one int4_linear_multi call, Llama's rotary embedding and a static cache's writes,
    written as transformers writes them; `leak` also returns k_embed (a second reader),
    `read_between` reads the v cache between the two writes."""

    def __init__(self, leak: bool = False, read_between: bool = False):
        super().__init__()
        qws, _ = _block()
        self.leak, self.read_between = leak, read_between
        for name, qw in zip("qkv", qws):
            for leaf in ("qweight", "scales", "zeros"):
                self.register_buffer(f"{name}_{leaf}", getattr(qw, leaf))

    def forward(self, x, cos, sin, pos, k_cache, v_cache):
        b, s, _ = x.shape
        w = [[getattr(self, f"{n}_{leaf}") for n in "qkv"] for leaf in ("qweight", "scales", "zeros")]
        q, k, v = MULTI(x, *w, 32, [None, None, None])
        q = q.view(b, s, -1, 16).transpose(1, 2)
        k = k.view(b, s, -1, 16).transpose(1, 2)
        v = v.view(b, s, -1, 16).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        early = v_cache[:, :, :4]  # a view, read only between the writes
        q_embed = (q * cos) + (torch.cat((-q[..., 8:], q[..., :8]), dim=-1) * sin)
        k_embed = (k * cos) + (torch.cat((-k[..., 8:], k[..., :8]), dim=-1) * sin)
        k_cache.index_copy_(2, pos, k_embed)
        old = early.sum() if self.read_between else 0
        v_cache.index_copy_(2, pos, v)
        key = k_cache.repeat_interleave(2, dim=1)
        value = v_cache.repeat_interleave(2, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q_embed, key, value) + old
        return (out, k_embed) if self.leak else out


def _run_pass(module, args):
    """Compile `module` with a backend that runs fuse_rope_cache on dynamo's graph; returns
    (outputs, the number fused)."""
    fused = []

    def backend(gm, example_inputs):
        fused.append(fuse_rope_cache(gm))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(*args)
    return out, sum(fused)


def _attention_args():
    torch.manual_seed(3)
    cos, sin = (t[:, 0] for t in _cos_sin(1, 1, 16))
    return [torch.randn(2, 1, 64), cos, sin, torch.tensor([4]), torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16)]


@pytest.mark.parametrize("leak", [False, True])
def test_pass_fuses_the_block_and_leaves_a_shared_intermediate(leak):
    module = _Attention(leak=leak)
    eager_args, args = _attention_args(), _attention_args()
    want = module(*eager_args)
    got, fused = _run_pass(module, args)
    assert fused == (0 if leak else 1)
    for g, w in zip(got if leak else [got], want if leak else [want]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args[4], eager_args[4], rtol=1e-5, atol=1e-6)  # k cache
    torch.testing.assert_close(args[5], eager_args[5], rtol=1e-5, atol=1e-6)  # v cache
    assert args[4][:, :, 4].abs().sum() > 0 and args[4][:, :, 5:].abs().sum() == 0


def test_pass_leaves_a_cache_read_between_the_writes():
    """A read of the v cache (through a view taken before the writes) between the k and v writes
    would see the write early: not fused."""
    module = _Attention(read_between=True)
    want = module(*_attention_args())
    got, fused = _run_pass(module, _attention_args())
    assert fused == 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("inductor", [False, True])
def test_backend_fuses_a_llama_decoding_with_a_static_cache(inductor):
    """A 2-layer Llama, RTN-quantized: 4 decode steps after a prefill, compiled with the rope fusion
    on (and, by default, the cache counters deferred: defer_cache_counters), against the model run
    eagerly: logits, every layer's caches and counters."""
    import awq_compile
    from awq_compile import AWQConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    awq_compile.backend.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = awq_compile.quantize_rtn(LlamaForCausalLM(cfg).eval(), AWQConfig(group_size=32))

    want, want_cache = static_cache_decode(model, cfg, model)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model, backend="awq", fullgraph=True, options={"inductor": inductor})
    got, got_cache = static_cache_decode(model, cfg, step)
    assert counters["awq"]["rope_fused"] >= cfg.num_hidden_layers
    assert counters["awq"]["counters_deferred"] >= cfg.num_hidden_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_cache.layers, want_cache.layers):
        assert a.cumulative_length.item() == b.cumulative_length.item() == 8
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)


def test_backend_fuses_smollm2_bit_for_bit(smollm2_decode):
    """The real SmolLM2-135M (30 layers, GQA 9 / 3 heads of 64), RTN INT4, batch 2 decoding real
    text with a static cache, served eagerly (inductor=False): every layer's q/k/v, rotary and
    cache writes fused, and the logits and caches bit for bit those of the same graphs with the
    fusion off (the op's reference is the unfused graph, step by step)."""
    q, decode = smollm2_decode
    off, on, got_cache = smollm2_option_ab(decode, "fuse_rope", "rope_fused")
    assert off == 0 and on >= q.config.num_hidden_layers
    assert got_cache.layers[0].keys[:, :, 12:15].abs().sum() > 0


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s,cos_rows,hq,hkv", [(1, 1, 1, 32, 32), (8, 1, 1, 32, 32), (4, 1, 4, 32, 32),
                                                 (2, 3, 1, 64, 16), (4, 1, 4, 8, 2), (2, 3, 1, 8, 2),
                                                 (3, 1, 1, 4, 4)])
def test_cuda_op_matches_float64(dtype, b, s, cos_rows, hq, hkv, cuda_library):
    d, k, g, length = 128, 512, 128, 40
    qws, biases = _block(hq, hkv, d, k=k, g=g, bias=b * s % 2 == 0)  # with bias: the fold epilogue at M = 4, 6, 8
    dev = "cuda"
    x = torch.randn(b, s, k, device=dev).to(dtype)
    cos, sin = (t.to(dev, dtype) for t in _cos_sin(cos_rows, s, d, start=17))
    pos = torch.arange(17, 17 + s, device=dev)
    k_cache = torch.randn(b, hkv, length, d, device=dev).to(dtype)
    v_cache = torch.randn(b, hkv, length, d, device=dev).to(dtype)
    qws = [q._replace(scales=q.scales.to(dtype)) for q in qws]  # the reference reads the scales x uses
    w = ([q.qweight.to(dev) for q in qws], [q.scales.to(dev) for q in qws], [q.zeros.to(dev) for q in qws], g,
         [None if bb is None else bb.to(dev, dtype) for bb in biases])
    want_q, want_k, want_v = _reference64(x.cpu(), qws, [None if bb is None else bb.cpu() for bb in w[4]], g,
                                          cos.cpu(), sin.cpu(), pos.cpu(), k_cache.cpu(), v_cache.cpu(), hq, hkv, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = ROPE(x, *w, cos, sin, pos, k_cache, v_cache)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for got, want in ((q, want_q), (k_cache, want_k), (v_cache, want_v)):
        assert ((got.double().cpu() - want).norm() / want.norm()).item() < tol
    untouched = torch.ones(length, dtype=torch.bool, device=dev)
    untouched[pos] = False
    assert torch.equal(k_cache[:, :, untouched], before_k[:, :, untouched])
    assert torch.equal(v_cache[:, :, untouched], before_v[:, :, untouched])
    # Bit for bit: the projection (int4_linear_multi's kernel) rotated in fp32 and rounded once,
    # whether the folded GEMV's epilogue did it (q/k/v of 12288 rows here) or awq_rope_cache.
    yq, yk, yv = MULTI(x, *w)
    rot = lambda y, h: rotate_heads(y.float().view(b, s, h, d).transpose(1, 2), cos.float(), sin.float())  # noqa: E731
    assert torch.equal(q, rot(yq, hq).transpose(1, 2).reshape(b, s, hq * d).to(dtype))
    assert torch.equal(k_cache[:, :, pos], rot(yk, hkv).to(dtype))
    assert torch.equal(v_cache[:, :, pos], yv.view(b, s, hkv, d).transpose(1, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("b", [1, 2, 8, 11, 16])
def test_cuda_fold_epilogue_is_the_two_launches(b, cuda_library, monkeypatch):
    """7B's q/k/v: the folded GEMV with the rotation and cache writes in its epilogue against
    int4_linear_multi + awq_rope_cache: bit for bit at M = 2..16 (two token tiles above 8), where
    that projection is the same folded GEMV; within bf16 rounding at one token, where it is the
    CUDA-core GEMV."""
    from awq_compile import _cuda

    hq, hkv, d, k, g = 32, 32, 128, 4096, 128
    qws, biases = _block(hq, hkv, d, k=k, g=g, seed=4)
    dev, dt = "cuda", torch.bfloat16
    w = ([q.qweight.to(dev) for q in qws], [q.scales.to(dev, dt) for q in qws], [q.zeros.to(dev) for q in qws], g,
         [None, None, None])
    x = torch.randn(b, 1, k, device=dev, dtype=dt)
    cos, sin = (t.to(dev, dt) for t in _cos_sin(1, 1, d, start=9))
    pos = torch.tensor([9], device=dev)
    if torch.cuda.get_device_capability()[0] >= 9:  # K slices summed in a cluster or not split there
        assert _cuda._fold_rope_applies(x, w[0], g, d)
    one = [torch.zeros(b, hkv, 12, d, device=dev, dtype=dt) for _ in range(2)]
    two = [torch.zeros(b, hkv, 12, d, device=dev, dtype=dt) for _ in range(2)]
    q1 = ROPE(x, *w, cos, sin, pos, *one)
    monkeypatch.setattr(_cuda, "_fold_rope_applies", lambda *a: False)
    q2 = ROPE(x, *w, cos, sin, pos, *two)
    if b > 1:
        assert torch.equal(q1, q2) and torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    else:
        for got, want in ((q1, q2), (one[0], two[0]), (one[1], two[1])):
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert one[0][:, :, 9].abs().sum() > 0 and one[1][:, :, 9].abs().sum() > 0


@pytest.mark.cuda
def test_cuda_op_opcheck_and_torch_fallback(cuda_library):
    """opcheck on CUDA; a cache that is not contiguous takes the torch path, with the same values."""
    hq, hkv, d, k, g = 8, 2, 128, 256, 128
    qws, _ = _block(hq, hkv, d, k=k, g=g)
    dev, dt = "cuda", torch.bfloat16
    w = ([q.qweight.to(dev) for q in qws], [q.scales.to(dev, dt) for q in qws], [q.zeros.to(dev) for q in qws], g,
         [None, None, None])
    x = torch.randn(2, 1, k, device=dev, dtype=dt)
    cos, sin = (t.to(dev, dt) for t in _cos_sin(1, 1, d))
    pos = torch.tensor([5], device=dev)
    caches = [torch.zeros(2, hkv, 16, d, device=dev, dtype=dt) for _ in range(2)]
    torch.library.opcheck(ROPE, (x, *w, cos, sin, pos, *caches))
    fast = [torch.zeros(2, hkv, 16, d, device=dev, dtype=dt) for _ in range(2)]
    slow = [torch.zeros(16, hkv, 2, d, device=dev, dtype=dt).permute(2, 1, 0, 3) for _ in range(2)]
    q_fast = ROPE(x, *w, cos, sin, pos, *fast)
    q_slow = ROPE(x, *w, cos, sin, pos, *slow)
    assert torch.equal(q_fast, q_slow)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_backend_decode_with_rope_fusion(batch, cuda_library, cuda_llama_decode):
    """A 2-layer Llama of 7B's widths on CUDA, bf16, CUDA graphs (batch 8: the folded GEMV's rope
    epilogue; batch 1: the CUDA-core GEMV and awq_rope_cache): the fused decode against the same
    model with the fusion off (teacher-forced tokens), logits and caches."""
    cfg, run = cuda_llama_decode
    off, on, err = decode_option_ab(run, batch, "fuse_rope", "rope_fused")
    assert off == 0 and on >= cfg.num_hidden_layers
    assert err < 2e-2
