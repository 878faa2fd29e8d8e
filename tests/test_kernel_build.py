"""CPU-machine checks of the CUDA kernels: the sources compile with nvcc for sm_90a and sm_80, and
the package imports and runs without the library; the multi-weight launchers' shared argument
checks, the decode attention's and the add + RMSNorm's refuse bad input before any CUDA call.

Compiling all of csrc/ takes about 2 minutes per target on 2 cores, most of it the CUTLASS GEMM
(int4_gemm_sm90.cu).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from awq_compile import build_kernels


@pytest.mark.skipif(build_kernels.find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_sources_compile(tmp_path, arch):
    objs = build_kernels.compile_objects(tmp_path, archs=(arch,), jobs=2)
    assert [o.name for o in objs] == [s.replace(".cu", ".o") for s in build_kernels.SOURCES]
    assert all(o.stat().st_size > 0 for o in objs)


@pytest.mark.skipif(build_kernels.find_nvcc() is None, reason="nvcc not installed")
def test_multi_weight_argument_checks(tmp_path):
    """The multi-weight launchers (simt and its partials, pc, fold) share their argument checks, which run before any
    CUDA call: a library of those sources (sm_80, linked here) refuses bad counts, sizes and
    pointers on a CPU machine with the shared messages."""
    import ctypes

    lib = ctypes.CDLL(str(build_kernels.build(tmp_path / "libpart.so", archs=("80",),
                                               sources=("int4_common.cu", "int4_gemv_simt.cu", "int4_gemv_pc.cu",
                                                        "int4_gemv_fold.cu"))))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.awq_int4_last_error.restype = ctypes.c_char_p
    lib.awq_int4_gemm_simt_multi_workspace.argtypes = [i32, p, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_simt_multi_workspace.restype = i64
    lib.awq_int4_gemm_simt_multi.argtypes = [p, i32, p, p, p, p, p, p, p, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_pc.argtypes = [p, i32, p, p, p, p, p, p, i64, i64, i64, i32, i32, p]
    ns = (i64 * 5)(64, 64, 64, 64, 64)
    ok, unaligned = (p * 2)(256, 512), (p * 2)(256, 520)

    def err() -> str:
        return lib.awq_int4_last_error().decode()

    assert lib.awq_int4_gemm_simt_multi_workspace(5, ns, 1, 512, 512, 64, 1) == -1
    assert err() == "awq_int4_gemm_simt: 5 weights (1..4) or a null array"
    assert lib.awq_int4_gemm_simt_multi_workspace(2, ns, 9, 512, 512, 64, 1) == -1
    assert err().startswith("awq_int4_gemm_simt: bad sizes M=9 N=64")
    assert lib.awq_int4_gemm_simt_multi(256, 2, unaligned, ok, ok, ok, ok, ns, None, 0, 1, 512, 512, 64, 1, None) == 1
    assert err() == "awq_int4_gemm_simt: weight 1: null pointer or qweight not 16-byte aligned"
    assert lib.awq_int4_gemm_pc(256, 5, ok, ok, ok, ok, ok, ns, 1, 512, 512, 64, 1, None) == 1
    assert err() == "awq_int4_gemm_pc: 5 weights (1..4) or a null array"
    assert lib.awq_int4_gemm_pc(256, 2, ok, ok, ok, ok, ok, ns, 1, 512, 500, 64, 1, None) == 1
    assert err().startswith("awq_int4_gemm_pc: bad sizes M=1 N=64 K=512 Kp=500")
    assert lib.awq_int4_gemm_pc(256, 2, ok, ok, None, ok, ok, ns, 1, 512, 512, 64, 1, None) == 1
    assert err() == "awq_int4_gemm_pc: null pointer"
    lib.awq_int4_gemm_fold_workspace.argtypes = [i32, p, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_fold_workspace.restype = i64
    lib.awq_int4_gemm_fold.argtypes = lib.awq_int4_gemm_simt_multi.argtypes
    assert lib.awq_int4_gemm_fold_workspace(2, ns, 2, 512, 512, 64, 1) == -1
    assert err() == "awq_int4_gemm_fold: group_size=64; this kernel needs 128"
    assert lib.awq_int4_gemm_fold(256, 5, ok, ok, ok, ok, ok, ns, None, 0, 2, 512, 512, 128, 1, None) == 1
    assert err() == "awq_int4_gemm_fold: 5 weights (1..4) or a null array"
    assert lib.awq_int4_gemm_fold(256, 2, unaligned, ok, ok, ok, ok, ns, None, 0, 2, 512, 512, 128, 1, None) == 1
    assert err() == "awq_int4_gemm_fold: weight 1: null pointer or qweight not 16-byte aligned"
    lib.awq_int4_gemm_fold_glu_workspace.argtypes = [i64, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_fold_glu_workspace.restype = i64
    lib.awq_int4_gemm_fold_glu.argtypes = [p, p, p, p, p, p, i64, p, i64, i64, i64, i64, i32, i32, p]
    assert lib.awq_int4_gemm_fold_glu_workspace(64, 2, 512, 512, 64, 1) == -1
    assert err() == "awq_int4_gemm_fold: group_size=64; this kernel needs 128"
    assert lib.awq_int4_gemm_fold_glu(256, None, ok, ok, ok, 512, 64, None, 0, 2, 512, 512, 128, 1, None) == 1
    assert err() == "awq_int4_gemm_fold_glu: null array argument"
    assert lib.awq_int4_gemm_fold_glu(256, unaligned, ok, ok, ok, 512, 64, None, 0, 2, 512, 512, 128, 1, None) == 1
    assert err() == "awq_int4_gemm_fold_glu: weight 1: null pointer or qweight not 16-byte aligned"
    lib.awq_int4_gemm_simt_partials.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i32, i32, p]
    assert lib.awq_int4_gemm_simt_partials(256, 256, 512, 512, 1024, 2048, 9, 64, 512, 512, 64, 1, None) == 1
    assert err().startswith("awq_int4_gemm_simt: bad sizes M=9 N=64")
    assert lib.awq_int4_gemm_simt_partials(256, 520, 512, 512, 1024, 2048, 1, 64, 512, 512, 64, 1, None) == 1
    assert err() == "awq_int4_gemm_simt_partials: weight 0: null pointer or qweight not 16-byte aligned"


@pytest.mark.skipif(build_kernels.find_nvcc() is None, reason="nvcc not installed")
def test_decode_attention_argument_checks(tmp_path):
    """awq_decode_attention and its plan query refuse bad sizes, null pointers and rows that are not
    16-byte loads before any CUDA call (a library of its source, sm_80, linked here)."""
    import ctypes

    lib = ctypes.CDLL(str(build_kernels.build(tmp_path / "libattn.so", archs=("80",),
                                               sources=("int4_common.cu", "decode_attention.cu"))))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.awq_int4_last_error.restype = ctypes.c_char_p
    lib.awq_decode_attention_max_rows.restype = i64
    lib.awq_decode_attention_rounds.argtypes = [i64] * 6
    lib.awq_decode_attention_rounds.restype = i64
    lib.awq_decode_attention.argtypes = [p, p, p, p, p, p, p, p, p, i32, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                         i32, i32, p]
    strides, odd = (i64 * 3)(4096, 128, 128), (i64 * 3)(4096, 132, 128)
    mstrides = (i64 * 4)(384, 0, 0, 1)

    def call(q=256, k=512, v=768, mask=1024, qs=strides, ms=mstrides, kind=1, b=1, hq=32, hkv=32, s=1, length=384,
             d=128, splits=0, dtype=1):
        rc = lib.awq_decode_attention(q, k, v, mask, 2048, qs, strides, strides, ms, kind, b, hq, hkv, s, length, d,
                                      0.088, splits, dtype, None)
        return rc, lib.awq_int4_last_error().decode()

    assert lib.awq_decode_attention_max_rows() == 8
    assert call(d=96)[0] == 1 and call(d=96)[1].startswith("awq_decode_attention: bad sizes B=1 Hq=32 Hkv=32 S=1 L=384 D=96")
    assert call(hq=16, hkv=1)[1].startswith("awq_decode_attention: bad sizes B=1 Hq=16 Hkv=1")  # 16 rows a KV head
    assert call(hq=12, hkv=8)[1].startswith("awq_decode_attention: bad sizes")
    assert call(kind=4)[1].startswith("awq_decode_attention: bad sizes") and call(dtype=2)[0] == 1
    assert call(v=None) == (1, "awq_decode_attention: null pointer")
    assert call(mask=None) == (1, "awq_decode_attention: null pointer")
    assert call(q=264) == (1, "awq_decode_attention: q, k or v not 16-byte aligned (pointer or stride)")
    assert call(qs=odd) == (1, "awq_decode_attention: q, k or v not 16-byte aligned (pointer or stride)")
    assert lib.awq_decode_attention_rounds(1, 32, 32, 1, 384, 96) < 0
    assert lib.awq_int4_last_error().decode() == "awq_decode_attention_rounds: bad sizes"


@pytest.mark.skipif(build_kernels.find_nvcc() is None, reason="nvcc not installed")
def test_add_rms_norm_argument_checks(tmp_path):
    """awq_add_rms_norm refuses bad sizes, dtypes, null or misaligned pointers and inconsistent
    norm arguments (the checks it shares with the folded GEMV's norm prologue) before any CUDA
    call: a library of its sources (sm_80, linked here) on a CPU machine."""
    import ctypes

    lib = ctypes.CDLL(str(build_kernels.build(tmp_path / "libnorm.so", archs=("80",),
                                               sources=("int4_common.cu", "add_rms_norm.cu"))))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64

    class NormIn(ctypes.Structure):  # awq_norm_in (csrc/awq_int4.h)
        _fields_ = [("residual", p), ("delta", p), ("partials", p), ("delta_bias", p), ("weight", p), ("h", p),
                    ("slices", i64), ("eps", ctypes.c_float)]

    lib.awq_int4_last_error.restype = ctypes.c_char_p
    lib.awq_add_rms_norm_max_k.restype = i64
    lib.awq_add_rms_norm.argtypes = [ctypes.POINTER(NormIn), p, i64, i64, i32, p]
    good = dict(residual=256, delta=512, partials=None, delta_bias=None, weight=768, h=1024, slices=0, eps=1e-6)

    def call(x=2048, m=8, k=4096, dtype=1, **norm) -> tuple[int, str]:
        nm = None if norm.get("null") else ctypes.byref(NormIn(**{**good, **norm}))
        return lib.awq_add_rms_norm(nm, x, m, k, dtype, None), lib.awq_int4_last_error().decode()

    assert lib.awq_add_rms_norm_max_k() == 8192
    bad_sizes = "awq_add_rms_norm: bad arguments"
    assert call(null=True) == (1, f"{bad_sizes} M=8 K=4096 dtype=1 (K <= 8192)")
    assert call(k=8200)[1].startswith(f"{bad_sizes} M=8 K=8200") and call(m=0)[1].startswith(f"{bad_sizes} M=0")
    assert call(dtype=2)[1].startswith(f"{bad_sizes} M=8 K=4096 dtype=2") and call(x=None)[0] == 1
    assert call(x=2056) == (1, "awq_add_rms_norm: x must be 16-byte aligned")
    bad_norm = "awq_add_rms_norm: bad norm arguments"
    assert call(weight=None)[1].startswith(bad_norm) and call(h=None)[1].startswith(bad_norm)
    assert call(delta=None)[1].startswith(bad_norm)  # neither delta nor partials
    assert call(partials=1280, slices=2)[1].startswith(bad_norm)  # both
    assert call(delta=None, partials=1280, slices=0)[1].startswith(bad_norm)
    assert call(delta_bias=1536)[1].startswith(bad_norm)  # a bias with delta
    assert call(eps=-1.0)[1].startswith(bad_norm) and call(eps=float("nan"))[1].startswith(bad_norm)
    aligned = "awq_add_rms_norm: the norm needs K % 8 == 0"
    assert call(k=4100) == (1, f"{aligned} (K=4100) and 16-byte aligned tensors")
    assert call(residual=264)[1].startswith(aligned) and call(delta=None, partials=1288, slices=2)[1].startswith(aligned)


def test_import_without_library(tmp_path):
    """A missing library registers nothing; the reference path still serves the op."""
    code = (
        "import torch, awq_compile, awq_compile._cuda as c\n"
        "from awq_compile.quant import quantize\n"
        "assert not c.REGISTERED and not c.available()\n"
        "qw = quantize(torch.randn(16, 64), 32)\n"
        "y = torch.ops.awq.int4_linear(torch.randn(2, 64), qw.qweight, qw.scales.float(), qw.zeros, 32)\n"
        "assert y.shape == (2, 16)\n"
    )
    env = {**os.environ, "AWQ_COMPILE_CUDA_LIB": str(tmp_path / "missing.so")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_sm90_operands_math_and_cache():
    """What the CUTLASS GEMM reads instead of scales and zeros: s^T and (-z * s)^T rounded once
    to the scales' dtype; cached while the scales tensor lives (and not on it, so torch.save does
    not carry it), rebuilt after an in-place change."""
    from awq_compile import _cuda

    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(24, 5, generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
    z = torch.randint(0, 16, (24, 5), dtype=torch.uint8, generator=gen)
    s_t, z_t = _cuda.sm90_operands(s, z)
    assert s_t.shape == z_t.shape == (5, 24) and s_t.is_contiguous() and z_t.is_contiguous()
    assert torch.equal(s_t, s.t())
    assert torch.equal(z_t, (-(z.double() * s.double())).to(torch.bfloat16).t())
    assert _cuda.sm90_operands(s, z)[1] is z_t  # cached
    assert not s.__dict__  # nothing pickled with the weight
    z.add_(1).clamp_(max=15)
    assert torch.equal(_cuda.sm90_operands(s, z)[1], (-(z.double() * s.double())).to(torch.bfloat16).t())
    n = len(_cuda._SM90_OPERANDS)
    del s
    assert len(_cuda._SM90_OPERANDS) == n - 1  # the entry dies with its weight


def test_sm90_pick():
    """The dispatch rule's choices on an H100 (132 SMs) at the shapes it was fitted to, and its
    group-size rule: K tiles of 128 only for group size 128."""
    from awq_compile._cuda import sm90_pick as pick

    assert pick(16, 28672, 8192, 128, 132) == 7 and pick(16, 28672, 8192, 64, 132) == 3
    assert pick(64, 8192, 28672, 128, 132) == 8  # few tiles, but long K splits
    assert pick(16, 4096, 11008, 128, 132) == 10 and pick(16, 4096, 11008, 64, 132) == 0
    assert pick(64, 8192, 8192, 128, 132) == 9 and pick(128, 8192, 8192, 128, 132) == 2
    assert pick(129, 4096, 4096, 64, 132) == pick(2048, 28672, 8192, 128, 132) == 6
    assert all(pick(m, n, 4096, 64, 132) < 7 for m in (9, 64, 128) for n in (4096, 28672))


def test_fold_dispatch_rule(monkeypatch):
    """Which decode shapes the op sends to the folded GEMV, token count by token count: the rule
    read off the H200 tables (RESULTS.md section 4, sessions 9, 24 and 25). It needs no GPU."""
    from awq_compile import _cuda

    monkeypatch.delenv("AWQ_FOLD", raising=False)
    monkeypatch.delenv("AWQ_FOLD_MAX_M", raising=False)
    # (n, k): 7B's q/k/v together, o, gate/up together, down; 8192x8192; 8192x28672; 28672x8192
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
              "8192": (8192, 8192), "wide": (28672, 8192), "long": (8192, 28672)}
    picked = {m: {name for name, (n, k) in shapes.items() if _cuda.use_fold(m, n, k, 128)} for m in range(1, 18)}
    assert picked[1] == {"gate_up", "wide"}
    assert picked[2] == picked[4] == {"qkv", "gate_up", "down", "wide", "long"}
    assert picked[6] == picked[8] == {"qkv", "gate_up", "down", "wide"}
    assert all(picked[m] == set(shapes) - {"long"} for m in range(9, 17))
    assert picked[17] == set()
    assert not _cuda.use_fold(2, 12288, 4096, 64)  # group size 128 only
    monkeypatch.setenv("AWQ_FOLD_MAX_M", "8")
    assert not _cuda.use_fold(9, 12288, 4096, 128) and _cuda.use_fold(8, 12288, 4096, 128)
    monkeypatch.setenv("AWQ_FOLD", "0")
    assert not any(_cuda.use_fold(m, n, k, 128) for m in range(1, 17) for n, k in shapes.values())
