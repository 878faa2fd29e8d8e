"""The custom op `awq::int4_linear` (torch.library): schema, reference impl, fake impl.

    y = x @ dequantize(qweight, scales, zeros)[:, :K].T + bias,   K = x.shape[-1]

with the NK_U8 layout of awq_compile.quant (docs/format.md). The reference implementation
dequantizes per call and runs on any device; `awq_compile._cuda` registers the CUDA kernels over
it when the compiled extension is available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize

__all__ = ["int4_linear", "check_int4_linear_args"]


def check_int4_linear_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int]:
    """Validate the op's arguments; returns (N, K). Raises with the actual shapes."""
    def bad(msg: str) -> ValueError:
        return ValueError(
            f"awq::int4_linear: {msg} (x {tuple(x.shape)} {x.dtype}, qweight "
            f"{tuple(qweight.shape)} {qweight.dtype}, scales {tuple(scales.shape)} {scales.dtype}, "
            f"zeros {tuple(zeros.shape)} {zeros.dtype}, group_size {group_size})"
        )

    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise bad("qweight and zeros must be uint8")
    if not x.is_floating_point() or not scales.is_floating_point():
        raise bad("x and scales must be floating point")
    if qweight.dim() != 2 or scales.dim() != 2 or zeros.dim() != 2:
        raise bad("qweight, scales and zeros must be 2-D")
    if group_size not in (32, 64, 128):
        raise bad("group_size must be 32, 64 or 128")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    k = x.shape[-1]
    if kp % group_size:
        raise bad("packed K is not a multiple of group_size")
    if not kp - group_size < k <= kp:
        raise bad(f"x has K={k} features but the weight holds K in ({kp - group_size}, {kp}]")
    if tuple(scales.shape) != (n, kp // group_size) or tuple(zeros.shape) != (n, kp // group_size):
        raise bad(f"scales and zeros must be [{n}, {kp // group_size}]")
    if bias is not None and tuple(bias.shape) != (n,):
        raise bad(f"bias must be [{n}], got {tuple(bias.shape)}")
    return n, k


@torch.library.custom_op("awq::int4_linear", mutates_args=())
def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """INT4 weight-only linear; see the module docstring for the formula and layout."""
    _, k = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    # Half precision on the CPU accumulates poorly and slowly: compute in float32 there.
    cdt = torch.float32 if x.device.type == "cpu" else x.dtype
    w = dequantize(qweight, scales, zeros, group_size, k, dtype=cdt)
    b = None if bias is None else bias.to(cdt)
    return F.linear(x.to(cdt), w, b).to(x.dtype)


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    n, _ = check_int4_linear_args(x, qweight, scales, zeros, group_size, bias)
    return x.new_empty((*x.shape[:-1], n))
