"""The CUDA kernels of awq::int4_linear (csrc/, awq_compile/_cuda.py) against a float64 reference.

Needs a CUDA GPU and the built library (python -m awq_compile.build_kernels); skipped otherwise.
Weights are random packed INT4 (q, z uniform in 0..15, positive scales), including random values
in the padded columns, which the kernels must ignore.
"""

from __future__ import annotations


import pytest
import torch

from awq_compile import ops  # noqa: F401  (registers the op)
from awq_compile.quant import dequantize, padded_k

cuda_mod = pytest.importorskip("awq_compile._cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
]

MS = (1, 2, 3, 7, 16, 17, 64, 118, 256, 1024, 2048)
# (K, N): the K x N list, a K that pads (576, g=128), and odd K for the scalar x path.
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192),
          (576, 1536), (1536, 576), (573, 200)]
TOL = {torch.bfloat16: 6e-3, torch.float16: 1.5e-3}


def _random_weight(k, n, g, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kp = padded_k(k, g)
    qweight = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, device="cuda", generator=gen)
    zeros = torch.randint(0, 16, (n, kp // g), dtype=torch.uint8, device="cuda", generator=gen)
    scales = (torch.rand((n, kp // g), device="cuda", generator=gen) * 0.02 + 0.002).to(dtype)
    bias = torch.randn(n, device="cuda", generator=gen).to(dtype)
    return qweight, scales, zeros, bias


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


_CACHE: dict = {}


def _case(k, n, g, dtype):
    """One weight and its float64 dequantization at a time (the largest is 1.9 GB)."""
    key = (k, n, g, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        torch.cuda.empty_cache()
        qw, s, z, b = _random_weight(k, n, g, dtype, seed=hash(key) % 2**31)
        _CACHE[key] = (qw, s, z, b, dequantize(qw, s, z, g, k, dtype=torch.float64))
    return _CACHE[key]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}xN{n}" for k, n in SHAPES])
def test_gemm_sweep(k, n, g, dtype):
    qw, s, z, b, w64 = _case(k, n, g, dtype)
    _check_kernel("mma", cuda_mod.gemm_mma, qw, s, z, b, w64, g, dtype, MS, check_op=True)


def _check_kernel(name, gemm, qw, s, z, b, w64, g, dtype, ms, check_op=False):
    """gemm(x, ...) into a NaN-poisoned output against float64, bias on every other M; with
    check_op, the dispatching op too."""
    k = w64.shape[1]
    for i, m in enumerate(ms):
        bias = b if i % 2 else None
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w64.T + (0 if bias is None else bias.double())
        out = torch.full((m, w64.shape[0]), float("nan"), dtype=dtype, device="cuda")
        y = gemm(x, qw, s, z, g, bias, out)
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), f"{name} M={m}: unwritten or non-finite outputs"
        assert _rel_err(y, ref) < TOL[dtype], f"{name} M={m}: rel err {_rel_err(y, ref):.2e}"
        if check_op:
            y_op = torch.ops.awq.int4_linear(x, qw, s, z, g, bias)
            assert _rel_err(y_op, ref) < TOL[dtype], f"op M={m}: rel err {_rel_err(y_op, ref):.2e}"


SIMT_MS = (1, 2, 3, 4, 7, 8)


def _check_simt(qw, s, z, b, w64, g, dtype, ms=SIMT_MS):
    _check_kernel("simt", cuda_mod.gemm_simt, qw, s, z, b, w64, g, dtype, ms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}xN{n}" for k, n in SHAPES])
def test_simt_sweep(k, n, g, dtype):
    """The CUDA-core decode kernel (M <= 8) with its default configuration per M."""
    _check_simt(*_case(k, n, g, dtype), g, dtype)


TC_MS = (1, 2, 3, 4, 7, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}xN{n}" for k, n in SHAPES])
def test_tc_sweep(k, n, g, dtype):
    """The register-streaming tensor-core decode kernel (M <= 8)."""
    _check_kernel("tc", cuda_mod.gemm_tc, *_case(k, n, g, dtype), g, dtype, TC_MS)


def test_tc_deterministic_and_errors():
    k, n, g, m = 4096, 4096, 128, 5
    qw, s, z, b, _ = _case(k, n, g, torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y1 = cuda_mod.gemm_tc(x, qw, s, z, g, b, x.new_empty((m, n)))
    y2 = cuda_mod.gemm_tc(x, qw, s, z, g, b, x.new_full((m, n), float("nan")))
    assert torch.equal(y1, y2)
    assert cuda_mod.TC_MAX_M <= cuda_mod.load_library().awq_int4_tc_max_m()  # dispatch within its bound
    big = torch.randn(9, k, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="awq_int4_gemm_tc: bad sizes M=9"):
        cuda_mod.gemm_tc(big, qw, s, z, g, None, big.new_empty((9, n)))


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the producer/consumer kernel needs sm_90")


def _pc_one(x, qw, s, z, g, b, out):
    return cuda_mod.gemm_pc(x, [qw], [s], [z], g, [b], [out])[0]


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}xN{n}" for k, n in SHAPES])
def test_pc_sweep(k, n, g, dtype):
    """The producer/consumer decode kernel (M <= 8), one weight a launch."""
    _check_kernel("pc", _pc_one, *_case(k, n, g, dtype), g, dtype, TC_MS)


@needs_sm90
@pytest.mark.parametrize("cfg", ["1", "2", "3", "4"])
def test_pc_configs(cfg, monkeypatch):
    """Every block configuration $AWQ_PC_CFG can pick, on a padded K and a ragged N."""
    monkeypatch.setenv("AWQ_PC_CFG", cfg)
    for k, n, g in [(576, 1536, 128), (573, 200, 32), (4096, 11008, 64)]:
        _check_kernel("pc", _pc_one, *_case(k, n, g, torch.bfloat16), g, torch.bfloat16, (1, 3, 8))


def _check_multi(gemm, one, k, ns, g, dtype, seed, bit_exact, ms=(1, 5, 8)):
    """gemm (a multi-weight launcher) on the first 2..len(ns) weights of different N that share x,
    at each M of ms, into NaN-poisoned outputs, against float64; where bit_exact(m) each output
    must equal the one-weight launch `one` bit for bit."""
    segs = [_random_weight(k, n, g, dtype, seed=seed + i) for i, n in enumerate(ns)]
    w64 = [dequantize(qw, s, z, g, k, dtype=torch.float64) for qw, s, z, _ in segs]
    for nseg in range(2, len(ns) + 1):
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(dtype)
            biases = [b if i % 2 else None for i, (_, _, _, b) in enumerate(segs[:nseg])]
            outs = [torch.full((m, n), float("nan"), dtype=dtype, device="cuda") for n in ns[:nseg]]
            gemm(x, *([t[j] for t in segs[:nseg]] for j in range(3)), g, biases, outs)
            for i, (y, (qw, s, z, _)) in enumerate(zip(outs, segs)):
                ref = x.double() @ w64[i].T + (0 if biases[i] is None else biases[i].double())
                assert torch.isfinite(y).all() and _rel_err(y, ref) < TOL[dtype], f"weight {i} of {nseg}, M={m}"
                if bit_exact(m):
                    assert torch.equal(y, one(x, qw, s, z, g, biases[i], torch.empty_like(y))), f"weight {i} of {nseg}"
    return segs


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pc_multi_weights(dtype):
    """Up to 4 weights of different N that share x, in one launch: each output equals the
    single-weight launch bit for bit, and the float64 reference within tolerance."""
    _check_multi(cuda_mod.gemm_pc, _pc_one, 1536, (4096, 200, 1536, 48), 64, dtype, 0, lambda m: True)


@pytest.mark.parametrize("m", [1, 8, 16])
def test_int4_linear_multi_op(m):
    """awq::int4_linear_multi on CUDA (one producer/consumer launch for M <= 8 on sm_90, one
    int4_linear each otherwise) against float64, for 3-D x and mixed biases."""
    k, g, ns = 4096, 128, (4096, 1024, 1024)
    segs = [_random_weight(k, n, g, torch.bfloat16, seed=10 + i) for i, n in enumerate(ns)]
    x = torch.randn(1, m, k, device="cuda").to(torch.bfloat16)
    biases = [segs[0][3], None, segs[2][3]]
    ys = torch.ops.awq.int4_linear_multi(x, [t[0] for t in segs], [t[1] for t in segs], [t[2] for t in segs], g,
                                         biases)
    for y, (qw, s, z, _), b in zip(ys, segs, biases):
        w64 = dequantize(qw, s, z, g, k, dtype=torch.float64)
        ref = x.double() @ w64.T + (0 if b is None else b.double())
        assert y.shape == ref.shape and _rel_err(y, ref) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="same packed K"):
        torch.ops.awq.int4_linear_multi(x, [segs[0][0], segs[0][0][:, :1024]], [segs[0][1]] * 2,
                                        [segs[0][2]] * 2, g, [None, None])


@needs_sm90
def test_pc_deterministic_and_errors():
    k, n, g, m = 4096, 4096, 128, 5
    qw, s, z, b, _ = _case(k, n, g, torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    y1 = _pc_one(x, qw, s, z, g, b, x.new_empty((m, n)))
    y2 = _pc_one(x, qw, s, z, g, b, x.new_full((m, n), float("nan")))
    assert torch.equal(y1, y2)
    assert cuda_mod.PC_MAX_M <= cuda_mod.load_library().awq_int4_pc_max_m()
    big = torch.randn(9, k, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="awq_int4_gemm_pc: bad sizes M=9"):
        _pc_one(big, qw, s, z, g, None, big.new_empty((9, n)))
    with pytest.raises(RuntimeError, match="5 weights"):
        cuda_mod.gemm_pc(x, [qw] * 5, [s] * 5, [z] * 5, g, [None] * 5, [x.new_empty((m, n))] * 5)
    qw2, s2, z2, _ = _random_weight(2048, 64, g, torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="packed K differ"):
        cuda_mod.gemm_pc(x, [qw, qw2], [s, s2], [z, z2], g, [None, None], [x.new_empty((m, n)), x.new_empty((m, 64))])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n,g", [(576, 1536, 128), (573, 200, 32), (4096, 4096, 64),
                                   (28672, 8192, 128)])
def test_simt_configs(k, n, g, dtype, monkeypatch):
    """Every instantiated configuration (lane layout, rows per lane, ring depth; 2 is the
    3-step ring of session 18's experiment)."""
    for cfg in range(3):
        monkeypatch.setenv("AWQ_SIMT_CFG", str(cfg))
        _check_simt(*_case(k, n, g, dtype), g, dtype, ms=(1, 3, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,ns", [(1536, (4096, 200, 1536, 48)), (28672, (200, 1024))],
                         ids=["K1536", "K28672-sliced"])
def test_simt_multi_weights(k, ns, dtype):
    """Up to 4 weights of different N that share x, in one CUDA-core GEMV launch, against float64;
    at K = 1536 and M = 1 (no K split either way) each output equals the one-weight launch bit for
    bit. K = 28672 outgrows shared memory, so K is sliced and the second kernel sums per weight."""
    g = 64
    segs = _check_multi(cuda_mod.gemm_simt_multi, cuda_mod.gemm_simt, k, ns, g, dtype, 20,
                        lambda m: m == 1 and k == 1536)
    x = torch.randn(1, k, device="cuda").to(dtype)
    with pytest.raises(RuntimeError, match="5 weights"):
        cuda_mod.gemm_simt_multi(x, [segs[0][0]] * 5, [segs[0][1]] * 5, [segs[0][2]] * 5, g, [None] * 5,
                                 [x.new_empty((1, ns[0]))] * 5)


def _fold_one(x, qw, s, z, g, b, out):
    return cuda_mod.gemm_fold(x, [qw], [s], [z], g, [b], [out])[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"K{k}xN{n}" for k, n in SHAPES])
def test_fold_sweep(k, n, dtype):
    """The folded tensor-core decode kernel (M <= 8, group size 128), one weight a launch."""
    _check_kernel("fold", _fold_one, *_case(k, n, 128, dtype), 128, dtype, TC_MS, check_op=True)


@pytest.mark.parametrize("cfg", ["0", "1", "2", "3", "4"])
def test_fold_configs(cfg, monkeypatch):
    """Every block configuration $AWQ_FOLD_CFG can pick, one and two token tiles, with K unsplit and
    forced into slices."""
    monkeypatch.setenv("AWQ_FOLD_CFG", cfg)
    for ks in ("", "3"):
        monkeypatch.setenv("AWQ_FOLD_KS", ks)
        for k, n in [(576, 1536), (573, 200), (11008, 4096)]:
            _check_kernel("fold", _fold_one, *_case(k, n, 128, torch.bfloat16), 128, torch.bfloat16, (1, 3, 8, 12, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fold_multi_weights(dtype):
    """Up to 4 weights of different N that share x in one launch of the folded kernel, against
    float64 (bit equality with one-weight launches is not asked: the K split depends on the
    launch's total rows)."""
    _check_multi(cuda_mod.gemm_fold, _fold_one, 1536, (4096, 200, 1536, 48), 128, dtype, 30, lambda m: False)


def test_fold_deterministic_and_errors():
    """Split K is summed in slice order (two runs agree bit for bit); sizes it cannot serve are
    refused with the reason."""
    k, n = 28672, 1024
    qw, s, z, b = _random_weight(k, n, 128, torch.bfloat16, seed=4)
    for m in (2, 8):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y1 = _fold_one(x, qw, s, z, 128, b, x.new_empty((m, n)))
        y2 = _fold_one(x, qw, s, z, 128, b, x.new_full((m, n), float("nan")))
        assert torch.equal(y1, y2)
    assert cuda_mod.FOLD_MAX_M <= cuda_mod.load_library().awq_int4_fold_max_m()
    assert not cuda_mod.use_fold(2, n, k, 64) and not cuda_mod.use_fold(9, 8192, 28672, 128)
    assert cuda_mod.use_fold(16, 3 * 4096, 4096, 128) and not cuda_mod.use_fold(17, 3 * 4096, 4096, 128)
    qw64, s64, z64, _ = _random_weight(512, 64, 64, torch.bfloat16, seed=5)
    x = torch.randn(2, 512, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="group_size=64; this kernel needs 128"):
        _fold_one(x, qw64, s64, z64, 64, None, x.new_empty((2, 64)))
    big = torch.randn(17, k, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bad sizes M=17"):
        _fold_one(big, qw, s, z, 128, None, big.new_empty((17, n)))


TWO_TILE_MS = (9, 12, 15, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ks", ["", "3"])
def test_fold_two_token_tiles(dtype, ks, monkeypatch):
    """M = 9..16 in the folded kernel: two token tiles share each weight fragment (lean loop only),
    one weight and several, K unsplit where it fits and forced into 3 slices (summed in a cluster
    on sm_90), odd M (lanes of the second tile past M) and a K that pads; against float64. 17
    tokens are refused in pair mode too."""
    monkeypatch.setenv("AWQ_FOLD_KS", ks)
    for k, n in [(576, 1536), (4096, 4096), (11008, 4096), (573, 200)]:
        _check_kernel("fold", _fold_one, *_case(k, n, 128, dtype), 128, dtype, TWO_TILE_MS)
    segs = _check_multi(cuda_mod.gemm_fold, _fold_one, 1536, (4096, 200, 48), 128, dtype, 40, lambda m: False,
                        TWO_TILE_MS)
    x = torch.randn(17, 1536, device="cuda").to(dtype)
    with pytest.raises(RuntimeError, match="bad sizes M=17"):
        cuda_mod.gemm_fold_glu(x, *([t[j] for t in segs[:1] * 2] for j in range(3)), 128, [None, None],
                               x.new_empty((17, 4096)))


@pytest.mark.parametrize("ks,slices", [("2", 2), ("3", 3), ("5", 5), ("8", 8), ("12", 12)])
def test_fold_cluster_sum_matches_finalize(ks, slices, monkeypatch):
    """K slices summed in a thread-block cluster (sm_90, up to 8 slices: no workspace) give the
    same bits as the workspace and fold_finalize ($AWQ_FOLD_CLUSTER=0), with bias, several
    weights, a K that needs padding and the ragged last tile; 12 slices take the workspace either
    way. Both are checked against float64. The cluster runs first, so a workspace size cached
    for it (none) and reused without the cluster would fail the second launch."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    monkeypatch.setenv("AWQ_FOLD_KS", ks)
    k, ns = 2999, (200, 1536, 48)  # 24 groups: AWQ_FOLD_KS=ks makes `slices` slices
    kp = padded_k(k, 128)
    ws = [_random_weight(k, n, 128, torch.bfloat16, seed=10 + i) for i, n in enumerate(ns)]
    for m in (1, 3, 8):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        got = {}
        for cl in ("1", "0"):
            monkeypatch.setenv("AWQ_FOLD_CLUSTER", cl)
            need = cuda_mod._multi_workspace_floats("fold", x.device.index, m, ns, k, kp, 128, 1, (cl, ks))
            assert need == (0 if cl == "1" and slices <= 8 else slices * m * sum(-(-n // 16) * 16 for n in ns))
            outs = [x.new_full((m, n), float("nan")) for n in ns]
            got[cl] = cuda_mod.gemm_fold(x, [w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws], 128,
                                         [w[3] for w in ws], outs)
        for (qw, s, z, b), y0, y1 in zip(ws, got["0"], got["1"]):
            assert torch.equal(y0, y1)
            ref = x.double() @ dequantize(qw, s, z, 128, k, dtype=torch.float64).T + b.double()
            assert ((y1.double() - ref).norm() / ref.norm()).item() < 6e-3


def _glu_ref(x, segs, dtype):
    """silu(gate) * up as the unfused compiled graph makes it: each linear (float64, + bias)
    rounded to dtype, the product in fp32, rounded once."""
    import torch.nn.functional as F

    k = x.shape[1]
    g, u = ((x.double() @ dequantize(qw, s, z, 128, k, dtype=torch.float64).T + b.double()).to(dtype)
            for qw, s, z, b in segs)
    return (F.silu(g.float()) * u.float()).to(dtype).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k,n", [(4096, 11008), (576, 1536), (573, 200), (1536, 40)],
                         ids=["K4096xN11008", "K576xN1536", "K573xN200", "K1536xN40"])
def test_fold_glu(k, n, dtype):
    """The folded GEMV's pair mode (gate rows over up rows in one tile, silu(gate) * up written)
    (up to 16 tokens: two token tiles above 8) and awq::int4_linear_glu's dispatch (M > 16: the
    two linears, then the product), against float64 linears rounded as the unfused graph rounds
    them; N not a multiple of 8 included."""
    segs = [_random_weight(k, n, 128, dtype, seed=20 + i) for i in range(2)]
    qws, ss, zs, bs = ([sg[i] for sg in segs] for i in range(4))
    for m in (1, 2, 3, 8, 9, 16, 17):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = _glu_ref(x, segs, dtype)
        runs = {"op": lambda: torch.ops.awq.int4_linear_glu(x, qws, ss, zs, 128, bs)}
        if m <= 16:
            runs["kernel"] = lambda: cuda_mod.gemm_fold_glu(x, qws, ss, zs, 128, bs, x.new_full((m, n), float("nan")))
        for name, run in runs.items():
            y = run()
            assert y.shape == (m, n) and torch.isfinite(y).all(), (name, m)
            assert _rel_err(y, ref) < 2 * TOL[dtype], (name, m, _rel_err(y, ref))


@pytest.mark.parametrize("ks", ["", "3", "12"])
def test_fold_glu_k_split(ks, monkeypatch):
    """Pair mode with K unsplit, summed in a cluster (3 slices) and in the workspace (12 slices,
    or $AWQ_FOLD_CLUSTER=0): the cluster and workspace sums agree bit for bit; no bias."""
    monkeypatch.setenv("AWQ_FOLD_KS", ks)
    k, n = 2999, 300
    segs = [_random_weight(k, n, 128, torch.bfloat16, seed=30 + i) for i in range(2)]
    qws, ss, zs = ([sg[i] for sg in segs] for i in range(3))
    for m in (1, 5, 8, 13, 16):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        got = {}
        for cl in ("0", "1"):
            monkeypatch.setenv("AWQ_FOLD_CLUSTER", cl)
            got[cl] = cuda_mod.gemm_fold_glu(x, qws, ss, zs, 128, [None, None], x.new_full((m, n), float("nan")))
        assert torch.equal(got["0"], got["1"])
        ref = _glu_ref(x, [(q, s, z, torch.zeros(n, device="cuda")) for q, s, z in zip(qws, ss, zs)], torch.bfloat16)
        assert _rel_err(got["1"], ref) < 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fold_lean_loop_bit_equal(dtype, monkeypatch):
    """The folded GEMV's lean main loop (below 8 tokens by default: lanes past M read another
    token's x, columns never stored) against the predicated loop, forced both ways with
    $AWQ_FOLD_LEAN at every M = 1..8: the same bits in single, multi-weight and pair mode, with K
    unsplit, in a cluster and in the workspace. Block configuration 0 (the default) pinned: its
    register count allows one block a SM either way, so both loops get one plan."""
    monkeypatch.setenv("AWQ_FOLD_CFG", "0")
    k, ns = 2999, (200, 1536)
    ws = [_random_weight(k, n, 128, dtype, seed=50 + i) for i, n in enumerate(ns)]
    qws, ss, zs, bs = ([w[i] for w in ws] for i in range(4))
    pair = [_random_weight(k, 300, 128, dtype, seed=60 + i) for i in range(2)]
    for ks, cl in (("", "1"), ("3", "1"), ("12", "0")):
        monkeypatch.setenv("AWQ_FOLD_KS", ks)
        monkeypatch.setenv("AWQ_FOLD_CLUSTER", cl)
        for m in range(1, 9):
            x = torch.randn(m, k, device="cuda").to(dtype)
            got = {}
            for lean in ("0", "1"):
                monkeypatch.setenv("AWQ_FOLD_LEAN", lean)
                multi = cuda_mod.gemm_fold(x, qws, ss, zs, 128, bs, [x.new_full((m, n), float("nan")) for n in ns])
                glu = cuda_mod.gemm_fold_glu(x, [w[0] for w in pair], [w[1] for w in pair], [w[2] for w in pair],
                                             128, [w[3] for w in pair], x.new_full((m, 300), float("nan")))
                got[lean] = [*multi, glu]
            for a, b in zip(got["0"], got["1"]):
                assert torch.isfinite(a).all() and torch.equal(a, b), (ks, m)
            ref = x.double() @ dequantize(qws[1], ss[1], zs[1], 128, k, dtype=torch.float64).T + bs[1].double()
            assert _rel_err(got["1"][1], ref) < TOL[dtype], (ks, m)


def test_fold_glu_opcheck_and_errors():
    k, n = 576, 256
    segs = [_random_weight(k, n, 128, torch.bfloat16, seed=40 + i) for i in range(2)]
    qws, ss, zs, bs = ([sg[i] for sg in segs] for i in range(4))
    for m in (1, 8, 100):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        torch.library.opcheck(torch.ops.awq.int4_linear_glu.default, (x, qws, ss, zs, 128, bs))
    with pytest.raises(ValueError, match="needs a gate and an up weight of one shape"):
        cuda_mod.gemm_fold_glu(x[:2], qws[:1], ss[:1], zs[:1], 128, bs[:1], x.new_empty((2, n)))


def test_simt_deterministic():
    """Split K is summed in a fixed order: two runs agree bit for bit."""
    k, n, g = 28672, 1024, 128
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=3)
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y1 = cuda_mod.gemm_simt(x, qw, s, z, g, b, x.new_empty((m, n)))
        y2 = cuda_mod.gemm_simt(x, qw, s, z, g, b, x.new_full((m, n), float("nan")))
        assert torch.equal(y1, y2)


def test_simt_errors():
    k, n, g = 512, 64, 64
    qw, s, z, _ = _random_weight(k, n, g, torch.bfloat16, seed=1)
    x = torch.randn(9, k, device="cuda").to(torch.bfloat16)
    lib = cuda_mod.load_library()
    rc = lib.awq_int4_gemm_simt(x.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), None,
                                x.data_ptr(), None, 0, 9, n, k, k, g, 1, None)
    with pytest.raises(RuntimeError, match="bad sizes M=9"):
        cuda_mod._check(rc)
    assert lib.awq_int4_gemm_simt_workspace(9, n, k, k, g, 1) == -1
    # K = 28672 at M = 8 must split K (shared memory): without a workspace the launcher refuses.
    k = 28672
    qw, s, z, _ = _random_weight(k, n, g, torch.bfloat16, seed=2)
    x = torch.randn(8, k, device="cuda").to(torch.bfloat16)
    assert lib.awq_int4_gemm_simt_workspace(8, n, k, k, g, 1) > 0
    rc = lib.awq_int4_gemm_simt(x.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), None,
                                x.data_ptr(), None, 0, 8, n, k, k, g, 1, None)
    with pytest.raises(RuntimeError, match="need a workspace"):
        cuda_mod._check(rc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_dequantize_bit_exact(g, dtype):
    k = 1000 if g == 32 else 968  # not a multiple of g: exercises the padded last group
    qw, s, z, _ = _random_weight(k, 300, g, dtype, seed=g)
    got = cuda_mod.dequantize_cuda(qw, s, z, g, k)
    want = dequantize(qw, s, z, g, k, dtype=dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 33, 300])
def test_group_sizes_and_3d_input(g, m):
    k, n = 1024, 768
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=m * g)
    x = torch.randn(1, m, k, device="cuda").to(torch.bfloat16)
    ref = x.double() @ dequantize(qw, s, z, g, k, dtype=torch.float64).T + b.double()
    y = torch.ops.awq.int4_linear(x, qw, s, z, g, b)
    assert y.shape == (1, m, n)
    assert _rel_err(y, ref) < TOL[torch.bfloat16]


def test_poisoned_allocator():
    """The op allocates its own output: fill the caching allocator's blocks with NaN first."""
    k, n, g, m = 2048, 4096, 128, 3
    qw, s, z, b = _random_weight(k, n, g, torch.float16, seed=7)
    for _ in range(3):
        junk = torch.full((m * n * 4,), float("nan"), dtype=torch.float16, device="cuda")
        del junk
        x = torch.randn(m, k, device="cuda").half()
        y = torch.ops.awq.int4_linear(x, qw, s, z, g, b)
        ref = x.double() @ dequantize(qw, s, z, g, k, dtype=torch.float64).T + b.double()
        assert torch.isfinite(y).all() and _rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(m, with_bias):
    k, n, g = 576, 256, 128
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=m)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    torch.library.opcheck(torch.ops.awq.int4_linear.default,
                          (x, qw, s, z, g, b if with_bias else None))


def test_errors_name_the_shapes():
    k, n, g = 512, 64, 64
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=1)
    x = torch.randn(2, k, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"scales and bias must have x's dtype.*\(64, 8\)"):
        torch.ops.awq.int4_linear(x, qw, s.half(), z, g, None)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.awq.int4_linear(x, qw, s, z.cpu(), g, None)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.awq.int4_linear(x, qw.t().contiguous().t(), s, z, g, None)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        torch.ops.awq.int4_linear(x.float(), qw, s.float(), z, g, None)
    with pytest.raises(ValueError, match="K=400"):
        torch.ops.awq.int4_linear(x[:, :400], qw, s, z, g, None)
    rc = cuda_mod.load_library().awq_int4_gemm_mma(
        x.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), None, x.data_ptr(), None, 0,
        2, n, k, k, 48, 1, None)  # group size 48: the launcher itself must refuse
    with pytest.raises(RuntimeError, match="bad sizes.*group_size=48"):
        cuda_mod._check(rc)
    assert cuda_mod.load_library().awq_int4_gemm_mma_workspace(2, n, k, k, 48, 1) == -1


def _mma_case(k, n, m, seed, g=128):
    """A random bf16 weight (qweight, scales, zeros, bias), its float64 dequantization and an x of
    M tokens, for calling the mma kernel's C entry point directly."""
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=seed)
    return (qw, s, z, b), dequantize(qw, s, z, g, k, dtype=torch.float64), torch.randn(m, k, device="cuda").to(
        torch.bfloat16)


def _mma_raw(x, w, bias, out, ws, ws_floats, g=128) -> int:
    """awq_int4_gemm_mma on bf16 x [M, K] and the weight w = (qweight, scales, zeros): its return code."""
    (m, k), (qw, s, z) = x.shape, w
    return cuda_mod.load_library().awq_int4_gemm_mma(
        x.data_ptr(), qw.data_ptr(), s.data_ptr(), z.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), ws.data_ptr(), ws_floats, m, qw.shape[0], k, k, g, 1, None)


