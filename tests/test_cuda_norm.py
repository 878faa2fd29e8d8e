"""The residual add + RMSNorm made in the folded GEMV's x staging: awq::int4_linear_glu_norm and
awq::int4_linear_rope_cache_norm on CUDA (csrc/int4_gemv_fold.cu, stage_x_norm), against float64
and against the unfused CUDA path (add_rms_norm in torch ops, then the projection's op).

Needs a CUDA GPU and the built library; skipped otherwise. h (the residual stream) must be bit
for bit the torch ops' h; the outputs may differ from the unfused path where a token's sum of
h^2, added in another order, moves x by one rounding step, so those compare within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awq_compile import ops
from awq_compile.quant import dequantize
from conftest import decode_option_ab, rel_err as _rel

cuda_mod = pytest.importorskip("awq_compile._cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
]

GLU = torch.ops.awq.int4_linear_glu_norm.default
ROPE = torch.ops.awq.int4_linear_rope_cache_norm.default
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 3e-3}
EPS = 1e-5


def _weights(k, ns, dtype, seed, bias):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qws, ss, zs, bs = [], [], [], []
    for n in ns:
        qws.append(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda", generator=gen))
        zs.append(torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda", generator=gen))
        ss.append((torch.rand((n, k // 128), device="cuda", generator=gen) * 0.02 + 0.002).to(dtype))
        bs.append(torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None)
    return qws, ss, zs, bs


def _norm_inputs(shape, dtype, form, seed):
    """residual, delta, delta_bias, norm_weight: delta of residual's dtype ("t"), or float32 partials
    of 2 K slices without ("p") or with ("pb") the linear's bias."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = shape[-1]
    residual = (torch.randn(shape, device="cuda", generator=gen) * 3).to(dtype)
    if form == "t":
        delta, bias = torch.randn(shape, device="cuda", generator=gen).to(dtype), None
    else:
        delta = torch.randn((2, *shape), device="cuda", generator=gen)
        bias = torch.randn(k, device="cuda", generator=gen).to(dtype) if form == "pb" else None
    weight = (torch.rand(k, device="cuda", generator=gen) + 0.5).to(dtype)
    return residual, delta, bias, weight


def _x64(h, weight):
    """The norm of h (the torch ops' h, bit for bit the kernel's) in float64, unrounded."""
    hd = h.double()
    return weight.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS)


def _lin64(x64, qw, s, z, b):
    y = x64 @ dequantize(qw, s, z, 128, x64.shape[-1], dtype=torch.float64).T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype,k,n", [(torch.bfloat16, 4096, 11008), (torch.float16, 1024, 6144)],
                         ids=["bf16-7B", "fp16"])
@pytest.mark.parametrize("form", ["t", "p", "pb"])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_glu_norm_kernel(dtype, k, n, form, m, monkeypatch):
    """Pair mode with the norm in its staging (M = 1..8, one weight pair of 7B's gate/up; the
    dispatch takes it at M = 1 only, NORM_MAX_M, raised here to test the kernel): h bit for bit
    the torch ops'; the output within rounding of float64 and of the unfused path."""
    monkeypatch.setattr(cuda_mod, "NORM_MAX_M", 8)
    qws, ss, zs, bs = _weights(k, (n, n), dtype, seed=m, bias=form == "pb")
    residual, delta, dbias, weight = _norm_inputs((m, 1, k), dtype, form, seed=10 + m)
    assert cuda_mod.fused_norm_applies("glu", residual, qws, 128)
    out, h = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
    want_h, x = ops.add_rms_norm(residual, delta, dbias, weight, EPS)
    assert torch.equal(h, want_h)
    x64 = _x64(want_h, weight)
    gate, up = (_lin64(x64, qws[i], ss[i], zs[i], bs[i]) for i in range(2))
    assert _rel(out, F.silu(gate) * up) < TOL[dtype]
    unfused = torch.ops.awq.int4_linear_glu.default(x, qws, ss, zs, 128, bs)
    assert _rel(out, unfused) < TOL[dtype] / 4
    again, h2 = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
    assert torch.equal(again, out) and torch.equal(h2, h)


@pytest.mark.parametrize("ks,cluster", [("3", "1"), ("12", "0")])
def test_glu_norm_k_slices(ks, cluster, monkeypatch):
    """K cut in 3 slices summed in a cluster: the tokens' sums of h^2 are added across the
    cluster too; 12 slices through the workspace: not fused (the op's torch norm, same values as
    the unfused path bit for bit)."""
    monkeypatch.setattr(cuda_mod, "NORM_MAX_M", 8)
    monkeypatch.setenv("AWQ_FOLD_KS", ks)
    monkeypatch.setenv("AWQ_FOLD_CLUSTER", cluster)
    k, n, dtype = 3072, 6144, torch.bfloat16
    qws, ss, zs, bs = _weights(k, (n, n), dtype, seed=3, bias=False)
    for m in (1, 8):
        residual, delta, dbias, weight = _norm_inputs((m, 1, k), dtype, "p", seed=m)
        fused = cuda_mod.fused_norm_applies("glu", residual, qws, 128)
        if torch.cuda.get_device_capability()[0] >= 9:
            assert fused == (cluster == "1")
        out, h = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
        want_h, x = ops.add_rms_norm(residual, delta, dbias, weight, EPS)
        assert torch.equal(h, want_h)
        unfused = torch.ops.awq.int4_linear_glu.default(x, qws, ss, zs, 128, bs)
        if fused:
            x64 = _x64(want_h, weight)
            gate, up = (_lin64(x64, qws[i], ss[i], zs[i], bs[i]) for i in range(2))
            assert _rel(out, F.silu(gate) * up) < TOL[dtype]
            assert _rel(out, unfused) < TOL[dtype] / 4
        else:
            assert torch.equal(out, unfused)


