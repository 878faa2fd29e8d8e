"""`Int4Linear`: the module that stands where an `nn.Linear` was, calling `awq::int4_linear`."""

from __future__ import annotations

import torch
from torch import nn

from . import _cuda
from . import ops as _ops  # noqa: F401  (registers awq::int4_linear)
from .quant import QuantizedWeight, dequantize

__all__ = ["Int4Linear"]


def _direct(x: torch.Tensor) -> bool:
    """Whether an eager forward calls awq::int4_linear's CUDA implementation itself: a plain CUDA
    tensor, no gradient wanted, nothing tracing or intercepting ops. The dispatcher and the custom
    op's autograd layer cost more host time a call than a decode kernel takes, which made eager
    decode slower than bf16's (benchmarks/RESULTS.md, section 3, session 25). torch.compile,
    torch.export, torch.jit.trace (and the TorchScript ONNX exporter), vmap and the other
    torch.func transforms, fake and functional tensors, FX proxies and torch function / dispatch
    modes (profilers, FlopCounterMode) all take the op: a kernel launched through ctypes is
    invisible to them. The result is the op's, bit for bit: the same function serves the op at
    its CUDA key."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and type(x) is torch.Tensor
            and x.is_cuda and _cuda.REGISTERED and not (x.requires_grad and torch.is_grad_enabled())
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0)


class Int4Linear(nn.Module):
    """An INT4 weight-only linear layer (format NK_U8, docs/format.md).

    Buffers: `qweight` uint8 [N, Kp/2], `scales` [N, Kp/g], `zeros` uint8 [N, Kp/g], optional
    `bias` [N] and optional `input_scale` [K] (the explicit `x * (1/s)` AWQ inserts where no
    upstream op can absorb the scales). Floating buffers follow `.to(dtype)` with the model.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        group_size: int,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> "Int4Linear":
        n = qw.qweight.shape[0]
        b = None if bias is None else bias.detach().to(qw.scales.dtype).clone()
        return cls(qw.in_features, n, group_size, qw.qweight, qw.scales, qw.zeros, b, input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if _direct(x):
            return _cuda.int4_linear_cuda(x, self.qweight, scales, self.zeros, self.group_size, bias)
        return torch.ops.awq.int4_linear(x, self.qweight, scales, self.zeros, self.group_size, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (input_scale folded in)."""
        w = dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.in_features, dtype)
        if self.input_scale is not None:
            w = w * self.input_scale.to(dtype)
        return w

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"input_scale={self.input_scale is not None}"
        )
