"""The CUDA kernel of `awq::decode_attention` (csrc/decode_attention.cu) against a float64
reference of softmax(scale * q k^T + mask) v.

Covers multi-head and grouped-query attention (up to 8 query rows a KV head, query tokens > 1
too), head dims 64 and 128, fp16 and bf16, boolean, additive (q's dtype, fp32) and absent masks in
their broadcast forms, lengths from 1 to past a tile, the cluster split forced to each size,
non-contiguous q, and the fallbacks. Masked cache positions hold NaN in these tests: the kernel
must not read them. Output memory is filled with NaN before each call (the caching allocator
hands the same block back), so an element the kernel does not write fails. Needs a CUDA GPU and
the built library.
"""

from __future__ import annotations

import math

import pytest
import torch

from awq_compile import ops  # noqa: F401  (registers the ops)
from conftest import assert_graph_replays, attention_reference as reference, decode_option_ab, rel_err as _rel

cuda_mod = pytest.importorskip("awq_compile._cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
]


def _poisoned_call(q, k, v, mask, scale, gqa):
    """The op, after a NaN tensor of the output's size was freed (the allocator reuses it)."""
    torch.full((*q.shape[:3], v.shape[3]), float("nan"), dtype=q.dtype, device=q.device)
    return torch.ops.awq.decode_attention(q, k, v, mask, scale, gqa)


def _case(b, hq, hkv, s, length, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, s, d, device="cuda", generator=gen).to(dtype)
    k = torch.randn(b, hkv, length, d, device="cuda", generator=gen).to(dtype)
    v = torch.randn(b, hkv, length, d, device="cuda", generator=gen).to(dtype)
    valid = torch.randint(1, length + 1, (b,), device="cuda", generator=gen)  # a static cache's filled part
    keep = torch.arange(length, device="cuda")[None, None, None, :] < valid[:, None, None, None]
    return q, k, v, keep.expand(b, 1, s, length)


def _poison_masked(k, v, keep):
    """NaN at every cache position no query row of its batch row attends to."""
    unused = ~keep.any(dim=(1, 2))  # [B, L]
    k[unused[:, None, :, None].expand_as(k)] = float("nan")
    v[unused[:, None, :, None].expand_as(v)] = float("nan")


SHAPES = [  # B, Hq, Hkv, S, L, D
    (1, 32, 32, 1, 384, 128),   # Llama-2-7B, batch 1, the benchmark's cache
    (8, 32, 32, 1, 384, 128),   # batch 8
    (3, 32, 8, 1, 1000, 128),   # grouped-query attention, G = 4
    (2, 8, 1, 1, 77, 64),       # G = 8, head dim 64
    (2, 16, 4, 2, 300, 128),    # two query tokens, 8 rows a KV head
    (1, 4, 4, 3, 3000, 64),     # three query tokens, two tiles a block
    (2, 2, 2, 1, 1, 128),       # one position
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"b{s[0]}h{s[1]}kv{s[2]}s{s[3]}l{s[4]}d{s[5]}" for s in SHAPES])
def test_bool_mask_against_float64(shape, dtype):
    b, hq, hkv, s, length, d = shape
    q, k, v, keep = _case(b, hq, hkv, s, length, d, dtype)
    assert cuda_mod.decode_attention_applies(q, k, v, keep)
    _poison_masked(k, v, keep)
    got = _poisoned_call(q, k, v, keep, d ** -0.5, hq != hkv)
    assert got.shape == (b, hq, s, d) and got.is_contiguous() and got.dtype == dtype
    assert torch.isfinite(got).all()
    assert _rel(got, reference(q, k, v, keep, d ** -0.5)) < 8e-3


@pytest.mark.parametrize("kind", ["additive_T", "additive_fp32", "none", "bool_2d", "bool_per_head"])
def test_mask_kinds_and_broadcasts(kind):
    b, hq, hkv, s, length, d = 2, 8, 4, 2, 200, 128
    q, k, v, keep = _case(b, hq, hkv, s, length, d, torch.bfloat16, seed=3)
    gen = torch.Generator(device="cuda").manual_seed(4)
    bias = torch.randn(b, 1, s, length, device="cuda", generator=gen)
    if kind == "additive_T":
        mask = torch.where(keep, bias, -math.inf).to(torch.bfloat16)
        _poison_masked(k, v, keep)
    elif kind == "additive_fp32":
        mask = torch.where(keep, bias, -math.inf)
        _poison_masked(k, v, keep)
    elif kind == "none":
        mask = None
    elif kind == "bool_2d":  # [S, L]: the same for every batch row and head
        mask = torch.rand(s, length, device="cuda", generator=gen) > 0.3
    else:  # [B, Hq, S, L]: another mask per query head
        mask = torch.rand(b, hq, s, length, device="cuda", generator=gen) > 0.5
    got = _poisoned_call(q, k, v, mask, 0.1, True)
    assert torch.isfinite(got).all()
    assert _rel(got, reference(q, k, v, mask, 0.1)) < 8e-3


