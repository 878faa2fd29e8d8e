"""defer_split_k: leave a split-K INT4 linear's slice sum to the graph, which fuses it downstream.

    Matches:   y = awq.int4_linear(x, W, S, Z, g, b)       (or a plain Int4Linear module call)
               where the CUDA kernel for x's size splits K into n >= 2 slices and sums them in a
               second launch
    Becomes:   p = awq.int4_linear_partials(x, W, S, Z, g, n)     # float32 [n, ..., N]
               y = (p.sum(0) + b).to(x.dtype)

We do this because at one token the CUDA-core GEMV splits K for parallelism (a 7B layer's o and
down projections, 2 slices) and its slice sum is a kernel of ~1.5 us plus a launch gap, twice a
layer. Left to the graph, inductor unrolls the 2-slice sum into the kernel that reads y (the
residual add and RMSNorm), so the step has two launches fewer a layer. The sum is the one the
sum kernel makes: slices in order in float32, then the bias, then one rounding.

Only where x's size and device are known from its `meta["val"]` / `meta["example_value"]`
(static sizes, a CUDA tensor of fp16 or bf16), and `slices_for` (by default the library's plan,
`awq_compile._cuda.split_k_slices`) says the call splits K; a module call as
`fuse_sibling_linears` matches it. Run it after the fusion passes: the calls it takes are the
single linears they leave.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from ._graph import copy_source_meta
from .fuse_sibling_linears import _VAL_KEYS, _Call, _match_call, _operands, _rows, _val

__all__ = ["defer_split_k"]

_PARTIALS = torch.ops.awq.int4_linear_partials.default

SlicesFor = Callable[[int, int, int, int, int, torch.dtype, torch.device], int]
"""(M, N, K, packed K, group size, x's dtype, x's device) -> the kernel's K slices (0 or 1: none)."""


def _library_slices(m: int, n: int, k: int, kp: int, g: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    from awq_compile import _cuda

    if not _cuda.available():
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda.split_k_slices(m, n, k, kp, g, dtype, index)


def defer_split_k(gm: fx.GraphModule, slices_for: SlicesFor | None = None) -> int:
    """Rewrite each INT4 linear whose kernel would sum K slices in a second launch; returns the
    number rewritten (2 a Llama layer at batch 1 on an H200: o and down)."""
    slices_for = slices_for or _library_slices
    done = 0
    for node in list(gm.graph.nodes):
        call = _match_call(gm, node)
        x_val = _static_x(call)
        n = _rows(call) if x_val is not None else None
        if n is None or call.packed_k is None:
            continue
        k = int(x_val.shape[-1])
        m = x_val.numel() // k if k else 0
        if m < 1:
            continue
        slices = slices_for(m, n, k, call.packed_k, call.group_size, x_val.dtype, x_val.device)
        if slices >= 2:
            _rewrite(gm.graph, call, slices, x_val)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _static_x(call: _Call | None) -> torch.Tensor | None:
    """x's example tensor, where the call is an INT4 linear and x's sizes are static."""
    x_val = _val(call.x) if call is not None else None
    if not isinstance(x_val, torch.Tensor) or any(isinstance(d, torch.SymInt) for d in x_val.shape):
        return None
    return x_val


def _rewrite(graph: fx.Graph, call: _Call, slices: int, x_val: torch.Tensor) -> None:
    key = next((k for k in _VAL_KEYS if k in call.x.meta), None)
    mode = getattr(x_val, "fake_mode", None)
    with graph.inserting_before(call.node):
        qweight, scales, zeros, bias = _operands(graph, call)
        parts = graph.call_function(_PARTIALS, (call.x, qweight, scales, zeros, call.group_size, slices))
        y = graph.call_method("sum", (parts, 0))
        if bias is not None:
            y = graph.call_function(torch.add, (y, bias))
        y = graph.call_method("to", (y, x_val.dtype))
    operands = [_val(a) for a in (qweight, scales, zeros)]
    if key is not None and mode is not None and all(isinstance(v, torch.Tensor) for v in operands):
        with mode:
            parts.meta[key] = _PARTIALS(x_val, *operands, call.group_size, slices)
        if key in call.node.meta:
            y.meta[key] = call.node.meta[key]
    copy_source_meta(call.node, parts)
    call.node.replace_all_uses_with(y)
    graph.erase_node(call.node)