def _rope_args(b, hq, hkv, d, length, dtype, pos0):
    cos = torch.randn(1, 1, 1, d, device="cuda").to(dtype)
    sin = torch.randn(1, 1, 1, d, device="cuda").to(dtype)
    pos = torch.tensor([pos0], device="cuda")
    caches = [torch.zeros(b, hkv, length, d, device="cuda", dtype=dtype) for _ in range(2)]
    return cos, sin, pos, caches


@pytest.mark.parametrize("b,hq,hkv", [(1, 32, 32), (2, 32, 32), (8, 32, 32), (1, 32, 8), (4, 32, 8)],
                         ids=["7B-b1", "7B-b2", "7B-b8", "gqa-b1", "gqa-b4"])
@pytest.mark.parametrize("form", ["t", "pb"])
def test_rope_cache_norm_kernel(b, hq, hkv, form, monkeypatch):
    """q/k/v with the norm in front, the rotation and the cache writes (7B: K slices in a
    cluster at one token; GQA at batch 4 is not the folded GEMV's: the torch norm first), against
    the unfused CUDA path: h bit for bit, q and the caches within bf16 rounding. NORM_MAX_M raised
    to 8 to test the kernel at M = 2..8 too."""
    monkeypatch.setattr(cuda_mod, "NORM_MAX_M", 8)
    d, k, dtype = 128, 4096, torch.bfloat16
    qws, ss, zs, bs = _weights(k, (hq * d, hkv * d, hkv * d), dtype, seed=b, bias=form == "pb")
    residual, delta, dbias, weight = _norm_inputs((b, 1, k), dtype, form, seed=20 + b)
    cos, sin, pos, fused_caches = _rope_args(b, hq, hkv, d, 16, dtype, 5)
    _, _, _, plain_caches = _rope_args(b, hq, hkv, d, 16, dtype, 5)
    q, h = ROPE(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs, cos, sin, pos, *fused_caches)
    want_h, x = ops.add_rms_norm(residual, delta, dbias, weight, EPS)
    want_q = torch.ops.awq.int4_linear_rope_cache.default(x, qws, ss, zs, 128, bs, cos, sin, pos, *plain_caches)
    assert torch.equal(h, want_h)
    if cuda_mod.fused_norm_applies("rope", residual, qws, 128, d):
        assert _rel(q, want_q) < TOL[dtype] / 4
        for got, want in zip(fused_caches, plain_caches):
            assert _rel(got[:, :, 5], want[:, :, 5]) < TOL[dtype] / 4
            assert got[:, :, :5].abs().sum() == 0 and got[:, :, 6:].abs().sum() == 0
    else:
        assert torch.equal(q, want_q)
        assert all(torch.equal(g, w) for g, w in zip(fused_caches, plain_caches))
    if (b, hq, hkv) == (1, 32, 32) and torch.cuda.get_device_capability()[0] >= 9:
        assert cuda_mod.fused_norm_applies("rope", residual, qws, 128, d)  # the 7B decode case


@pytest.mark.parametrize("m", [1, 3, 8])
def test_norm_kernels_lean_loop_bit_equal(m, monkeypatch):
    """The glu and rope kernels with the norm in their staging, the folded GEMV's lean main loop
    against the predicated one ($AWQ_FOLD_LEAN forced both ways; block configuration 0 pinned):
    the same bits in the output, h and the caches (7B's shapes; NORM_MAX_M raised to 8)."""
    monkeypatch.setattr(cuda_mod, "NORM_MAX_M", 8)
    monkeypatch.setenv("AWQ_FOLD_CFG", "0")
    d, k, dtype = 128, 4096, torch.bfloat16
    glu_w = _weights(k, (11008, 11008), dtype, seed=70, bias=False)
    rope_w = _weights(k, (32 * d, 32 * d, 32 * d), dtype, seed=71, bias=True)
    residual, delta, dbias, weight = _norm_inputs((m, 1, k), dtype, "pb", seed=72 + m)
    cos, sin, pos, _ = _rope_args(m, 32, 32, d, 16, dtype, 5)  # cos and sin are random: made once
    got = {}
    for lean in ("0", "1"):
        monkeypatch.setenv("AWQ_FOLD_LEAN", lean)
        caches = [torch.zeros(m, 32, 16, d, device="cuda", dtype=dtype) for _ in range(2)]
        got[lean] = [*GLU(residual, delta, dbias, weight, EPS, *glu_w[:3], 128, glu_w[3]),
                     *ROPE(residual, delta, dbias, weight, EPS, *rope_w[:3], 128, rope_w[3], cos, sin, pos,
                          *caches), *caches]
    for a, b in zip(got["0"], got["1"]):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    x64 = _x64(got["1"][1], weight)
    gate, up = (_lin64(x64, glu_w[0][i], glu_w[1][i], glu_w[2][i], None) for i in range(2))
    assert _rel(got["1"][0], F.silu(gate) * up) < TOL[dtype]