@pytest.mark.parametrize("splits", range(1, 9))
def test_every_cluster_split(splits, monkeypatch):
    """$AWQ_ATTN_SPLITS forces how many blocks share a (batch, KV head)'s positions (a cluster of
    that size on sm_90): every size gives the reference."""
    monkeypatch.setenv("AWQ_ATTN_SPLITS", str(splits))
    q, k, v, keep = _case(3, 32, 32, 1, 384, 128, torch.bfloat16, seed=5)
    _poison_masked(k, v, keep)
    got = _poisoned_call(q, k, v, keep, 128 ** -0.5, False)
    assert _rel(got, reference(q, k, v, keep, 128 ** -0.5)) < 8e-3


EIGHT_WARP_CASES = [  # (B, Hq, Hkv, S, L, D), $AWQ_ATTN_SPLITS: every grid fits in one wave at 2 blocks a SM
    ((8, 32, 32, 1, 384, 128), ""), ((1, 32, 32, 1, 384, 128), ""), ((1, 32, 32, 1, 384, 128), "8"),
    ((2, 8, 4, 1, 1000, 64), ""), ((2, 8, 4, 1, 1000, 64), "3"), ((3, 16, 16, 2, 300, 128), "5"),
]


@pytest.mark.parametrize("threads", ["", "128"], ids=["eight_warps", "four_warps"])
@pytest.mark.parametrize("shape,splits", EIGHT_WARP_CASES,
                         ids=["b8_7b", "b1_7b", "b1_7b_split8", "gqa2_d64", "gqa2_d64_split3", "s2_split5"])
def test_eight_warp_blocks(shape, splits, threads, monkeypatch):
    """Blocks of 8 warps (the default where a block has at most 2 query rows, 1 or 2 here, and the
    grid fits in one wave), and of 4 with $AWQ_ATTN_THREADS=128, with the library's split and
    forced ones: the reference, masked positions unread."""
    if threads:
        monkeypatch.setenv("AWQ_ATTN_THREADS", threads)
    else:
        monkeypatch.delenv("AWQ_ATTN_THREADS", raising=False)
    if splits:
        monkeypatch.setenv("AWQ_ATTN_SPLITS", splits)
    b, hq, hkv, s, length, d = shape
    q, k, v, keep = _case(b, hq, hkv, s, length, d, torch.bfloat16, seed=7)
    _poison_masked(k, v, keep)
    got = _poisoned_call(q, k, v, keep, d ** -0.5, hq != hkv)
    assert torch.isfinite(got).all()
    assert _rel(got, reference(q, k, v, keep, d ** -0.5)) < 8e-3


def test_fully_masked_row_is_zero():
    q, k, v, keep = _case(2, 4, 4, 1, 50, 128, torch.float16, seed=6)
    keep = keep.clone()
    keep[1] = False
    got = _poisoned_call(q, k, v, keep, 0.3, False)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert _rel(got[0], reference(q, k, v, keep, 0.3)[0]) < 8e-3


