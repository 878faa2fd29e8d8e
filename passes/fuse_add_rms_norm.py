"""fuse_add_rms_norm: a decoder layer's residual add and RMSNorm in the INT4 call that reads the norm.

    Matches:   h = residual + delta
               hf = h.to(torch.float32)
               x = w * (hf * rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
               y = awq.int4_linear_glu(x, [Wg, Wu], ...)               (fuse_gated_mlp)
               q = awq.int4_linear_rope_cache(x, [Wq, Wk, Wv], ...)    (fuse_rope_cache)
    Becomes:   y, h = awq.int4_linear_glu_norm(residual, delta, None, w, eps, [Wg, Wu], ...)
               q, h = awq.int4_linear_rope_cache_norm(residual, delta, None, w, eps, [Wq, Wk, Wv], ...)

and where delta is the K-slice sum `defer_split_k` left to the graph,

    Matches:   p = awq.int4_linear_partials(...);  delta = (p.sum(0) + b).to(residual.dtype)
    Becomes:   y, h = awq.int4_linear_glu_norm(residual, p, b, w, eps, ...)     (b None without bias)

This is transformers' `LlamaRMSNorm` after a residual add (either operand order of each `*` and
`+`; w a parameter or attribute, eps a float): in a Llama every layer's post-attention norm and
every layer's input norm but the first (the embedding feeds that one; the final norm feeds
lm_head), 2L - 1 for L layers with a static cache (without one q/k/v stay an `int4_linear_multi`
call, which the pass does not take: L). We do this because at decode sizes the add
and the norm are one inductor kernel and one launch gap in front of each projection, and the CUDA
decode kernel can make x while it stages it and write h. On the CPU, or where the kernel cannot
make the norm in its prologue, the op computes the norm as separate torch ops first, slower than
inductor's one fused kernel, so the pass leaves those: it fuses only where `applies` says so (by
default `awq_compile._cuda.fused_norm_applies` for an x on a CUDA device, whose answer depends on
x's size: so x's sizes must be static, as a decode step's are).

Only where no intermediate has another reader (h itself may: every reader of h but the norm
comes after the projection, and reads the h the call returns), nothing the call reads is
mutated in place between the add and the projection, and the op's checks accept the example
tensors (where they refuse the partials, say a bias of another dtype, the op takes the add's
operands as they are). The call stands where the projection stood. Run it last: it takes the
calls of `fuse_gated_mlp` and `fuse_rope_cache` and the sums of `defer_split_k`.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx

from ._graph import copy_source_meta, fetch_attr, rewrite_each
from .fuse_rope_cache import _ADD, _MUL, _is, _moves_safely, _only_user
from .fuse_sibling_linears import _VAL_KEYS, _dtype, _val

__all__ = ["fuse_add_rms_norm"]

_PARTIALS = torch.ops.awq.int4_linear_partials.default
_FUSED = {  # the projection's op -> (kind for `applies`, the op with the norm, its arity)
    torch.ops.awq.int4_linear_glu.default: ("glu", torch.ops.awq.int4_linear_glu_norm.default, 6),
    torch.ops.awq.int4_linear_rope_cache.default: ("rope", torch.ops.awq.int4_linear_rope_cache_norm.default, 11),
}
_POW = {torch.pow, torch.ops.aten.pow.Tensor_Scalar}
_MEAN = {torch.mean, torch.ops.aten.mean.dim}
_RSQRT = {torch.rsqrt, torch.ops.aten.rsqrt.default}
_SUM = {torch.sum, torch.ops.aten.sum.dim_IntList}

Applies = Callable[[str, torch.Tensor, list, int, int], bool]
"""(kind "glu" or "rope", x's example tensor, the qweights' example tensors, group size, head dim
(the caches' last size; 0 for "glu")) -> whether the fused op is faster than the graph's norm."""


def _library_applies(kind: str, x: torch.Tensor, qweights: list, group_size: int, head_dim: int) -> bool:
    if x.device.type != "cuda":
        return False
    from awq_compile import _cuda

    if not _cuda.available():
        return False
    return _cuda.fused_norm_applies(kind, x, qweights, group_size, head_dim)


def fuse_add_rms_norm(gm: fx.GraphModule, applies: Applies | None = None) -> int:
    """Fuse each residual add + RMSNorm into the gated-MLP or q/k/v call that reads it where
    `applies` (by default the CUDA library) says so; returns the number fused."""
    applies = applies or _library_applies
    return rewrite_each(gm, lambda n: _match_site(gm, n, applies)
                        if n.op == "call_function" and n.target in _FUSED else None, _rewrite)


def _cast(n: object) -> tuple[fx.Node, torch.dtype] | None:
    """(source, dtype) if n is `source.to(dtype)`."""
    if not (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "to"):
        return None
    args = (*n.args, *n.kwargs.values())  # to(t, dtype) or to(t, dtype=dtype)
    if len(args) != 2 or set(n.kwargs) - {"dtype"} or not isinstance(args[1], torch.dtype):
        return None
    return args[0], args[1]


def _mean_last(n: fx.Node, src: fx.Node) -> bool:
    """n is `src.mean(-1, keepdim=True)` (or torch.mean, aten.mean.dim alike)."""
    if not (_is(n, _MEAN, "mean") and n.args and n.args[0] is src):
        return False
    names = ("dim", "keepdim")
    given = {**dict(zip(names, n.args[1:])), **n.kwargs}
    if len(n.args) > 3 or set(given) != set(names) or given["keepdim"] is not True:
        return False
    dim = given["dim"]
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    v = _val(src)
    return dim == -1 or (isinstance(v, torch.Tensor) and dim == v.dim() - 1)


def _pair(n: fx.Node, ok: Callable[[object], bool]) -> tuple[object, object] | None:
    """(a, b) with n = a op b (or b op a) and ok(a)."""
    if len(n.args) != 2 or n.kwargs:
        return None
    a, b = n.args
    return (a, b) if ok(a) else (b, a) if ok(b) else None


def _norm(x: fx.Node) -> tuple[fx.Node, fx.Node, float, list[fx.Node]] | None:
    """(h, w, eps, the nodes from hf to x) if x is `LlamaRMSNorm(h)` as the module docstring
    writes it and no node in between has another reader."""
    if not _is(x, _MUL, "mul"):
        return None
    found = _pair(x, lambda a: _cast(a) is not None)
    cast, w = found or (None, None)
    if not (isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr") and _only_user(cast) is x):
        return None
    hn, dtype = _cast(cast)
    found = _is(hn, _MUL, "mul") and _pair(hn, lambda a: _is(a, _RSQRT, "rsqrt"))
    if not found or _only_user(hn) is not cast:
        return None
    r, hf = found
    ve = r.args[0] if len(r.args) == 1 and not r.kwargs else None
    found = _is(ve, _ADD, "add") and _pair(ve, lambda a: _is(a, _MEAN, "mean"))
    if not found or _only_user(ve) is not r or _only_user(r) is not hn:
        return None
    var, eps = found
    if not (type(eps) is float and _only_user(var) is ve):
        return None
    p = var.args[0]
    up = _cast(hf)
    if not (_is(p, _POW, "pow") and p.args[1:] == (2,) and not p.kwargs and p.args[0] is hf
            and _only_user(p) is var and _mean_last(var, p) and set(hf.users) == {p, hn}):
        return None
    if up is None or up[1] != torch.float32:
        return None
    h = up[0]
    hv = _val(h)
    if not (isinstance(hv, torch.Tensor) and hv.dtype == dtype):
        return None
    return h, w, eps, [hf, p, var, ve, r, hn, cast, x]


def _partials(d: object) -> tuple[fx.Node, fx.Node | None, torch.dtype, list[fx.Node]] | None:
    """(p, bias or None, dtype, the nodes from the sum to d) if d is `(p.sum(0) [+ bias]).to(dtype)`
    of an `int4_linear_partials` call p, each step read only by the next."""
    up = _cast(d)
    if up is None:
        return None
    y, dtype = up
    if not (isinstance(y, fx.Node) and _only_user(y) is d):
        return None
    bias, nodes = None, [y, d]
    if _is(y, _ADD, "add"):
        found = _pair(y, lambda a: _is(a, _SUM, "sum"))
        if not found or not isinstance(found[1], fx.Node):
            return None
        y, bias = found
        nodes.insert(0, y)
        if _only_user(y) is not nodes[1]:
            return None
    if not (_is(y, _SUM, "sum") and len(y.args) == 2 and not y.kwargs and y.args[1] in (0, [0], (0,))):
        return None
    p = y.args[0]
    if not (isinstance(p, fx.Node) and p.op == "call_function" and p.target is _PARTIALS):
        return None
    return p, bias, dtype, nodes


def _match_site(gm: fx.GraphModule, call: fx.Node, applies: Applies) -> dict | None:
    kind, op, arity = _FUSED[call.target]
    x = call.args[0] if call.args else None
    if len(call.args) != arity or call.kwargs or not isinstance(x, fx.Node) or _only_user(x) is not call:
        return None
    x_val = _val(x)  # the kernel's plan is per size: static sizes only
    if not isinstance(x_val, torch.Tensor) or any(isinstance(s, torch.SymInt) for s in x_val.shape):
        return None
    read = []
    fx.node.map_arg(call.args[1:], read.append)
    norm = _add_norm(x) if x not in read else None
    if norm is None:
        return None
    h, w, eps, chain = norm
    taken = _take(gm, op, x, call, norm, call.args[1:])
    if taken is None:
        return None
    residual, delta, bias, moved, val = taken
    head_dim = int(_val(call.args[9]).shape[-1]) if kind == "rope" else 0
    if not applies(kind, x_val, [_val(q) for q in call.args[1]], call.args[4], head_dim):
        return None
    return {"call": call, "op": op, "h": h, "chain": chain, "moved": moved, "val": val,
            "args": (residual, delta, bias, w, eps)}


def _add_norm(x: fx.Node) -> tuple | None:
    """_norm(x) where its h is an add of two nodes (a residual add): (h, w, eps, chain), else
    None. Shared with swap_add_rms_norm."""
    norm = _norm(x)
    if norm is None:
        return None
    h = norm[0]
    if not (_is(h, _ADD, "add") and len(h.args) == 2 and not h.kwargs
            and all(isinstance(a, fx.Node) for a in h.args)):
        return None
    return norm


def _take(gm: fx.GraphModule, op, x: fx.Node, site: fx.Node, norm: tuple, rest: tuple = ()) -> tuple | None:
    """How `op` takes the add + norm `norm` (_add_norm's) at `site`, with (residual, delta,
    delta_bias, w, eps, *rest) as its arguments: the first of h's delta forms that the op accepts
    on the example tensors (in x's fake mode) and whose nodes can move to site, as (residual,
    delta, delta_bias, the nodes taken over, the op's example outputs); None where a reader of h
    other than the norm comes before site, or no form fits. Shared with swap_add_rms_norm."""
    h, w, eps, chain = norm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(u is not chain[0] and order[u] <= order[site] for u in h.users):
        return None
    for residual, delta, bias, moved in _delta_forms(h):
        val = _fake_call(gm, op, x, (residual, delta, bias, w, eps, *rest))
        if val is not None and _moves_safely([*moved, h][0], site, (residual, delta, bias, w)):
            return residual, delta, bias, moved, val
    return None


def _delta_forms(h: fx.Node) -> list[tuple]:
    """(residual, delta, delta_bias, the nodes the op takes over) for the add h, in the order
    to try them: with the partials where an operand is defer_split_k's sum cast to the other's
    dtype, then the operands as they are (residual first)."""
    forms = []
    for i in (0, 1):
        found = _partials(h.args[i])
        if found is not None and found[2] == _dtype(h.args[1 - i]):
            p, bias, _, nodes = found
            forms.append((h.args[1 - i], p, bias, nodes))
            break
    return [*forms, (h.args[0], h.args[1], None, [])]


def _fake_call(gm: fx.GraphModule, op, ref: fx.Node, args: tuple) -> tuple[str, tuple] | None:
    """op(*args) on the example tensors (its meta), in the fake mode of `ref`'s example value, or
    None where the op's checks refuse them or they are unknown."""
    key = next((k for k in _VAL_KEYS if k in ref.meta), None)
    mode = getattr(_val(ref), "fake_mode", None)
    missing = []

    def val(n: fx.Node):
        v = _val(n)
        if v is None and n.op == "get_attr" and mode is not None:
            # a constant the serving rewrite made (a folded norm weight) carries no example value
            try:
                v = mode.from_tensor(fetch_attr(gm, str(n.target)), static_shapes=True)
            except (AttributeError, TypeError):
                v = None
        if not isinstance(v, torch.Tensor):
            missing.append(n)
        return v

    args = fx.node.map_arg(args, val)
    if key is None or mode is None or missing:
        return None
    try:
        with mode:
            # the fake kernel checks and allocates; it writes nothing
            out = op(*args)
    except (ValueError, RuntimeError):
        return None
    return key, tuple(out)


def _rewrite(graph: fx.Graph, m: dict) -> None:
    call, h = m["call"], m["h"]
    key, (out_val, h_val) = m["val"]
    with graph.inserting_before(call):
        fused = graph.call_function(m["op"], (*m["args"], *call.args[1:]))
        out = graph.call_function(operator.getitem, (fused, 0))
        h_new = graph.call_function(operator.getitem, (fused, 1))
    fused.meta[key], out.meta[key], h_new.meta[key] = (out_val, h_val), out_val, h_val
    copy_source_meta(call, fused, out)
    copy_source_meta(h, h_new)
    call.replace_all_uses_with(out)
    graph.erase_node(call)
    _retire(graph, m, h_new)


def _retire(graph: fx.Graph, m: dict, h_new: fx.Node) -> None:
    """Erase a matched add + norm (m's "chain", "h" and "moved") once the call that replaces them
    stands, h's readers moved to h_new (erased too where none is left). Shared with
    swap_add_rms_norm."""
    h = m["h"]
    for n in reversed(m["chain"]):
        graph.erase_node(n)
    h.replace_all_uses_with(h_new)
    if not h_new.users:
        graph.erase_node(h_new)
    graph.erase_node(h)
    for n in reversed(m["moved"]):
        graph.erase_node(n)