def test_mma_split_k_is_reproducible():
    """The mma kernel's K chunks leave their partials in a workspace of one [M, N] plane a chunk,
    summed in chunk order by the second kernel (no atomics): two calls give the same bits, whatever
    the workspace held before, and the float64 result. 7B's gate projection at M = 8 (N = 11008 >
    TC_MAX_N, M < SM90_MIN_M: what an eager 8-token prefill runs here) splits K on every card
    with >= 8 SMs. A workspace smaller than the query says is refused."""
    k, n, g, m = 4096, 11008, 128, 8
    (qw, s, z, b), w64, x = _mma_case(k, n, m, seed=11)
    need = cuda_mod.load_library().awq_int4_gemm_mma_workspace(m, n, k, k, g, 1)
    assert need > 0 and need % (m * n) == 0 and need // (m * n) > 1
    outs = []
    for fill in (float("nan"), 0.0, 1e30):
        ws = torch.full((need,), fill, dtype=torch.float32, device="cuda")
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        cuda_mod._check(_mma_raw(x, (qw, s, z), b, out, ws, need))
        outs.append(out)
    outs.append(cuda_mod.gemm_mma(x, qw, s, z, g, b, torch.empty_like(outs[0])))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert _rel_err(outs[0], x.double() @ w64.T + b.double()) < TOL[torch.bfloat16]
    with pytest.raises(RuntimeError, match="K chunks need a workspace"):
        cuda_mod._check(_mma_raw(x, (qw, s, z), None, outs[0], ws, need - 1))


def test_mma_split_k_above_one_token_tile():
    """At M > 8 the mma kernel's chunks add into one [M, N] plane with atomics (planes a chunk
    would grow with M x K); the launcher zeroes it, so a NaN-filled workspace still gives the
    float64 result. K = 8192 at M = 16 is 64 k-blocks in chunks of at most 8: split on any card."""
    k, n, g, m = 8192, 8192, 128, 16
    (qw, s, z, _), w64, x = _mma_case(k, n, m, seed=12)
    need = cuda_mod.load_library().awq_int4_gemm_mma_workspace(m, n, k, k, g, 1)
    assert need == m * n
    ws = torch.full((need,), float("nan"), dtype=torch.float32, device="cuda")
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cuda_mod._check(_mma_raw(x, (qw, s, z), None, out, ws, need))
    assert _rel_err(out, x.double() @ w64.T) < TOL[torch.bfloat16]