def test_non_contiguous_q_and_cache_views():
    """q as transformers makes it ([B, S, H, D] transposed) and k, v as slices of a longer cache."""
    b, h, s, length, d = 2, 8, 2, 96, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(b, s, h, d, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    big_k = torch.randn(b, h, 2 * length, d, device="cuda", generator=gen).to(torch.bfloat16)
    big_v = torch.randn(b, h, 2 * length, d, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = big_k[:, :, :length], big_v[:, :, :length]
    got = _poisoned_call(q, k, v, None, None, False)
    assert _rel(got, reference(q, k, v, None, d ** -0.5)) < 8e-3


@pytest.mark.parametrize("case", ["head_dim_96", "rows_16", "fp32", "q_rows_not_16_bytes", "long_cache"])
def test_falls_back_to_torch(case):
    """Tensors the kernel does not take get torch's attention, the same values."""
    b, hq, hkv, s, length, d, dtype = 2, 8, 8, 1, 64, 128, torch.bfloat16
    if case == "head_dim_96":
        d = 96
    elif case == "rows_16":
        hq, hkv, s = 16, 1, 1
    elif case == "fp32":
        dtype = torch.float32
    elif case == "long_cache":  # more rounds a block than ATTENTION_MAX_ROUNDS
        hq, hkv, length = 32, 8, 8192
    q, k, v, keep = _case(b, hq, hkv, s, length, d, dtype, seed=8)
    if case == "q_rows_not_16_bytes":
        q = torch.randn(b, hq, s, d + 4, device="cuda").to(dtype)[..., :d]
        assert cuda_mod.decode_attention_applies(q, k, v, keep)  # by shape; the call checks strides
    else:
        assert not cuda_mod.decode_attention_applies(q, k, v, keep)
    got = torch.ops.awq.decode_attention(q, k, v, keep, None, hq != hkv)
    want = torch.nn.functional.scaled_dot_product_attention(q.contiguous(), k, v, attn_mask=keep, enable_gqa=hq != hkv)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_opcheck_on_cuda():
    q, k, v, keep = _case(2, 8, 4, 1, 40, 64, torch.bfloat16, seed=9)
    torch.library.opcheck(torch.ops.awq.decode_attention.default, (q, k, v, keep, 0.125, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("env", ["", "AWQ_PDL_CLUSTER=8", "AWQ_PDL_TC=0"], ids=["default", "pdl_clusters", "no_tc_pdl"])
@pytest.mark.parametrize("m", [1, 8])
def test_in_a_cuda_graph_between_int4_launches(m, env, monkeypatch):
    """projection -> attention -> projection captured in a CUDA graph, the attention launched
    plainly and (one block a head, M = 1) with programmatic dependent launch, its input and output
    filled with NaN before each replay: each replay equals the chain run eagerly without PDL.
    $AWQ_PDL_CLUSTER=8 launches the attention's clusters with it as well. By default the
    projection after the attention at M = 8 (the tc kernel, whose weights load before its wait)
    launches with PDL too, $AWQ_PDL_TC=0 plainly."""
    if env:
        monkeypatch.setenv(*env.split("="))
    g, hidden = 128, 4096
    gen = torch.Generator(device="cuda").manual_seed(10)
    w = (torch.randint(0, 256, (hidden, hidden // 2), dtype=torch.uint8, device="cuda", generator=gen),
         (torch.rand((hidden, hidden // g), device="cuda", generator=gen) * 0.002 + 0.0005).to(torch.bfloat16),
         torch.randint(0, 16, (hidden, hidden // g), dtype=torch.uint8, device="cuda", generator=gen))
    k = torch.randn(m, 32, 384, 128, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(m, 32, 384, 128, device="cuda", generator=gen).to(torch.bfloat16)
    keep = (torch.arange(384, device="cuda") < 200).expand(m, 1, 1, 384)
    x = torch.randn(m, 1, hidden, device="cuda", generator=gen).to(torch.bfloat16)

    def chain():
        qh = torch.ops.awq.int4_linear(x, *w, g, None)
        att = torch.ops.awq.decode_attention(qh.view(m, 1, 32, 128).transpose(1, 2), k, v, keep, None, False)
        return qh, att, torch.ops.awq.int4_linear(att.transpose(1, 2).reshape(m, 1, hidden), *w, g, None)

    for splits in ("1", ""):
        with monkeypatch.context() as mp:
            mp.setenv("AWQ_PDL", "0")
            if splits:
                mp.setenv("AWQ_ATTN_SPLITS", splits)
            want = chain()
        assert all(torch.isfinite(t).all() for t in want)
        with monkeypatch.context() as mp:
            if splits:
                mp.setenv("AWQ_ATTN_SPLITS", splits)
            assert_graph_replays(chain, want, f"splits={splits or 'auto'}")


def test_cuda_backend_swaps_attention_in_a_dynamic_batch_graph(cuda_library, cuda_llama_decode, monkeypatch):
    """Batch 1, then batch 8 without resetting dynamo: dynamo traces the second graph with a
    symbolic batch, and the pass still swaps every layer's attention (sizes at their hints; the
    op checks the real ones per call). Logits and caches as a fresh static batch-8 decode's."""
    from torch._dynamo.utils import counters

    from awq_compile import _cuda

    cfg, run = cuda_llama_decode
    want, want_cache = run(8, {})
    run(1, {})
    symbolic, applies = [], _cuda.decode_attention_applies

    def spy(q, k, v, mask):
        symbolic.append(any(type(x) is not int for x in q.shape))
        return applies(q, k, v, mask)

    monkeypatch.setattr(_cuda, "decode_attention_applies", spy)
    got, got_cache = run(8, {}, reset=False)
    assert any(symbolic)  # the pass saw a dynamic-shape graph
    assert counters["awq"]["attention_swapped"] == cfg.num_hidden_layers
    errs = [_rel(got, want)] + [_rel(getattr(a, n), getattr(b, n)) for a, b in zip(got_cache.layers, want_cache.layers)
                                for n in ("keys", "values")]
    assert max(errs) < 2e-2


@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_backend_decode_with_decode_attention(batch, cuda_library, cuda_llama_decode):
    """A 2-layer Llama of 7B's widths on CUDA, bf16, CUDA graphs: the decode with the attention
    swapped (one decode_attention call a layer) against torch's attention (teacher-forced
    tokens): logits and caches within bf16 rounding (layer 1's k and v come from layer 0's
    attention)."""
    cfg, run = cuda_llama_decode
    off, on, err = decode_option_ab(run, batch, "decode_attention", "attention_swapped")
    assert off == 0 and on == cfg.num_hidden_layers
    assert err < 2e-2
