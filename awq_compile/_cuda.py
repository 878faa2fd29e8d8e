"""CUDA kernels for `awq::int4_linear`, from the plain shared library built out of csrc/.

The library has a C ABI (csrc/awq_int4.h) and is loaded with ctypes, so it does not depend on
torch's C++ ABI. Lookup: $AWQ_COMPILE_CUDA_LIB, else awq_compile/_lib/libawq_int4.so (built by
`python -m awq_compile.build_kernels`; docs/kernels.md). If it is missing or fails to load, nothing
is registered and the op keeps its reference implementation: importing this module never fails.

Dispatch by M (tokens) and N: where `use_fold(M, N, K, g)` says (M <= 16, g = 128; wide or long
weights at M <= 8, K <= 11008 and N <= 28672 above) the folded tensor-core GEMV (int4_gemv_fold.cu),
else M <= `simt_max_m(N, K)` runs the CUDA-core GEMV (int4_gemv_simt.cu), M <= `tc_max_m(N, K)` the
register-streaming tensor-core kernel (int4_gemv_tc.cu), M <= `mma_max_m(N, K)` the cp.async
tensor-core kernel (int4_gemv_mma.cu); M >= `SM90_MIN_M` on sm_90 runs the CUTLASS mixed-input GEMM
(int4_gemm_sm90.cu; `sm90_config` picks its tile by M, N, K and group size), and a larger M
elsewhere dequantizes the weight (int4_dequant.cu) and calls cuBLAS through torch.
`awq::int4_linear_multi` (linears that read one x, fused by the backend) runs all its weights in one
launch: of the folded GEMV where `use_fold` says (N the weights' rows together), else of the
CUDA-core GEMV up to `simt_max_m`, then, on sm_90 and for M <= `pc_max_m(N, K)`, of the
producer/consumer kernel (int4_gemv_pc.cu: bulk copies into a shared-memory ring).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.weak

from .ops import (DECODE_ATTENTION_MAX_ROWS, add_rms_norm, cache_positions, check_add_rms_norm_args,
                  check_decode_attention_args, check_int4_linear_args, check_int4_linear_glu_args,
                  check_int4_linear_multi_args, check_int4_linear_rope_cache_args, rotate_heads)

__all__ = ["library_path", "load_library", "available", "gemm_mma", "gemm_pc", "gemm_simt", "gemm_simt_multi", "gemm_tc",
           "dequantize_cuda", "int4_linear_cuda", "int4_linear_multi_cuda", "mma_max_m", "pc_max_m", "simt_max_m",
           "tc_max_m", "use_fold", "gemm_fold", "split_k_slices", "int4_linear_partials_cuda", "gemm_sm90", "sm90_config", "sm90_operands", "sm90_pick", "sm90_splits", "ENV_VAR",
           "fused_norm_applies", "NORM_MAX_M", "int4_linear_glu_norm_cuda", "int4_linear_rope_cache_norm_cuda",
           "decode_attention_applies", "decode_attention_cuda", "ATTENTION_MAX_ROUNDS", "add_rms_norm_applies",
           "add_rms_norm_cuda"]

ENV_VAR = "AWQ_COMPILE_CUDA_LIB"
_ABI_VERSION = 15
_DTYPES = {torch.float16: 0, torch.bfloat16: 1}

# Largest M served by the weight-streaming kernel; above it, dequantize + cuBLAS. Measured on an
# H200 (benchmarks/RESULTS.md, section 4): the kernel wins at M = 64 on 8192x28672, 28672x8192 and
# 8192x8192 (237/249/76 us vs 291/297/93) and loses from M = 128 on; 4096x4096 ties at M = 64.
MMA_MAX_M = 64


# Largest M served by the CUDA-core GEMV (int4_gemv_simt.cu; it accepts M <= 8). Measured on an
# H200 (benchmarks/RESULTS.md, section 4): at M = 1 it beats the mma kernel on every shape timed
# (55.6 / 54.9 / 20.4 us vs 66.0 / 66.6 / 27.5 on 8192x28672, 28672x8192, 8192x8192); at M = 2 it
# loses on the two large shapes (72 vs 66.5 us), so M >= 2 stays on the mma kernel.
SIMT_MAX_M = 1


# The register-streaming kernel (int4_gemv_tc.cu, M <= 8) against the cp.async one, measured on
# an H100 and an H200 (benchmarks/RESULTS.md, section 4): 5-15% faster at M = 2..8 when N <= 8192
# (28672x8192, 8192x8192, 4096x4096), slower when N = 28672; at M = 1 the CUDA-core GEMV wins.
TC_MAX_M = 8
TC_MAX_N = 8192


# The producer/consumer kernel (int4_gemv_pc.cu, M <= 8, sm_90 only) serves int4_linear_multi
# above SIMT_MAX_M: one launch for q/k/v (or gate/up) against one kernel each, measured on an H100
# under CUDA graphs (benchmarks/RESULTS.md, section 4): 29.3 -> 22.0 us for q/k/v at M = 8, 41.1 ->
# 32.1 for gate/up. At M = 1 the CUDA-core GEMV's own multi-weight launch is faster (q/k/v 17.0
# vs 20.3 us, gate/up 23.8 vs 27.8). One weight alone, it is slower than the CUDA-core GEMV at
# M = 1 and mixed against the tc / mma kernels at M = 2..8, so int4_linear does not use it.
# $AWQ_PC=0 switches it off.
PC_MAX_M = 8


# The folded tensor-core decode kernel (int4_gemv_fold.cu, M <= 16, group size 128) serves
# int4_linear, int4_linear_multi, int4_linear_glu (its pair mode) and q/k/v with the rotation (its
# rope mode) where `use_fold` says, ahead of the other decode kernels and the CUTLASS GEMM.
# $AWQ_FOLD=0 switches it off.
FOLD_MAX_M = 16

# The CUTLASS prefill GEMM (int4_gemm_sm90.cu) serves every M above the decode kernels' range
# on sm_90 (measured on an H100: at M = 16 it beats the mma kernel on all six shapes timed,
# benchmarks/RESULTS.md, section 4).
SM90_MIN_M = 9
# (weight rows, tokens) of each configuration's tile (int4_gemm_sm90.cu); 7 and up have K tiles of
# 128 and serve group size 128 only.
SM90_TILE_SHAPES = ((128, 16), (128, 64), (128, 128), (256, 16), (256, 64), (256, 128), (128, 256), (256, 16),
                    (256, 64), (128, 64), (128, 16))


@functools.lru_cache(maxsize=64)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm90_splits(m: int, n: int, k: int, config: int, sms: int) -> int:
    """An explicit split-K: as many K parts as fit the SMs left idle by too few output tiles, each
    part at least 8 K tiles of 64; 0 (CUTLASS's own stream-K choice) when the tiles fill the SMs."""
    if not 0 <= config < len(SM90_TILE_SHAPES):
        return 0
    rows, toks = SM90_TILE_SHAPES[config]
    tiles = -(-n // rows) * -(-m // toks)
    splits = min(sms // max(tiles, 1), k // 64 // 8, 64)
    return splits if splits >= 2 else 0


@functools.lru_cache(maxsize=64)
def _sm90(device: int) -> bool:
    # sm_90a code (the pc kernel, the CUTLASS GEMM) runs on sm_90 only: it is not forward compatible.
    return torch.cuda.get_device_capability(device) == (9, 0)


def pc_max_m(n: int, k: int, device: int | None = None) -> int:
    """Largest M that goes to the producer/consumer kernel (0: none, on this device)."""
    if os.environ.get("AWQ_PC") == "0":
        return 0
    return PC_MAX_M if _sm90(torch.cuda.current_device() if device is None else device) else 0


def sm90_config(m: int, n: int, k: int, group_size: int, device: int | None = None) -> int:
    """Tile configuration of the CUTLASS GEMM for this call, or -1 when it does not serve it (not
    sm_90, M below SM90_MIN_M, sizes it cannot take, $AWQ_SM90=0)."""
    device = torch.cuda.current_device() if device is None else device
    if (m < SM90_MIN_M or n % 8 or k % 32 or group_size not in (64, 128) or os.environ.get("AWQ_SM90") == "0"
            or not _sm90(device) or load_library().awq_int4_gemm_sm90_configs() == 0):
        return -1
    forced = os.environ.get("AWQ_SM90_CFG")  # experiments: one configuration for every M
    if forced is not None:
        return int(forced)
    return sm90_pick(m, n, k, group_size, _sm_count(device))


def sm90_pick(m: int, n: int, k: int, group_size: int, sms: int) -> int:
    """The configuration for an M x N x K problem on a GPU of `sms` SMs, a rule fitted to 18
    candidates timed on an H100 over six shapes and M = 12..2048 (benchmarks/RESULTS.md, section 4;
    on the first 15, within 2% of the best on geometric mean, 1.3x at worst). Up to M = 128: a token
    tile of 16, 64 or 128 rounded up from M, on 256 weight rows when they give the SMs at least
    half a wave of tiles or leave each K split at least 4096 long, else on 128 rows; K tiles of 128
    for group size 128 (up to M = 64). Above: 128 x 256 tiles in CTA pairs that share their x tile."""
    if m > 128:
        return 6
    k128 = group_size == 128
    if m <= 16:
        toks, small, big = 16, (10 if k128 else 0), (7 if k128 else 3)
    elif m <= 64:
        toks, small, big = 64, (9 if k128 else 1), (8 if k128 else 4)
    else:
        toks, small, big = 128, 2, 5
    tiles = -(-n // 256) * -(-m // toks)
    return big if 2 * tiles >= sms or k // max(1, sms // tiles) >= 4096 else small


def use_fold(m: int, n: int, k: int, group_size: int) -> bool:
    """Whether M tokens times weights of n rows in all (q/k/v together) and K columns go to the
    folded tensor-core decode kernel. The rule is read off H100 runs under CUDA graphs
    (benchmarks/RESULTS.md, section 4, session 9) over 7B's q/k/v, o, gate/up and down, 8192x8192,
    8192x28672 and 28672x8192. At M = 2..8 it beats the tc / pc kernels where n >= 12288 (q/k/v
    16.6-17.2 vs 20.9-21.5 us, gate/up 21.6-24.0 vs 28.5-32.1, 8192x28672) or where K >= 2n with
    n < 8192 (down, 11008x4096: 17.1-18.3 vs 18.8-20.2); it loses on o (4096x4096) and on
    8192x8192. On 28672x8192 (a 70B's down) it wins at M = 2..4 on the H200 (50.5 / 57.9 us
    against 60.5 / 62.4 for the dispatch before; RESULTS.md section 4, session 25), so K >= 2n
    takes n >= 8192 there; at M = 6..8 no one configuration wins (the best, <16, 2, 1> at 6 and
    <8, 3, 2> at 8, are not the default). At M = 1 it beats the CUDA-core GEMV only on the widest
    weights, gate/up (21.3-21.6 vs 23.1-23.5 us, n = 5.4 K) and 8192x28672 (50.6 vs 53.9,
    n = 3.5 K), not on q/k/v (n = 3 K). At M = 9..16 (two token tiles a weight fragment, in its
    <16, 2, 1> configuration) it beats the CUTLASS GEMM and cuBLAS where K <= 11008 and n <=
    28672: every weight of 7B, 8192x8192 and 8192x28672 (H200, M = 12 / 16: q/k/v 16.9 / 17.2 us
    against 64.7 / 47.7 and cuBLAS 41, o 11.5 / 10.6 against 28.3 / 20.8, gate/up 25.5 / 27.0
    against 56, down 17.9 / 18.6 against 40, 8192x8192 24.1 / 24.1 against 33.5 / 27.6,
    8192x28672 54.1 / 60.8 against 65.3; benchmarks/RESULTS.md, section 4, session 24); it loses
    on 28672x8192 (74.3 / 66.8 against 64.5)."""
    max_m = int(os.environ.get("AWQ_FOLD_MAX_M") or FOLD_MAX_M)  # experiments: 8 = without two token tiles
    if os.environ.get("AWQ_FOLD") == "0" or group_size != 128 or not 1 <= m <= min(max_m, FOLD_MAX_M):
        return False
    if m > 8:
        return k <= 11008 and n <= 28672
    return 2 * n >= 7 * k if m == 1 else (n >= 12288 or (k >= 2 * n and (n < 8192 or m <= 4)))


def tc_max_m(n: int, k: int) -> int:
    """Largest M that goes to the register-streaming tensor-core kernel (0: none, for this N)."""
    return TC_MAX_M if n <= TC_MAX_N else 0


def mma_max_m(n: int, k: int) -> int:
    """Crossover M between the two paths for an N x K weight. One measured threshold serves every
    shape timed so far; the signature leaves room for a per-shape table."""
    return MMA_MAX_M


def simt_max_m(n: int, k: int) -> int:
    """Largest M that goes to the CUDA-core GEMV rather than the tensor-core kernel."""
    return SIMT_MAX_M


def library_path() -> Path:
    """Where the library is looked up: $AWQ_COMPILE_CUDA_LIB, else awq_compile/_lib/."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parent / "_lib" / "libawq_int4.so"


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | None:
    """The loaded library, or None (missing file, wrong ABI version, unloadable)."""
    path = library_path()
    if not path.exists():
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.awq_int4_abi_version.restype = ctypes.c_int
    if lib.awq_int4_abi_version() != _ABI_VERSION:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.awq_int4_last_error.restype = ctypes.c_char_p
    lib.awq_int4_gemm_mma.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_mma.restype = i32
    lib.awq_int4_gemm_mma_workspace.argtypes = [i64, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_mma_workspace.restype = i64
    lib.awq_int4_dequant.argtypes = [p, p, p, p, i64, i64, i64, i32, i32, p]
    lib.awq_int4_dequant.restype = i32
    lib.awq_int4_gemm_simt.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_simt.restype = i32
    lib.awq_int4_gemm_simt_workspace.argtypes = [i64, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_simt_workspace.restype = i64
    lib.awq_int4_gemm_simt_multi.argtypes = [p, i32, p, p, p, p, p, p, p, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_simt_multi.restype = i32
    lib.awq_int4_gemm_simt_multi_workspace.argtypes = [i32, p, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_simt_multi_workspace.restype = i64
    lib.awq_int4_gemm_fold.argtypes = [p, i32, p, p, p, p, p, p, p, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_fold.restype = i32
    lib.awq_int4_gemm_fold_workspace.argtypes = [i32, p, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_fold_workspace.restype = i64
    lib.awq_int4_gemm_simt_partials.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_simt_partials.restype = i32
    lib.awq_int4_gemm_fold_glu.argtypes = [p, p, p, p, p, p, i64, p, i64, i64, i64, i64, i32, i32, p, p]
    lib.awq_int4_gemm_fold_glu.restype = i32
    lib.awq_int4_gemm_fold_glu_workspace.argtypes = [i64, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_fold_glu_workspace.restype = i64
    lib.awq_rope_cache.argtypes = [p, p, p, p, p, i64, p, p, p, i64, i64, i64, i64, i64, i64, i32, p]
    lib.awq_rope_cache.restype = i32
    lib.awq_int4_gemm_fold_rope.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i32, i32, p, p, i64, p, p, p, i64,
                                            i64, i64, p, p]
    lib.awq_int4_gemm_fold_rope.restype = i32
    lib.awq_int4_gemm_fold_rope_workspace.argtypes = [p, i64, i64, i64, i32, i32]
    lib.awq_int4_gemm_fold_rope_workspace.restype = i64
    lib.awq_decode_attention.argtypes = [p, p, p, p, p, p, p, p, p, i32, i64, i64, i64, i64, i64, i64,
                                         ctypes.c_float, i32, i32, p]
    lib.awq_decode_attention.restype = i32
    lib.awq_decode_attention_max_rows.restype = i64
    lib.awq_decode_attention_rounds.argtypes = [i64] * 6
    lib.awq_decode_attention_rounds.restype = i64
    lib.awq_add_rms_norm.argtypes = [p, p, i64, i64, i32, p]
    lib.awq_add_rms_norm.restype = i32
    lib.awq_add_rms_norm_max_k.restype = i64
    lib.awq_int4_gemm_tc.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_tc.restype = i32
    lib.awq_int4_tc_max_m.restype = i64
    lib.awq_int4_gemm_pc.argtypes = [p, i32, p, p, p, p, p, p, i64, i64, i64, i32, i32, p]
    lib.awq_int4_gemm_pc.restype = i32
    lib.awq_int4_pc_max_m.restype = i64
    lib.awq_int4_gemm_sm90_configs.restype = i32
    lib.awq_int4_gemm_sm90_workspace.argtypes = [i64, i64, i64, i64, i32, i32, i32, i32]
    lib.awq_int4_gemm_sm90_workspace.restype = i64
    lib.awq_int4_gemm_sm90.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i32, i32, i32, i32, p]
    lib.awq_int4_gemm_sm90.restype = i32
    return lib


def available() -> bool:
    """True when a CUDA device is visible and the kernel library loaded."""
    return torch.cuda.is_available() and load_library() is not None


def _check(rc: int) -> None:
    if rc != 0:
        msg = load_library().awq_int4_last_error().decode(errors="replace")
        raise RuntimeError(f"awq_int4 kernel failed (code {rc}): {msg}")


def _check_cuda_args(x, qweight, scales, zeros, group_size, bias) -> tuple[int, int]:
    n, k = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    _check_cuda_tensors(x, qweight, scales, zeros, bias)
    return n, k


def _check_cuda_tensors(x, qweight, scales, zeros, bias) -> None:
    """What the kernels need beyond the op's shape rules: dtypes, one device, contiguity,
    alignment."""
    dev = x.device
    if (x.dtype not in _DTYPES or scales.dtype != x.dtype
            or (bias is not None and (bias.dtype != x.dtype or bias.device != dev))
            or qweight.device != dev or scales.device != dev or zeros.device != dev
            or not (qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous())
            or (bias is not None and not bias.is_contiguous()) or qweight.data_ptr() % 16):
        _raise_bad_args(x, qweight, scales, zeros, bias)


def _raise_bad_args(x, qweight, scales, zeros, bias) -> None:
    """The slow path of _check_cuda_args: says which rule failed, with every tensor's shape."""
    tensors = {"x": x, "qweight": qweight, "scales": scales, "zeros": zeros}
    if bias is not None:
        tensors["bias"] = bias
    shapes = ", ".join(f"{name} {tuple(t.shape)} {t.dtype} {t.device}" for name, t in tensors.items())
    if x.dtype not in _DTYPES:
        msg = "x must be fp16 or bf16"
    elif scales.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        msg = "scales and bias must have x's dtype"
    elif any(t.device != x.device for t in tensors.values()):
        msg = "all tensors must be on one device"
    elif not all(t.is_contiguous() for name, t in tensors.items() if name != "x"):
        msg = "weight tensors must be contiguous"
    else:
        msg = "qweight must be 16-byte aligned"
    raise ValueError(f"awq::int4_linear (cuda): {msg} ({shapes})")


def _sizes(name: str, x2d, qweight, out) -> tuple[int, int, int, int]:
    """(M, N, K, Kp) of a gemm_* call, after checking x2d and the preallocated out."""
    m, k = x2d.shape
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if not x2d.is_contiguous() or out.shape != (m, n) or out.dtype != x2d.dtype or not out.is_contiguous():
        raise ValueError(f"{name}: x {tuple(x2d.shape)} must be contiguous, out "
                         f"{tuple(out.shape)} {out.dtype} must be contiguous [{m}, {n}] {x2d.dtype}")
    return m, n, k, kp


def _raw_stream(device: torch.device) -> int:
    """The handle of the device's current CUDA stream, for a launch: torch's raw-stream call (what
    inductor's generated code uses) instead of building a torch.cuda.Stream object each call."""
    return torch._C._cuda_getCurrentRawStream(device.index)


# The experiment variables a kernel reads on every call and which change its K split: part of the
# workspace-size cache keys, so that a change of them is a new entry.
_SIMT_ENV = ("AWQ_SIMT_CFG",)
_FOLD_ENV = ("AWQ_FOLD_CFG", "AWQ_FOLD_KS", "AWQ_FOLD_FILL", "AWQ_FOLD_CLUSTER", "AWQ_FOLD_LEAN")


def _env(names: tuple[str, ...]) -> tuple[str | None, ...]:
    return tuple(os.environ.get(v) for v in names)


@functools.lru_cache(maxsize=512)
def _workspace_floats(query: str, device: int, args: tuple, env: tuple) -> int:
    """Floats of split-K workspace the library's `query` (an awq_int4_gemm_*_workspace) asks for
    with `args` (a tuple among them is passed as an int64 array); a -1 from it raises. env: the
    values of the kernel's _SIMT_ENV / _FOLD_ENV variables (part of the cache key)."""
    c_args = [(ctypes.c_int64 * len(a))(*a) if isinstance(a, tuple) else a for a in args]
    with torch.cuda.device(device):
        need = getattr(load_library(), query)(*c_args)
    if need < 0:
        _check(1)
    return need


def _multi_workspace_floats(kernel: str, device: int, m, ns: tuple[int, ...], k, kp, g, dtype: int, env: tuple) -> int:
    """_workspace_floats of awq_int4_gemm_<kernel> (simt_multi, fold) for weights of ns rows."""
    return _workspace_floats(f"awq_int4_gemm_{kernel}_workspace", device, (len(ns), tuple(ns), m, k, kp, g, dtype), env)


def _ptrs(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*(None if t is None else t.data_ptr() for t in tensors))


def gemm_simt(x2d, qweight, scales, zeros, group_size, bias, out) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias via the CUDA-core GEMV (M <= 8); arguments as
    gemm_mma's. The library's one-weight entry, not gemm_simt_multi's lists: an eager decode calls
    this for most linears at one token, and the C arrays cost host time (session 25)."""
    return _launch_one("simt", _SIMT_ENV, x2d, qweight, scales, zeros, group_size, bias, out)


def _multi_arrays(name: str, x2d, qweights, scales, zeros, biases, outs):
    """ctypes arrays (qweights, scales, zeros, biases, outs, Ns) of a multi-weight launch and its
    (M, K, Kp), after checking that the lists match and every weight has x's packed K."""
    n = len(qweights)
    if not (len(scales) == len(zeros) == len(biases) == len(outs) == n):
        raise ValueError(f"{name}: {n} qweights but {len(scales)} scales, {len(zeros)} zeros, "
                         f"{len(biases)} biases, {len(outs)} outs")
    kp = qweights[0].shape[1] * 2
    m, k = x2d.shape
    for qw, out in zip(qweights, outs):
        if qw.shape[1] * 2 != kp:
            raise ValueError(f"{name}: the weights' packed K differ ({qw.shape[1] * 2} vs {kp})")
        _sizes(name, x2d, qw, out)
    ptrs = [_ptrs(ts) for ts in (qweights, scales, zeros, biases, outs)]
    ptrs.append((ctypes.c_int64 * n)(*(qw.shape[0] for qw in qweights)))
    return ptrs, (m, k, kp)


def _launch_multi(kernel: str, name: str, env_vars: tuple[str, ...], x2d, qweights, scales, zeros, group_size,
                  biases, outs) -> list[torch.Tensor]:
    """One launch of awq_int4_gemm_<kernel> (simt_multi, fold) for 1..4 weights that share x, with
    the split-K workspace it asks for allocated per call: a cached buffer first allocated during
    torch.compile's CUDA-graph warm-up would sit in the graph's private pool untracked, which
    mode="reduce-overhead" refuses. Its contents on entry do not matter. name: the caller, for
    error messages; env_vars: what the kernel's K split depends on."""
    ptrs, (m, k, kp) = _multi_arrays(name, x2d, qweights, scales, zeros, biases, outs)
    dev = x2d.device
    dt = _DTYPES[x2d.dtype]
    ns = tuple(qw.shape[0] for qw in qweights)
    need = _multi_workspace_floats(kernel, dev.index, m, ns, k, kp, group_size, dt, _env(env_vars))
    ws = torch.empty(need, dtype=torch.float32, device=dev) if need > 0 else None
    _check(getattr(load_library(), f"awq_int4_gemm_{kernel}")(
        x2d.data_ptr(), len(ns), *ptrs, None if ws is None else ws.data_ptr(), 0 if ws is None else ws.numel(),
        m, k, kp, group_size, dt, _raw_stream(dev)))
    return outs


def gemm_simt_multi(x2d, qweights, scales, zeros, group_size, biases, outs) -> list[torch.Tensor]:
    """outs[i][M, N_i] = x2d[M, K] @ W_i^T + biases[i] for 1..4 weights that share x, in one launch
    of the CUDA-core GEMV (M <= 8); lists as gemm_pc's. Its split-K workspace (only when x
    outgrows shared memory) may hold anything on entry."""
    return _launch_multi("simt_multi", "gemm_simt", _SIMT_ENV, x2d, qweights, scales, zeros, group_size, biases,
                         outs)


def gemm_fold(x2d, qweights, scales, zeros, group_size, biases, outs) -> list[torch.Tensor]:
    """outs[i][M, N_i] = x2d[M, K] @ W_i^T + biases[i] for 1..4 weights that share x, in one launch
    of the folded tensor-core decode kernel (M <= 16, group size 128); lists as gemm_simt_multi's,
    and a split-K workspace per call as there (none where the K slices are summed in a cluster)."""
    return _launch_multi("fold", "gemm_fold", _FOLD_ENV, x2d, qweights, scales, zeros, group_size, biases, outs)


def gemm_tc(x2d, qweight, scales, zeros, group_size, bias, out) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias via the register-streaming tensor-core decode kernel
    (int4_gemv_tc.cu, M <= 8); arguments as gemm_mma's. Needs no workspace."""
    m, n, k, kp = _sizes("gemm_tc", x2d, qweight, out)
    stream = _raw_stream(x2d.device)
    _check(load_library().awq_int4_gemm_tc(
        x2d.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(),
        m, n, k, kp, group_size, _DTYPES[x2d.dtype], stream))
    return out


def gemm_pc(x2d, qweights, scales, zeros, group_size, biases, outs) -> list[torch.Tensor]:
    """outs[i][M, N_i] = x2d[M, K] @ W_i^T + biases[i] for 1..4 weights that share x, in one launch
    of the producer/consumer kernel (int4_gemv_pc.cu, M <= 8, sm_90). Lists of equal length;
    arguments as gemm_mma's otherwise. Needs no workspace."""
    ptrs, (m, k, kp) = _multi_arrays("gemm_pc", x2d, qweights, scales, zeros, biases, outs)
    stream = _raw_stream(x2d.device)
    _check(load_library().awq_int4_gemm_pc(
        x2d.data_ptr(), len(qweights), *ptrs, m, k, kp, group_size, _DTYPES[x2d.dtype], stream))
    return outs


def gemm_mma(x2d, qweight, scales, zeros, group_size, bias, out) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias via the weight-streaming kernel; arguments as the op's,
    x2d contiguous, out preallocated (tests poison it first). Its split-K workspace is allocated per
    call (for the reason _launch_multi gives) and may hold anything on entry."""
    return _launch_one("mma", (), x2d, qweight, scales, zeros, group_size, bias, out)


def _launch_one(kernel: str, env_vars: tuple[str, ...], x2d, qweight, scales, zeros, group_size, bias,
                out) -> torch.Tensor:
    """One launch of a one-weight entry awq_int4_gemm_<kernel> (mma, simt) with the split-K
    workspace its awq_int4_gemm_<kernel>_workspace asks for, allocated per call (for the reason
    _launch_multi gives); env_vars: what that workspace depends on."""
    m, n, k, kp = _sizes(f"gemm_{kernel}", x2d, qweight, out)
    dev, dt = x2d.device, _DTYPES[x2d.dtype]
    need = _workspace_floats(f"awq_int4_gemm_{kernel}_workspace", dev.index, (m, n, k, kp, group_size, dt),
                             _env(env_vars))
    ws = torch.empty(need, dtype=torch.float32, device=dev) if need > 0 else None
    _check(getattr(load_library(), f"awq_int4_gemm_{kernel}")(
        x2d.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), None if ws is None else ws.data_ptr(),
        0 if ws is None else ws.numel(), m, n, k, kp, group_size, dt, _raw_stream(dev)))
    return out


# scales tensor -> ((versions and pointers), (s^T, -z*s^T)); an entry dies with its scales tensor.
# Not an attribute on the tensor: torch.save pickles a tensor's __dict__.
_SM90_OPERANDS = torch.utils.weak.WeakIdKeyDictionary()


@functools.lru_cache(maxsize=64)
def _side_stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=1)
def _builder() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="awq-sm90-operands")


def _build_sm90_operands(scales, zeros) -> tuple[torch.Tensor, torch.Tensor]:
    s_t = scales.t().contiguous()
    z_t = (zeros.t().float() * s_t.float()).neg_().to(scales.dtype)  # one rounding, as the header says
    return s_t, z_t.contiguous()


def _build_off_thread(scales, zeros) -> tuple[torch.Tensor, torch.Tensor]:
    """_build_sm90_operands on a worker thread and a side stream, ordered after the current
    stream's work and before what it queues next. torch.compile's CUDA-graph trees run their
    warm-up with this thread's allocations routed to the graph's private pool; a tensor kept from
    there would sit in that pool untracked, which they refuse ("tensor(s) in the cudagraph pool
    not tracked as outputs"). The worker's allocations go to the ordinary pool."""
    main = torch.cuda.current_stream(scales.device)
    ready = torch.cuda.Event()
    ready.record(main)

    def work():
        side = _side_stream(scales.device.index)
        with torch.cuda.device(scales.device), torch.cuda.stream(side):
            side.wait_event(ready)
            ops = _build_sm90_operands(scales, zeros)
            done = torch.cuda.Event()
            done.record(side)
        return ops, done

    ops, done = _builder().submit(work).result()
    main.wait_event(done)
    return ops


def sm90_operands(scales, zeros) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales^T, (-zeros * scales)^T), both [Kp/g, N] in scales' dtype: what the CUTLASS GEMM reads
    in place of scales and zeros (it dequantizes as q * s + z'). Built once per weight and kept
    while the scales tensor lives; rebuilt if either tensor was modified in place or re-pointed
    (version counters, data pointers), and never cached during CUDA-graph capture. On the GPU the
    kept pair is built off this thread (_build_off_thread says why)."""
    key = (scales._version, zeros._version, scales.data_ptr(), zeros.data_ptr())
    hit = _SM90_OPERANDS.get(scales)
    if hit is not None and hit[0] == key:
        return hit[1]
    if not scales.is_cuda:
        ops = _build_sm90_operands(scales, zeros)
    elif torch.cuda.is_current_stream_capturing():
        return _build_sm90_operands(scales, zeros)  # used by this graph only, not kept
    else:
        ops = _build_off_thread(scales, zeros)
    _SM90_OPERANDS[scales] = (key, ops)
    return ops


@functools.lru_cache(maxsize=256)
def _sm90_workspace_bytes(device: int, m, n, k, kp, g, dtype: int, config: int, splits: int) -> int:
    with torch.cuda.device(device):
        need = load_library().awq_int4_gemm_sm90_workspace(m, n, k, kp, g, dtype, config, splits)
    if need < 0:
        _check(1)
    return need


def gemm_sm90(x2d, qweight, scales, zeros, group_size, bias, out, config: int | None = None,
              splits: int | None = None) -> torch.Tensor:
    """out[M, N] = x2d[M, K] @ W^T + bias via the CUTLASS mixed-input GEMM (sm_90 only); arguments
    as gemm_mma's. config: the tile configuration (default: sm90_config's choice for this M);
    splits: an explicit split-K, 0 for CUTLASS's own stream-K choice (default: sm90_splits)."""
    m, n, k, kp = _sizes("gemm_sm90", x2d, qweight, out)
    dev = x2d.device
    if config is None:
        config = sm90_config(m, n, k, group_size, dev.index)
        if config < 0:
            raise ValueError(f"gemm_sm90: the CUTLASS GEMM does not serve M={m} N={n} K={k} "
                             f"group_size={group_size} on this device")
    if splits is None:
        splits = sm90_splits(m, n, k, config, _sm_count(dev.index))
    dt = _DTYPES[x2d.dtype]
    s_t, z_t = sm90_operands(scales, zeros)
    need = _sm90_workspace_bytes(dev.index, m, n, k, kp, group_size, dt, config, splits)
    ws = torch.empty(need, dtype=torch.uint8, device=dev) if need > 0 else None
    stream = _raw_stream(dev)
    _check(load_library().awq_int4_gemm_sm90(
        x2d.data_ptr(), qweight.data_ptr(), s_t.data_ptr(), z_t.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(),
        None if ws is None else ws.data_ptr(), need, m, n, k, kp, group_size, dt, config, splits, stream))
    return out


def dequantize_cuda(qweight, scales, zeros, group_size, k, out=None) -> torch.Tensor:
    """The float weight [N, k] in scales' dtype, bit-identical to quant.dequantize in that dtype."""
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if out is None:
        out = torch.empty((n, k), dtype=scales.dtype, device=qweight.device)
    stream = _raw_stream(qweight.device)
    _check(load_library().awq_int4_dequant(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
        n, k, kp, group_size, _DTYPES[scales.dtype], stream))
    return out


def int4_linear_cuda(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    """The CUDA implementation of awq::int4_linear: check -> flatten -> allocate -> dispatch ->
    reshape."""
    n, k = _check_cuda_args(x, qweight, scales, zeros, group_size, bias)
    x2d = x.reshape(-1, k).contiguous()
    m = x2d.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return int4_linear_cuda(x, qweight, scales, zeros, group_size, bias)
    if use_fold(m, n, k, group_size):
        y = gemm_fold(x2d, [qweight], [scales], [zeros], group_size, [bias], [x2d.new_empty((m, n))])[0]
    elif m <= simt_max_m(n, k):
        y = gemm_simt(x2d, qweight, scales, zeros, group_size, bias, x2d.new_empty((m, n)))
    elif m <= tc_max_m(n, k):
        y = gemm_tc(x2d, qweight, scales, zeros, group_size, bias, x2d.new_empty((m, n)))
    elif (cfg := sm90_config(m, n, k, group_size, x.device.index)) >= 0 and x2d.data_ptr() % 16 == 0 and (
            bias is None or bias.data_ptr() % 16 == 0):
        y = gemm_sm90(x2d, qweight, scales, zeros, group_size, bias, x2d.new_empty((m, n)), cfg)
    elif m <= mma_max_m(n, k):
        y = gemm_mma(x2d, qweight, scales, zeros, group_size, bias, x2d.new_empty((m, n)))
    else:
        y = F.linear(x2d, dequantize_cuda(qweight, scales, zeros, group_size, k), bias)
    return y.reshape(*x.shape[:-1], n)


def split_k_slices(m: int, n: int, k: int, kp: int, group_size: int, dtype: torch.dtype, device: int) -> int:
    """How many K slices awq::int4_linear at these sizes sums in a second kernel launch on this
    device: the CUDA-core GEMV's plan (M <= simt_max_m and not the folded GEMV, which sums its
    slices in a cluster); 0 where the call takes one launch. The pass `defer_split_k` hands
    those sums to the graph (awq::int4_linear_partials)."""
    if (dtype not in _DTYPES or not 1 <= m <= simt_max_m(n, k) or use_fold(m, n, k, group_size)
            or load_library() is None):
        return 0
    need = _multi_workspace_floats("simt_multi", device, m, (n,), k, kp, group_size, _DTYPES[dtype], _env(_SIMT_ENV))
    return need // (m * n)


def int4_linear_partials_cuda(x, qweight, scales, zeros, group_size, slices) -> torch.Tensor:
    """The CUDA implementation of awq::int4_linear_partials: the CUDA-core GEMV's K-slice partials
    as its plan cuts K, where the plan has `slices` slices (what `defer_split_k` asked for);
    otherwise (the plan changed since, e.g. $AWQ_SIMT_CFG) int4_linear's result in slice 0 and
    zeros in the others, which sum to the same product rounded once more."""
    n, k = _check_cuda_args(x, qweight, scales, zeros, group_size, None)
    x2d = x.reshape(-1, k).contiguous()
    m, kp = x2d.shape[0], qweight.shape[1] * 2
    out = torch.empty((slices, m, n), dtype=torch.float32, device=x.device)
    dev = x.device.index
    if m > 0 and dev == torch.cuda.current_device() and split_k_slices(m, n, k, kp, group_size, x.dtype, dev) == slices:
        _check(load_library().awq_int4_gemm_simt_partials(
            x2d.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), out.numel(),
            m, n, k, kp, group_size, _DTYPES[x.dtype], _raw_stream(x.device)))
    else:
        out.zero_()
        if m > 0:
            out[0] = int4_linear_cuda(x2d, qweight, scales, zeros, group_size, None).float()
    return out.reshape(slices, *x.shape[:-1], n)


def int4_linear_multi_cuda(x, qweights, scales, zeros, group_size, biases) -> list[torch.Tensor]:
    """The CUDA implementation of awq::int4_linear_multi: one launch for all the weights where a
    kernel serves this M (the folded GEMV where use_fold says, else the CUDA-core GEMV up to
    simt_max_m, then on sm_90 the producer/consumer kernel up to pc_max_m), else one
    int4_linear_cuda call each."""
    ns = check_int4_linear_multi_args(x, qweights, scales, zeros, group_size, biases)
    k = x.shape[-1]  # > 0: the check above holds K to the packed weight's
    m = x.numel() // k
    if m > 0 and x.device.index == torch.cuda.current_device():
        gemm = (gemm_fold if use_fold(m, sum(ns), k, group_size) else
                gemm_simt_multi if m <= simt_max_m(sum(ns), k) else
                gemm_pc if m <= pc_max_m(ns[0], k, x.device.index) else None)
        if gemm is not None:
            for args in zip(qweights, scales, zeros, biases):
                _check_cuda_tensors(x, *args)
            x2d = x.reshape(-1, k).contiguous()
            outs = [x2d.new_empty((m, n)) for n in ns]
            gemm(x2d, list(qweights), list(scales), list(zeros), group_size, list(biases), outs)
            return [y.reshape(*x.shape[:-1], y.shape[1]) for y in outs]
    return [int4_linear_cuda(x, *args[:3], group_size, args[3])
            for args in zip(qweights, scales, zeros, biases)]


def gemm_fold_glu(x2d, qweights, scales, zeros, group_size, biases, out, norm=None) -> torch.Tensor:
    """out[M, N] = silu(x2d @ Wg^T + bg) * (x2d @ Wu^T + bu) in one launch of the folded decode
    kernel (M <= 16, group size 128); qweights, scales, zeros, biases: [gate, up]. Each
    linear is rounded to x's dtype first, the product made in fp32 and rounded once (as inductor's
    fused elementwise kernel makes it from the two outputs). norm: an _AwqNormIn (x2d is then the
    residual, not read: x is made from the norm's tensors) or None."""
    if len(qweights) != 2 or qweights[0].shape != qweights[1].shape:
        raise ValueError(f"gemm_fold_glu: needs a gate and an up weight of one shape, got "
                         f"{[tuple(q.shape) for q in qweights]}")
    ptrs, (m, k, kp) = _multi_arrays("gemm_fold_glu", x2d, qweights, scales, zeros, biases, [out, out])
    dev = x2d.device
    dt = _DTYPES[x2d.dtype]
    n = out.shape[1]
    need = _workspace_floats("awq_int4_gemm_fold_glu_workspace", dev.index, (n, m, k, kp, group_size, dt),
                             _env(_FOLD_ENV))
    ws = torch.empty(need, dtype=torch.float32, device=dev) if need > 0 else None
    _check(load_library().awq_int4_gemm_fold_glu(
        x2d.data_ptr(), *ptrs[:4], out.data_ptr(), n, None if ws is None else ws.data_ptr(),
        0 if ws is None else ws.numel(), m, k, kp, group_size, dt, norm, _raw_stream(dev)))
    return out


def int4_linear_glu_cuda(x, qweights, scales, zeros, group_size, biases) -> torch.Tensor:
    """The CUDA implementation of awq::int4_linear_glu: one launch of the folded GEMV's pair mode
    where use_fold says (for both weights' rows together), else int4_linear_multi_cuda and the
    product made in fp32 and rounded once, as the kernel makes it."""
    n, k = check_int4_linear_glu_args(x, qweights, scales, zeros, group_size, biases)
    m = x.numel() // k
    if m > 0 and x.device.index == torch.cuda.current_device() and use_fold(m, 2 * n, k, group_size):
        for args in zip(qweights, scales, zeros, biases):
            _check_cuda_tensors(x, *args)
        x2d = x.reshape(-1, k).contiguous()
        y = gemm_fold_glu(x2d, list(qweights), list(scales), list(zeros), group_size, list(biases),
                          x2d.new_empty((m, n)))
        return y.reshape(*x.shape[:-1], n)
    gate, up = int4_linear_multi_cuda(x, qweights, scales, zeros, group_size, biases)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def _fold_rope_applies(x, qweights, group_size: int, d: int) -> bool:
    """Whether the folded GEMV takes q/k/v with the rotation in its epilogue: where int4_linear_multi
    would launch it (use_fold), and at one token, with a head dim of whole tiles, and K slices
    summed in a cluster or not split (no workspace). At one token use_fold leaves 7B's q/k/v
    (n = 3 K) to the CUDA-core GEMV, ~1 us faster alone, but the rope mode also saves the
    awq_rope_cache launch and its gap: H200, 7B batch-1 decode 434.8 / 434.4 -> 438.7 / 438.3
    tokens/s, two runs each (benchmarks/RESULTS.md, section 3, session 12); 13B not measured."""
    k = x.shape[-1]
    m, ns, kp = x.numel() // k, tuple(q.shape[0] for q in qweights), qweights[0].shape[1] * 2
    one = m == 1 and group_size == 128 and os.environ.get("AWQ_FOLD") != "0"
    if d % 16 or not (one or use_fold(m, sum(ns), k, group_size)):
        return False
    args = (ns, m, k, kp, group_size, _DTYPES[x.dtype])
    return _workspace_floats("awq_int4_gemm_fold_rope_workspace", x.device.index, args, _env(_FOLD_ENV)) == 0


def _gemm_fold_rope(x, qweights, scales, zeros, group_size, biases, cos, sin, bstride, positions, k_cache, v_cache,
                    d: int, norm=None) -> torch.Tensor:
    """One launch of awq_int4_gemm_fold_rope: q [M, Nq] rotated, k rotated and v into the caches.
    norm: an _AwqNormIn (x is then the residual, not read) or None."""
    for args in zip(qweights, scales, zeros, biases):
        _check_cuda_tensors(x, *args)
    k = x.shape[-1]
    x2d = x.reshape(-1, k).contiguous()
    m, kp = x2d.shape[0], qweights[0].shape[1] * 2
    q = x2d.new_empty((m, qweights[0].shape[0]))
    ptrs = [_ptrs(ts) for ts in (qweights, scales, zeros, biases)]
    ns = (ctypes.c_int64 * 3)(*(qw.shape[0] for qw in qweights))
    _check(load_library().awq_int4_gemm_fold_rope(
        x2d.data_ptr(), *ptrs, q.data_ptr(), ns, m, k, kp, group_size, _DTYPES[x.dtype], cos.data_ptr(),
        sin.data_ptr(), bstride, positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), x.shape[1],
        k_cache.shape[2], d, norm, _raw_stream(x.device)))
    return q


def _rope_kernels_take(x, cos, sin, k_cache, v_cache) -> bool:
    """Whether the rope kernels read these tensors as they are (x's dtype a kernel's, rows of cos
    and sin and the caches contiguous, B * S in a grid's range, x on the current device)."""
    b, s, d = x.shape[0], x.shape[1], k_cache.shape[-1]
    rows_ok = (all(t.stride(3) == 1 and (s == 1 or t.stride(2) == d) for t in (cos, sin))
               and (cos.shape[0] == 1 or cos.stride(0) == sin.stride(0)))
    return (x.dtype in _DTYPES and rows_ok and k_cache.is_contiguous() and v_cache.is_contiguous()
            and 0 < b * s <= 65535 and x.device.index == torch.cuda.current_device())


def _kernel_positions(cache_position: torch.Tensor, tokens: int) -> torch.Tensor:
    """int64 positions the rope kernels read as pos[s], s < tokens: a 0-d cache_position (the first
    position) is read in place at one token (pos[0] is it: a decode step reads the cache's counter
    itself, no kernel makes positions), else made into cache_position + arange(tokens)."""
    if cache_position.dim() == 0 and tokens == 1:
        return cache_position
    return cache_positions(cache_position, tokens).contiguous()


def int4_linear_rope_cache_cuda(x, qweights, scales, zeros, group_size, biases, cos, sin, cache_position,
                                k_cache, v_cache) -> torch.Tensor:
    """The CUDA implementation of awq::int4_linear_rope_cache: where the folded GEMV takes q/k/v
    (_fold_rope_applies), one launch of it with the rotation and the cache writes in its epilogue;
    else int4_linear_multi_cuda (one launch at decode sizes) and one launch of awq_rope_cache for
    the rotation and the writes. The rotation is the same math either way (fp32 from the rounded
    projection, rounded once), so at M = 2..8, where the projection is the folded GEMV's in both,
    the two are bit-equal; at one token the second form's projection is the CUDA-core GEMV's.
    Tensors the kernels cannot take (another dtype, rows of cos or sin or a cache not contiguous)
    get the same math from torch ops."""
    hq, hkv, d, length = check_int4_linear_rope_cache_args(x, qweights, scales, zeros, group_size, biases, cos,
                                                           sin, cache_position, k_cache, v_cache)
    b, s = x.shape[0], x.shape[1]
    kernels = _rope_kernels_take(x, cos, sin, k_cache, v_cache)
    bstride = cos.stride(0) if cos.shape[0] > 1 else 0
    pos = _kernel_positions(cache_position, s)
    if kernels and _fold_rope_applies(x, qweights, group_size, d):
        return _gemm_fold_rope(x, qweights, scales, zeros, group_size, biases, cos, sin, bstride, pos,
                               k_cache, v_cache, d).view(b, s, hq * d)
    q, k, v = int4_linear_multi_cuda(x, qweights, scales, zeros, group_size, biases)
    if b * s == 0:
        return q
    if kernels:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        _check(load_library().awq_rope_cache(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), bstride,
            pos.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), b, s, hq, hkv, d, length,
            _DTYPES[x.dtype], _raw_stream(x.device)))
        return q
    cf, sf = cos.float(), sin.float()

    def rotate(t: torch.Tensor, heads: int) -> torch.Tensor:  # in fp32, rounded once, as the kernels
        return rotate_heads(t.view(b, s, heads, d).transpose(1, 2).float(), cf, sf).to(x.dtype)

    pos = cache_positions(cache_position, s)
    k_cache.index_copy_(2, pos, rotate(k, hkv))
    v_cache.index_copy_(2, pos, v.view(b, s, hkv, d).transpose(1, 2))
    return rotate(q, hq).transpose(1, 2).reshape(b, s, hq * d)


NORM_MAX_M = 1
"""Largest M at which the folded GEMV makes the residual add + RMSNorm in its x staging
(fused_norm_applies). H200, 7B decode, two calls each (benchmarks/RESULTS.md, section 3,
session 13): at one token +0.9% and +1.3% tokens/s against inductor's norm kernel; at batch 8
-0.05% and -0.1%: every block reads its K slice of the residual and delta rows (128 KB a block
at M = 8 without a K split, from L2, against 64 KB of x), which costs what the norm kernel and
its launch gap did. M = 2..7 were not measured and are left to inductor's kernel."""


class _AwqNormIn(ctypes.Structure):
    """awq_norm_in (csrc/awq_int4.h): the residual add + RMSNorm in front of the folded GEMV's
    pair and rope modes."""

    _fields_ = [("residual", ctypes.c_void_p), ("delta", ctypes.c_void_p), ("partials", ctypes.c_void_p),
                ("delta_bias", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("h", ctypes.c_void_p),
                ("slices", ctypes.c_int64), ("eps", ctypes.c_float)]


def fused_norm_applies(kind: str, x: torch.Tensor, qweights, group_size: int, head_dim: int = 0) -> bool:
    """Whether the CUDA kernels make the residual add + RMSNorm of `awq::int4_linear_glu_norm`
    (kind "glu") or `awq::int4_linear_rope_cache_norm` (kind "rope") inside the projection's
    launch for an x of this size (x may be a fake tensor: only its shape, dtype and device are
    read): the folded GEMV's pair or rope mode with a plan that needs no workspace (the K slices'
    sums of h^2 are added in the cluster), K a multiple of 8, M <= NORM_MAX_M. Where not, the op
    runs the norm as torch ops first, slower than inductor's one kernel, so the pass
    fuse_add_rms_norm asks this."""
    if kind not in ("glu", "rope"):
        raise ValueError(f"fused_norm_applies: kind must be 'glu' or 'rope', got {kind!r}")
    if load_library() is None or x.device.type != "cuda" or x.dtype not in _DTYPES or x.dim() < 1:
        return False
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if k % 8 or not 0 < m <= NORM_MAX_M or len(qweights) != (2 if kind == "glu" else 3):
        return False
    if kind == "rope":
        return x.dim() == 3 and head_dim > 0 and _fold_rope_applies(x, qweights, group_size, head_dim)
    n, kp = qweights[0].shape[0], qweights[0].shape[1] * 2
    if not use_fold(m, 2 * n, k, group_size):
        return False
    args = (n, m, k, kp, group_size, _DTYPES[x.dtype])
    return _workspace_floats("awq_int4_gemm_fold_glu_workspace", x.device.index, args, _env(_FOLD_ENV)) == 0


def _norm_in(residual, delta, delta_bias, norm_weight, eps, slices) -> tuple[_AwqNormIn, torch.Tensor] | None:
    """(the kernels' norm argument, h) for these tensors, or None where the kernels cannot read
    them as they are (not contiguous or not 16-byte aligned)."""
    ts = [residual, delta, norm_weight] + ([] if delta_bias is None else [delta_bias])
    if any(not t.is_contiguous() or t.data_ptr() % 16 for t in ts):
        return None
    h = torch.empty_like(residual)
    part = slices > 0
    nm = _AwqNormIn(residual.data_ptr(), None if part else delta.data_ptr(), delta.data_ptr() if part else None,
                    None if delta_bias is None else delta_bias.data_ptr(), norm_weight.data_ptr(), h.data_ptr(),
                    slices, eps)
    return nm, h


@functools.lru_cache(maxsize=1)
def _add_rms_norm_max_k() -> int:
    return load_library().awq_add_rms_norm_max_k()


def add_rms_norm_applies(x: torch.Tensor) -> bool:
    """Whether the CUDA kernel of `awq::add_rms_norm` takes a norm whose output is like x (x may be
    a fake tensor: only its device, dtype and width are read): fp16 or bf16 on a GPU, K a
    multiple of 8 up to awq_add_rms_norm_max_k. Where not, the op runs torch's ops, slower than
    inductor's one kernel, so the pass swap_add_rms_norm asks this."""
    if x.device.type != "cuda" or x.dtype not in _DTYPES or x.dim() < 1 or load_library() is None:
        return False
    k = x.shape[-1]
    return isinstance(k, int) and k % 8 == 0 and 0 < k <= _add_rms_norm_max_k()


def add_rms_norm_cuda(residual, delta, delta_bias, norm_weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA implementation of awq::add_rms_norm: one launch of csrc/add_rms_norm.cu where it
    takes the tensors (fp16 or bf16, contiguous and 16-byte aligned, K % 8 == 0, K up to
    awq_add_rms_norm_max_k), else add_rms_norm in torch ops."""
    slices = check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "add_rms_norm")
    k = residual.shape[-1]
    if (add_rms_norm_applies(residual) and residual.numel() > 0
            and residual.device.index == torch.cuda.current_device()):
        packed = _norm_in(residual, delta, delta_bias, norm_weight, eps, slices)
        if packed is not None:
            nm, h = packed
            x = torch.empty_like(residual)
            _check(load_library().awq_add_rms_norm(ctypes.byref(nm), x.data_ptr(), residual.numel() // k, k,
                                        _DTYPES[residual.dtype], _raw_stream(residual.device)))
            return h, x
    return add_rms_norm(residual, delta, delta_bias, norm_weight, eps)


def int4_linear_glu_norm_cuda(residual, delta, delta_bias, norm_weight, eps, qweights, scales, zeros, group_size,
                              biases) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA implementation of awq::int4_linear_glu_norm: where fused_norm_applies, one launch
    of the folded GEMV's pair mode that makes x from the residual add + RMSNorm while it stages
    it and writes h; else add_rms_norm in torch ops, then int4_linear_glu_cuda."""
    slices = check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_glu_norm")
    n, k = check_int4_linear_glu_args(residual, qweights, scales, zeros, group_size, biases)
    if (residual.device.index == torch.cuda.current_device()
            and fused_norm_applies("glu", residual, qweights, group_size)):
        packed = _norm_in(residual, delta, delta_bias, norm_weight, eps, slices)
        if packed is not None:
            nm, h = packed
            for args in zip(qweights, scales, zeros, biases):
                _check_cuda_tensors(residual, *args)
            r2d = residual.view(-1, k)
            out = gemm_fold_glu(r2d, list(qweights), list(scales), list(zeros), group_size, list(biases),
                                r2d.new_empty((r2d.shape[0], n)), ctypes.byref(nm))
            return out.view(*residual.shape[:-1], n), h
    h, x = add_rms_norm(residual, delta, delta_bias, norm_weight, eps)
    return int4_linear_glu_cuda(x, qweights, scales, zeros, group_size, biases), h


def int4_linear_rope_cache_norm_cuda(residual, delta, delta_bias, norm_weight, eps, qweights, scales, zeros,
                                     group_size, biases, cos, sin, cache_position, k_cache,
                                     v_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA implementation of awq::int4_linear_rope_cache_norm: where fused_norm_applies and
    the rope kernels take these tensors, one launch of the folded GEMV's rope mode that makes x
    from the residual add + RMSNorm while it stages it and writes h; else add_rms_norm in torch
    ops, then int4_linear_rope_cache_cuda."""
    slices = check_add_rms_norm_args(residual, delta, delta_bias, norm_weight, eps, "int4_linear_rope_cache_norm")
    hq, _, d, _ = check_int4_linear_rope_cache_args(residual, qweights, scales, zeros, group_size, biases, cos, sin,
                                                    cache_position, k_cache, v_cache)
    b, s = residual.shape[0], residual.shape[1]
    if (_rope_kernels_take(residual, cos, sin, k_cache, v_cache)
            and fused_norm_applies("rope", residual, qweights, group_size, d)):
        packed = _norm_in(residual, delta, delta_bias, norm_weight, eps, slices)
        if packed is not None:
            nm, h = packed
            bstride = cos.stride(0) if cos.shape[0] > 1 else 0
            q = _gemm_fold_rope(residual, qweights, scales, zeros, group_size, biases, cos, sin, bstride,
                                _kernel_positions(cache_position, s), k_cache, v_cache, d, ctypes.byref(nm))
            return q.view(b, s, hq * d), h
    h, x = add_rms_norm(residual, delta, delta_bias, norm_weight, eps)
    return int4_linear_rope_cache_cuda(x, qweights, scales, zeros, group_size, biases, cos, sin, cache_position,
                                       k_cache, v_cache), h


ATTENTION_MAX_ROUNDS = 6
"""Most rounds of loads a block of the decode attention kernel may have to make (its plan, the
library's awq_decode_attention_rounds) for the op to take it. Each round waits for memory once:
on an H200 (benchmarks/RESULTS.md, section 3, session 15) 6 rounds (7B's heads at batch 8, one
block a head over 384 positions) took 15-20 us against torch's 22, 16 rounds (32 query heads on
8 KV heads at batch 1 over 4096 positions) 40 us against 17."""


def decode_attention_applies(q, k, v, attn_mask) -> bool:
    """Whether the CUDA kernel of `awq::decode_attention` serves tensors of these shapes, dtypes and
    devices (they may be fake tensors: strides and alignment are checked per call): q, k, v of
    fp16 or bf16 on a GPU, head dim 64 or 128, at most DECODE_ATTENTION_MAX_ROWS query rows a KV
    head, a bool mask, an additive one of q's dtype or fp32, or none, and a plan of at most
    ATTENTION_MAX_ROUNDS rounds a block (short caches, or many heads). The pass
    swap_decode_attention asks this. A symbolic size (a graph dynamo made dynamic, e.g. in batch
    after a second batch size) counts at its hint, without a guard: the op asks again with the
    real tensors on every call and runs torch's attention where the kernel does not serve them."""
    if load_library() is None or any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        return False
    if q.device.type != "cuda" or q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    (b, hq, s, d), (_, hkv, length, dk), (_, _, _, dv) = (_sizes_or_hints(t.shape) for t in (q, k, v))
    if None in (b, hq, s, d, hkv, length, dk, dv):
        return False
    if d not in (64, 128) or dk != d or dv != d or hkv < 1 or hq % hkv:
        return False
    if (hq // hkv) * s > DECODE_ATTENTION_MAX_ROWS or length < 1 or b < 1:
        return False
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
        return False
    rounds = _attention_rounds(q.device.index, b, hq, hkv, s, length, d)
    return 0 < rounds <= ATTENTION_MAX_ROUNDS


def _sizes_or_hints(shape) -> tuple:
    """Each size as an int: itself, or a symbolic size's hint (None where it has none, an
    unbacked size). Reading the hint installs no guard."""
    out = []
    for x in shape:
        hint = x if type(x) is int else getattr(getattr(x, "node", None), "hint", None)
        out.append(None if hint is None else int(hint))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _attention_rounds(device: int, b: int, hq: int, hkv: int, s: int, length: int, d: int) -> int:
    """The library's plan for these sizes on that device: rounds of loads a block (-1: refused).
    Cached: an eager decode step asks it once a layer."""
    with torch.cuda.device(device):
        return load_library().awq_decode_attention_rounds(b, hq, hkv, s, length, d)


def _rows_16b(t: torch.Tensor) -> bool:
    """Whether every row (the last dimension) of t starts on 16 bytes and is contiguous."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        t.shape[i] == 1 or (t.stride(i) * t.element_size()) % 16 == 0 for i in range(t.dim() - 1))


def _strides(t: torch.Tensor, dims: int) -> ctypes.Array:
    """The element strides of t's first `dims` dimensions for the kernel, 0 along a dimension of
    size 1."""
    return (ctypes.c_int64 * dims)(*[0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)])


def decode_attention_cuda(q, k, v, attn_mask, scale, enable_gqa) -> torch.Tensor:
    """The CUDA implementation of awq::decode_attention: where decode_attention_applies and the
    rows of q, k and v are 16-byte loads, one launch of csrc/decode_attention.cu; else torch's
    attention."""
    check_decode_attention_args(q, k, v, attn_mask, scale, enable_gqa)
    aligned = [_rows_16b(t) for t in (q, k, v)]
    if (all(aligned) and q.device.index == torch.cuda.current_device()
            and decode_attention_applies(q, k, v, attn_mask)):
        b, hq, s, d = q.shape
        hkv, length = k.shape[1], k.shape[2]
        kind, mptr, ms = 0, None, None
        if attn_mask is not None:
            m = attn_mask.expand(b, hq, s, length)
            kind = 1 if m.dtype == torch.bool else 2 if m.dtype == q.dtype else 3
            mptr, ms = m.data_ptr(), _strides(m, 4)
        out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
        _check(load_library().awq_decode_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), mptr, out.data_ptr(), _strides(q, 3), _strides(k, 3),
            _strides(v, 3), ms, kind, b, hq, hkv, s, length, d, d ** -0.5 if scale is None else scale, 0,
            _DTYPES[q.dtype], _raw_stream(q.device)))
        return out
    # torch's fused attention kernels fault on rows that are not 16-byte aligned (seen on an H200,
    # torch 2.11): those get a contiguous copy.
    q, k, v = (t if ok else t.contiguous() for t, ok in zip((q, k, v), aligned))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa).contiguous()


_IMPL: torch.library.Library | None = None


def _register() -> bool:
    """Registers the CUDA kernels at the ops' CUDA dispatch key. Directly, not through
    torch.library.register_kernel, whose wrapper (an output-aliasing check and a dynamo-disabled
    frame around each call) is pure host time; the kernels here never return a view of an input,
    which is what it checks. On the H100 machine's host this and _raw_stream took an eager call
    from 75 to 51 us at M = 1 and from 53 to 31 us at M = 8 (benchmarks/RESULTS.md, section 3)."""
    global _IMPL
    if load_library() is None:
        return False
    _IMPL = torch.library.Library("awq", "IMPL")
    _IMPL.impl("int4_linear", int4_linear_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_multi"):
        _IMPL.impl("int4_linear_multi", int4_linear_multi_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_glu"):
        _IMPL.impl("int4_linear_glu", int4_linear_glu_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_rope_cache"):
        _IMPL.impl("int4_linear_rope_cache", int4_linear_rope_cache_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_partials"):
        _IMPL.impl("int4_linear_partials", int4_linear_partials_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_glu_norm"):
        _IMPL.impl("int4_linear_glu_norm", int4_linear_glu_norm_cuda, "CUDA")
    if hasattr(torch.ops.awq, "int4_linear_rope_cache_norm"):
        _IMPL.impl("int4_linear_rope_cache_norm", int4_linear_rope_cache_norm_cuda, "CUDA")
    if hasattr(torch.ops.awq, "decode_attention"):
        _IMPL.impl("decode_attention", decode_attention_cuda, "CUDA")
    if hasattr(torch.ops.awq, "add_rms_norm"):
        _IMPL.impl("add_rms_norm", add_rms_norm_cuda, "CUDA")
    return True


REGISTERED = _register()