def test_norm_fallback_and_opcheck(monkeypatch):
    """M = 12 (not the folded GEMV's), M = 2 (above NORM_MAX_M), a residual that is a strided
    view, or the rule off: the op's torch norm, bit for bit the unfused path; opcheck on CUDA for
    both ops."""
    k, n, dtype = 1024, 6144, torch.bfloat16
    qws, ss, zs, bs = _weights(k, (n, n), dtype, seed=7, bias=True)
    for shape in ((12, 1, k), (2, 1, k), (1, 1, k)):
        residual, delta, dbias, weight = _norm_inputs(shape, dtype, "t", seed=1)
        if shape[0] == 1:
            residual = torch.cat([residual, residual], -1)[..., :k]  # not contiguous
        out, h = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
        want_h, x = ops.add_rms_norm(residual, delta, dbias, weight, EPS)
        assert torch.equal(h, want_h)
        assert torch.equal(out, torch.ops.awq.int4_linear_glu.default(x, qws, ss, zs, 128, bs))
    monkeypatch.setattr(cuda_mod, "NORM_MAX_M", 8)
    residual, delta, dbias, weight = _norm_inputs((2, 1, k), dtype, "pb", seed=2)
    assert cuda_mod.fused_norm_applies("glu", residual, qws, 128)
    fused, h1 = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
    monkeypatch.setattr(cuda_mod, "fused_norm_applies", lambda *a, **kw: False)
    plain, h2 = GLU(residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs)
    assert torch.equal(h1, h2) and _rel(fused, plain) < TOL[dtype] / 4
    monkeypatch.undo()
    torch.library.opcheck(GLU, (residual, delta, dbias, weight, EPS, qws, ss, zs, 128, bs))
    d, hq, hkv = 128, 8, 2
    rq = _weights(k, (hq * d, hkv * d, hkv * d), dtype, seed=8, bias=False)
    cos, sin, pos, caches = _rope_args(2, hq, hkv, d, 8, dtype, 3)
    torch.library.opcheck(ROPE, (residual, delta, dbias, weight, EPS, *rq[:3], 128, rq[3], cos, sin, pos, *caches))


def test_kernel_rejects_bad_norm_arguments():
    """The library's own checks: a norm with a workspace plan, misaligned tensors, or more than 8
    tokens."""
    import ctypes

    k, n, dtype = 1024, 6144, torch.bfloat16
    qws, ss, zs, bs = _weights(k, (n, n), dtype, seed=9, bias=False)
    residual, delta, dbias, weight = _norm_inputs((2, k), dtype, "t", seed=3)
    h = torch.empty(2, k + 8, device="cuda", dtype=dtype)[:, 1:k + 1]  # misaligned rows
    nm = cuda_mod._AwqNormIn(residual.data_ptr(), delta.data_ptr(), None, None, weight.data_ptr(), h.data_ptr(),
                             0, EPS)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        cuda_mod.gemm_fold_glu(residual, qws, ss, zs, 128, bs, residual.new_empty((2, n)), ctypes.byref(nm))
    residual, delta, dbias, weight = _norm_inputs((9, k), dtype, "t", seed=4)  # two token tiles: no norm
    h = torch.empty_like(residual)
    nm = cuda_mod._AwqNormIn(residual.data_ptr(), delta.data_ptr(), None, None, weight.data_ptr(), h.data_ptr(),
                             0, EPS)
    with pytest.raises(RuntimeError, match="M=9; the norm prologue takes M <= 8"):
        cuda_mod.gemm_fold_glu(residual, qws, ss, zs, 128, bs, residual.new_empty((9, n)), ctypes.byref(nm))


@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_backend_decode_with_norm_fusion(batch, cuda_library, cuda_llama_decode):
    """A 2-layer Llama of 7B's widths on CUDA, bf16, CUDA graphs: the decode with the residual add
    + RMSNorm fused into the gate/up and q/k/v launches against the same model without that
    fusion (teacher-forced tokens): at batch 1, 3 norms fused (layer 0's input norm has no add
    before it), at batch 8 none (NORM_MAX_M); logits and caches within bf16 rounding."""
    cfg, run = cuda_llama_decode
    off, on, err = decode_option_ab(run, batch, "fuse_norm", "norms_fused")
    assert off == 0 and on == (2 * cfg.num_hidden_layers - 1 if batch <= cuda_mod.NORM_MAX_M else 0)
    assert err < 2e-2
