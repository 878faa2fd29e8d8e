"""The CUTLASS prefill GEMM (csrc/int4_gemm_sm90.cu, _cuda.gemm_sm90) against a float64 reference.

Needs an sm_90 GPU and the built library; skipped otherwise. The derived scale tensors it reads
(_cuda.sm90_operands) are also checked on the CPU, in tests/test_kernel_build.py.
"""

from __future__ import annotations

import pytest
import torch

from awq_compile.quant import dequantize
from test_cuda_kernels import MS, SHAPES, TOL, _case, _check_kernel, _random_weight, _rel_err, cuda_mod

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_mod.REGISTERED, reason="libawq_int4.so not built/loadable"),
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="the CUTLASS GEMM needs sm_90"),
]

# The shapes it serves: K % 32 == 0 and N % 8 == 0 (573 x 200 goes to the other paths).
SM90_SHAPES = [(k, n) for k, n in SHAPES if k % 32 == 0 and n % 8 == 0]
# Every configuration at its default split (7 and up, K tiles of 128, only serve group size 128);
# then explicit split-K counts, including uneven ones, and CUTLASS's own choice (0).
CONFIGS = tuple((c, None) for c in range(len(cuda_mod.SM90_TILE_SHAPES))) + ((1, 2), (2, 3), (4, 7), (0, 0), (6, 5))
K128_CONFIGS = tuple(range(7, len(cuda_mod.SM90_TILE_SHAPES)))


def _sm90(config, splits):
    def gemm(x, qw, s, z, g, b, out):
        return cuda_mod.gemm_sm90(x, qw, s, z, g, b, out, config, splits)
    return gemm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("k,n", SM90_SHAPES, ids=[f"K{k}xN{n}" for k, n in SM90_SHAPES])
def test_sm90_sweep(k, n, g, dtype):
    """Every tile configuration, at every M of the issue's sweep (bias on every other M), into
    NaN-poisoned outputs; the padded K (576, g = 128) included."""
    case = _case(k, n, g, dtype)
    for config, splits in CONFIGS:
        if config in K128_CONFIGS and g != 128:
            continue
        _check_kernel(f"sm90 config {config} splits {splits}", _sm90(config, splits), *case, g, dtype, MS)


def test_sm90_dispatch(monkeypatch):
    """The op sends prefill-sized M to the CUTLASS GEMM on sm_90, and small M elsewhere (group size
    64: at 128 the folded GEMV takes this shape up to M = 16)."""
    k, n, g = 4096, 4096, 64
    qw, s, z, b, w64 = _case(k, n, g, torch.bfloat16)
    seen = []
    real = cuda_mod.gemm_sm90
    monkeypatch.setattr(cuda_mod, "gemm_sm90", lambda *a: seen.append(a[0].shape[0]) or real(*a))
    for m in (1, cuda_mod.SM90_MIN_M, 512):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y = torch.ops.awq.int4_linear(x, qw, s, z, g, b)
        assert _rel_err(y, x.double() @ w64.T + b.double()) < TOL[torch.bfloat16]
    assert seen == [cuda_mod.SM90_MIN_M, 512]
    monkeypatch.setenv("AWQ_SM90", "0")
    assert cuda_mod.sm90_config(512, n, k, g) == -1


def test_sm90_operands_follow_the_weight():
    """The derived scale tensors are built once per weight, and rebuilt when the weight's scales
    or zeros change in place (e.g. load_state_dict into the same module)."""
    k, n, g, m = 1536, 576, 64, 100
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=11)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    first = cuda_mod.sm90_operands(s, z)
    assert cuda_mod.sm90_operands(s, z)[0] is first[0]
    qw2, s2, z2, _ = _random_weight(k, n, g, torch.bfloat16, seed=12)
    s.copy_(s2)
    z.copy_(z2)
    y = cuda_mod.gemm_sm90(x, qw, s, z, g, None, x.new_empty((m, n)), 1)
    ref = x.double() @ dequantize(qw, s2, z2, g, k, dtype=torch.float64).T
    assert _rel_err(y, ref) < TOL[torch.bfloat16]


def test_sm90_cuda_graph():
    """Captured in a CUDA graph (derived tensors built outside it) and replayed with new x."""
    k, n, g, m = 4096, 4096, 128, 256
    qw, s, z, b, w64 = _case(k, n, g, torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    out = x.new_empty((m, n))
    cuda_mod.gemm_sm90(x, qw, s, z, g, b, out)  # warm-up: builds and caches the derived tensors
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_mod.gemm_sm90(x, qw, s, z, g, b, out)
    x.copy_(torch.randn(m, k, device="cuda").to(torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(out, x.double() @ w64.T + b.double()) < TOL[torch.bfloat16]


def test_sm90_under_cudagraph_trees():
    """torch.compile(mode="reduce-overhead") around the op, whose first CUTLASS GEMM call (which
    builds and keeps the derived scales) runs inside CUDA-graph trees' warm-up: the kept tensors
    must not land in the graph's pool, which the trees refuse ("not tracked as outputs")."""
    k, n, g, m = 1536, 576, 64, 100
    qw, s, z, b = _random_weight(k, n, g, torch.bfloat16, seed=21)
    f = torch.compile(lambda x: torch.ops.awq.int4_linear(x, qw, s, z, g, b), mode="reduce-overhead")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = x.double() @ dequantize(qw, s, z, g, k, dtype=torch.float64).T + b.double()
    for _ in range(3):  # warm-up, record, replay
        y = f(x).clone()
        assert _rel_err(y, ref) < TOL[torch.bfloat16]
    assert s in cuda_mod._SM90_OPERANDS  # the CUTLASS path ran, and kept its operands


def test_sm90_errors():
    k, n, g, m = 4096, 4096, 128, 64
    qw, s, z, b, _ = _case(k, n, g, torch.bfloat16)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"config={len(cuda_mod.SM90_TILE_SHAPES)}"):
        cuda_mod.gemm_sm90(x, qw, s, z, g, None, x.new_empty((m, n)), len(cuda_mod.SM90_TILE_SHAPES))
    with pytest.raises(RuntimeError, match="splits=65"):
        cuda_mod.gemm_sm90(x, qw, s, z, g, None, x.new_empty((m, n)), 1, 65)
    qw64, s64, z64, _ = _random_weight(k, n, 64, torch.bfloat16, seed=4)
    with pytest.raises(RuntimeError, match="group_size=64 dtype=1 config=7"):  # K tiles of 128
        cuda_mod.gemm_sm90(x, qw64, s64, z64, 64, None, x.new_empty((m, n)), 7)
    qw32, s32, z32, _ = _random_weight(k, n, 32, torch.bfloat16, seed=5)
    with pytest.raises(ValueError, match="does not serve.*group_size=32"):
        cuda_mod.gemm_sm90(x, qw32, s32, z32, 32, None, x.new_empty((m, n)))
    lib = cuda_mod.load_library()
    assert lib.awq_int4_gemm_sm90_configs() == len(cuda_mod.SM90_TILE_SHAPES)  # the two tables agree
    assert lib.awq_int4_gemm_sm90_workspace(m, n, 4010, 4096, g, 1, 0, 0) == -1  # K % 32 != 0
    assert "K=4010" in lib.awq_int4_last_error().decode()
