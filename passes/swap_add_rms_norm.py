"""swap_add_rms_norm: a residual add and the RMSNorm after it as one `awq.add_rms_norm` call.

    Matches:   h = residual + delta         (or defer_split_k's `(p.sum(0) [+ b]).to(dtype)`)
               hf = h.to(torch.float32)
               x = w * (hf * rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    Becomes:   h, x = awq.add_rms_norm(residual, delta, None, w, eps)
               (awq.add_rms_norm(residual, p, b, w, eps) with the partials)

the same form as `fuse_add_rms_norm` takes (transformers' `LlamaRMSNorm` after a residual add),
where no projection took it in: run it after that pass, so what remains is the norms in front
of a projection of more than one token a step (the folded GEMV's norm prologue is kept to one
token: `_cuda.NORM_MAX_M`), and the final norm before lm_head. There the norm is an inductor
kernel of one program a row; on CUDA the op is one launch of csrc/add_rms_norm.cu, a block a row,
launched with programmatic dependent launch. Only where that kernel takes the norm (`applies`, by
default `_cuda.add_rms_norm_applies`: fp16 or bf16 on a GPU with the kernel library, K % 8 == 0,
K <= 8192). The backend runs it (option `norm_op`); on an H200 it
gave +0.9% tokens/s at 7B batch 8 and +1.9% at 13B (benchmarks/RESULTS.md, section 3, session 19).

The call stands where x stood, so every other reader of h must come after x, and nothing the call
reads may be mutated in place between the add and x (as in fuse_add_rms_norm).
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx

from ._graph import copy_source_meta, rewrite_each
from .fuse_add_rms_norm import _add_norm, _retire, _take
from .fuse_sibling_linears import _val

__all__ = ["swap_add_rms_norm"]

_OP = torch.ops.awq.add_rms_norm.default


def _on_cuda(x: torch.Tensor) -> bool:
    """The default `applies`: where the CUDA kernel takes the norm (`_cuda.add_rms_norm_applies`);
    elsewhere the op would run torch's ops, slower than inductor's one kernel."""
    from awq_compile import _cuda

    return _cuda.add_rms_norm_applies(x)


def swap_add_rms_norm(gm: fx.GraphModule, applies: Callable[[torch.Tensor], bool] | None = None) -> int:
    """Replace each residual add + RMSNorm left in `gm` with one `awq.add_rms_norm` call where
    `applies(x's example value)` (by default: where the CUDA kernel takes it); returns the number
    replaced."""
    applies = applies or _on_cuda
    return rewrite_each(gm, lambda n: _match(gm, n, applies) if n.op == "call_function" else None, _rewrite)


def _match(gm: fx.GraphModule, x: fx.Node, applies) -> dict | None:
    norm = _add_norm(x)
    if norm is None:
        return None
    x_val = _val(x)
    if not isinstance(x_val, torch.Tensor) or not applies(x_val):
        return None
    taken = _take(gm, _OP, x, x, norm)
    if taken is None:
        return None
    (h, w, eps, chain), (residual, delta, bias, moved, val) = norm, taken
    return {"x": x, "h": h, "chain": chain, "moved": moved, "val": val, "args": (residual, delta, bias, w, eps)}


def _rewrite(graph: fx.Graph, m: dict) -> None:
    x, h = m["x"], m["h"]
    key, (h_val, x_val) = m["val"]
    with graph.inserting_before(x):
        call = graph.call_function(_OP, m["args"])
        h_new = graph.call_function(operator.getitem, (call, 0))
        x_new = graph.call_function(operator.getitem, (call, 1))
    call.meta[key], h_new.meta[key], x_new.meta[key] = (h_val, x_val), h_val, x_val
    copy_source_meta(x, call, x_new)
    copy_source_meta(h, h_new)
    x.replace_all_uses_with(x_new)
    _retire(graph, m, h_new)
