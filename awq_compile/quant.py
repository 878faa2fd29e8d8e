"""INT4 group-wise quantization primitives: pure tensor functions, no modules, no devices moved.

The quantized weight of a linear with N outputs and K inputs, group size g:

    Kp = ceil(K / g) * g          (K padded up to the group size; see `padded_k`)
    W[n, k] ~= (q[n, k] - z[n, k // g]) * s[n, k // g]     q, z in 0..15

Symmetric mode stores q + 8 with a fixed zero point of 8, so both modes share one formula.
The padding rule: the last group of a row covers the real columns only (its min/max ignore the
padding), and padded positions hold the zero point, so they dequantize to exactly 0.
docs/format.md describes the packed layouts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "QuantizedWeight",
    "padded_k",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_int4",
    "unpack_int4",
    "to_autoawq",
    "from_autoawq",
    "AWQ_ORDER",
]

MAX_Q = 15
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's nibble order: nibble i of an int32 word holds channel AWQ_ORDER[i] of its 8."""


class QuantizedWeight(NamedTuple):
    qweight: torch.Tensor  # uint8 [N, Kp/2], packed (see pack_int4)
    scales: torch.Tensor  # [N, Kp/g], compute dtype
    zeros: torch.Tensor  # uint8 [N, Kp/g]
    in_features: int


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a multiple of the group size.

    >>> padded_k(576, 128)
    640
    """
    return -(-k // group_size) * group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], padding the last group by repeating its last real column, which
    leaves the group's min and max unchanged."""
    n, k = w.shape
    kp = padded_k(k, group_size)
    if kp != k:
        w = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1)
    return w.reshape(n, kp // group_size, group_size)


def _qparams(
    wg: torch.Tensor, zero_point: bool, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and (float) zero points of grouped weights [N, G, g] -> ([N, G], [N, G])."""
    if zero_point:
        wmax = wg.amax(dim=-1)
        wmin = wg.amin(dim=-1)
        s = ((wmax - wmin).clamp(min=1e-5) / MAX_Q)
        if scale_dtype is not None:
            s = s.to(scale_dtype).to(wg.dtype)
        z = (-torch.round(wmin / s)).clamp(0, MAX_Q)
    else:
        s = (wg.abs().amax(dim=-1).clamp(min=1e-5) / 7)
        if scale_dtype is not None:
            s = s.to(scale_dtype).to(wg.dtype)
        z = torch.full_like(s, 8.0)
    return s, z


def fake_quantize(w: torch.Tensor, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Quantize and dequantize `w` [N, K] in its own dtype (the search's inner loop)."""
    n, k = w.shape
    wg = _grouped(w, group_size)
    s, z = _qparams(wg, zero_point, None)
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    q = (torch.round(wg / s) + z).clamp(0, MAX_Q)
    return ((q - z) * s).reshape(n, -1)[:, :k]


def quantize(
    w: torch.Tensor,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize a float weight [N, K] to packed INT4 (format NK_U8).

    The scales are rounded to `scale_dtype` before q is computed, so dequantizing with the
    stored scales reproduces exactly the grid q was chosen on.

    >>> qw = quantize(torch.randn(8, 96), group_size=32)
    >>> qw.qweight.shape, qw.scales.shape
    (torch.Size([8, 48]), torch.Size([8, 3]))
    """
    if w.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize: weight contains NaN or Inf")
    n, k = w.shape
    w32 = w.detach().to(torch.float32)
    wg = _grouped(w32, group_size)
    s, z = _qparams(wg, zero_point, scale_dtype)
    if not torch.isfinite(s).all():  # a range beyond the dtype's max would dequantize to NaN
        raise ValueError(
            f"quantize: scales are not finite in {str(scale_dtype).removeprefix('torch.')} "
            f"(max |w| = {float(w32.abs().max()):.3g}); store scales in float32"
        )
    q = (torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, MAX_Q)
    q = q.reshape(n, -1)
    kp = q.shape[1]
    if kp != k:  # padded positions hold the zero point: they dequantize to 0
        q[:, k:] = z[:, -1:].expand(n, kp - k)
    q = q.to(torch.uint8)
    return QuantizedWeight(pack_int4(q), s.to(scale_dtype), z.to(torch.uint8), k)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    in_features: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Packed INT4 (format NK_U8) back to a float weight [N, K] in `dtype` (default: scales')."""
    dtype = dtype or scales.dtype
    q = unpack_int4(qweight).to(dtype)
    n, kp = q.shape
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)
    w = (q - z) * s
    return w if in_features is None else w[:, :in_features]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 (K even) -> uint8 [N, K/2]; k = 2b in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension must be even, got shape {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> uint8 [N, K]."""
    lo = p & 0x0F
    hi = p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _pack_awq_int32(v: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15 (C % 8 == 0) -> int32 [R, C/8], AutoAWQ nibble order."""
    r, c = v.shape
    v = v.to(torch.int64).reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_awq_int32(words: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_awq_int32: int32 [R, C/8] -> uint8 [R, C]."""
    r, c8 = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nib = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # nib[..., i] is channel ORDER[i]
    out = torch.empty_like(nib)
    out[:, :, list(AWQ_ORDER)] = nib
    return out.reshape(r, c8 * 8).to(torch.uint8)


def to_autoawq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """NK_U8 -> AutoAWQ "gemm" tensors: qweight int32 [K, N/8], qzeros int32 [K/g, N/8],
    scales [K/g, N]. Needs N % 8 == 0 and K a multiple of the group size."""
    q = unpack_int4(qw.qweight)
    n, kp = q.shape
    if n % 8:
        raise ValueError(f"to_autoawq: out_features={n} must be a multiple of 8")
    if kp != qw.in_features:
        raise ValueError(
            f"to_autoawq: in_features={qw.in_features} is not a multiple of the group size; "
            "the AutoAWQ layout has no padding rule"
        )
    return {
        "qweight": _pack_awq_int32(q.t().contiguous()),
        "qzeros": _pack_awq_int32(qw.zeros.t().contiguous()),
        "scales": qw.scales.t().contiguous(),
    }


def from_autoawq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> QuantizedWeight:
    """AutoAWQ "gemm" tensors -> NK_U8 (exact inverse of to_autoawq)."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(
            f"from_autoawq: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}"
        )
    k, n8 = qweight.shape
    g_count, n = scales.shape
    if n != n8 * 8 or qzeros.shape != (g_count, n8) or k % g_count:
        raise ValueError(
            "from_autoawq: inconsistent shapes qweight "
            f"{tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    q = _unpack_awq_int32(qweight).t().contiguous()
    zeros = _unpack_awq_int32(qzeros).t().contiguous()
    return QuantizedWeight(pack_int4(q), scales.t().contiguous(), zeros, k)
