"""fuse_sibling_linears: one `awq.int4_linear_multi` call for the INT4 linears reading one input.

    Matches:   q = awq.int4_linear(x, Wq, Sq, Zq, g, bq)
               k = awq.int4_linear(x, Wk, Sk, Zk, g, bk)
               v = awq.int4_linear(x, Wv, Sv, Zv, g, bv)
    Becomes:   qkv = awq.int4_linear_multi(x, [Wq, Wk, Wv], [Sq, Sk, Sv], [Zq, Zk, Zv], g,
                                           [bq, bk, bv])
               q, k, v = qkv[0], qkv[1], qkv[2]
    Matches:   q = awq_int4_..._q_proj(x); k = awq_int4_..._k_proj(x)        (Int4Linear modules)
    Becomes:   qk = awq.int4_linear_multi(x, [q_proj.qweight, k_proj.qweight], ...)  (get_attr)

We do this because a decode step (a few tokens) is bound by kernel launches and weight reads: one
launch over q/k/v (or gate/up) saves two launches and lets the kernel stream the weights as one.

Siblings are `int4_linear` calls on the same `x` node with the same group_size and packed K
(read from the qweights' `meta["val"]` / `meta["example_value"]` where present) whose weights
are graph nodes; at most `MAX_SEGMENTS` go into one call, in graph order. The fused call stands
where the first sibling stood. A weight computed later (dynamo's `self.scales.to(x.dtype)` in
each `Int4Linear.forward`) is moved up in front of it with the pure nodes it needs, if what
they read is defined by then; else the call goes after the last such weight, if that is still
before the first use of any sibling's output; else the group is left alone. A group is also
left alone where a weight reads a sibling's output, or where something between its first and
last call may mutate a tensor or has side effects (an in-place op, `x += y`, an impure module),
since the calls would move across it. Module calls that a weight reads are never moved.

A call of an `Int4Linear` submodule (the backend's `rewrite_for_serving` puts these in) is a
sibling too, its buffers read by new `get_attr` nodes: only a plain one (exactly that class, no
hooks, no `input_scale`), and only where x's dtype is known (x's `meta["val"]` /
`meta["example_value"]`); else it is left alone. Scales or bias of another dtype (fp16 scales,
the default `compute_dtype`, in a bf16 or fp32 model) get the module's own conversion, a
`call_method` `.to(x.dtype)` after the `get_attr`, so the fused call computes exactly what the
module did:

    Matches:   q = awq_int4_q(x); k = awq_int4_k(x)         (fp16 scales, x float32)
    Becomes:   qk = awq.int4_linear_multi(x, [...], [q.scales.to(float32), k.scales.to(float32)],
                                          ...)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from awq_compile import ops as _ops
from awq_compile.nn import Int4Linear

from ._graph import copy_source_meta, hint

__all__ = ["fuse_sibling_linears"]

_SINGLE = (torch.ops.awq.int4_linear.default, torch.ops.awq.int4_linear)
_MULTI = torch.ops.awq.int4_linear_multi.default
_ARG_NAMES = ("x", "qweight", "scales", "zeros", "group_size", "bias")
_LEAVES = ("qweight", "scales", "zeros", "bias")  # an Int4Linear's buffers, the op's order
_VAL_KEYS = ("val", "example_value")  # ATen graphs carry "val", dynamo's graphs "example_value"
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift}


@dataclass(frozen=True)
class _Call:
    """One `int4_linear` call node (or plain `Int4Linear` module call), its arguments by name."""

    node: fx.Node
    x: fx.Node
    weights: tuple[fx.Node, ...]  # qweight, scales, zeros, and the bias where there is one
    group_size: int
    bias: fx.Node | None
    packed_k: int | None
    module: Int4Linear | None = None  # a module call: `weights` is empty, its buffers are read


def fuse_sibling_linears(gm: fx.GraphModule) -> int:
    """Fuse each group of sibling `int4_linear` (or plain `Int4Linear` module) calls; returns
    the number of calls fused (q/k/v and gate/up of one Llama layer: 5, in two
    `int4_linear_multi` calls)."""
    groups: dict[tuple, list[_Call]] = {}
    for node in gm.graph.nodes:
        call = _match_call(gm, node)
        if call is not None:
            groups.setdefault((call.x, call.group_size, call.packed_k), []).append(call)
    fused = 0
    for calls in groups.values():
        for i in range(0, len(calls), _ops.MAX_SEGMENTS):
            chunk = calls[i:i + _ops.MAX_SEGMENTS]
            if len(chunk) >= 2 and _fuse(gm.graph, chunk):
                fused += len(chunk)
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _match_call(gm: fx.GraphModule, node: fx.Node) -> _Call | None:
    """`node` as an INT4 linear call, an op call or a plain `Int4Linear` module call (the other
    fusion passes match their linears with this too)."""
    return _match_module(gm, node) if node.op == "call_module" else _match(node)


def _rows(call: _Call) -> int | None:
    """The linear's output rows N, from its module or its qweight's meta."""
    if call.module is not None:
        return call.module.qweight.shape[0]
    v = _val(call.weights[0])
    return int(hint(v.shape[0])) if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def _match(node: fx.Node) -> _Call | None:
    if node.op != "call_function" or node.target not in _SINGLE:
        return None
    a = {**dict(zip(_ARG_NAMES, node.args)), **node.kwargs}
    x, g, bias = a.get("x"), a.get("group_size"), a.get("bias")
    weights = tuple(a.get(k) for k in ("qweight", "scales", "zeros"))
    if not isinstance(x, fx.Node) or type(g) is not int:
        return None
    if bias is not None:
        weights += (bias,)
    if not all(isinstance(w, fx.Node) for w in weights):
        return None
    return _Call(node, x, weights, g, bias, _packed_k(weights[0]))


def _match_module(gm: fx.GraphModule, node: fx.Node) -> _Call | None:
    """A call `Int4Linear(x)` the fused call may stand for: see the module docstring."""
    mod = gm.get_submodule(node.target)
    # a subclass may compute otherwise, and the fused call would not run the module's hooks
    if (type(mod) is not Int4Linear or mod.input_scale is not None or mod._forward_hooks
            or mod._forward_pre_hooks or len(node.args) != 1 or node.kwargs):
        return None
    x = node.args[0]
    if _dtype(x) is None:  # the fused call must convert scales and bias to it, as forward does
        return None
    return _Call(node, x, (), mod.group_size, None, mod.qweight.shape[1] * 2, mod)


def _val(node: fx.Node) -> object:
    return next((node.meta[k] for k in _VAL_KEYS if k in node.meta), None)


def _dtype(x: object) -> torch.dtype | None:
    v = _val(x) if isinstance(x, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _packed_k(qweight: fx.Node) -> int | None:
    v = _val(qweight)
    if isinstance(v, torch.Tensor) and v.dim() == 2:
        return int(hint(v.shape[1])) * 2
    return None


def _fuse(graph: fx.Graph, calls: list[_Call]) -> bool:
    """Replace `calls` (in graph order) by one multi call; False, graph untouched, if it can't."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = calls[0].node, calls[-1].node
    if any(_barrier(n) for n in _between(first, last)):
        return False
    weights = {w for c in calls for w in c.weights}
    if weights & {c.node for c in calls}:  # one sibling's output is another's weight or bias
        return False
    late = {w for w in weights if order[w] > order[first]}
    hoist = _hoistable(late, order, first)
    if hoist is not None:
        for n in sorted(hoist, key=order.__getitem__):
            first.prepend(n)
        where = first
    else:
        latest = max(late, key=order.__getitem__)
        users = [order[u] for c in calls for u in c.node.users]
        if users and order[latest] >= min(users):
            return False
        where = latest.next
    _rewrite(graph, calls, where)
    return True


def _between(a: fx.Node, b: fx.Node):
    n = a.next
    while n is not b:
        yield n
        n = n.next


def _hoistable(late: set[fx.Node], order: dict[fx.Node, int],
               first: fx.Node) -> set[fx.Node] | None:
    """`late` and the nodes after `first` they need, if all are pure and everything else they
    read comes before `first` (so they can move in front of it); else None."""
    todo, found = list(late), set()
    while todo:
        n = todo.pop()
        if n in found:
            continue
        if n.op not in ("call_function", "call_method", "get_attr") or _barrier(n):
            return None
        if n.target in _SINGLE:  # an INT4 call is never moved: a sibling, or costly
            return None
        found.add(n)
        todo.extend(i for i in n.all_input_nodes if order[i] >= order[first])
    return found


def _barrier(node: fx.Node) -> bool:
    """A node no computation may move across: it has side effects or may mutate a tensor in
    place (dynamo's torch-level graphs keep `x.add_(y)` and `x += y` as they are written). A
    module call counts as pure unless it is marked impure, as for fx's dead code elimination."""
    if node.op == "call_module":
        return node.is_impure()
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or node.is_impure()
                or name.endswith("_") and not name.startswith("_"))
    return False


def _rewrite(graph: fx.Graph, calls: list[_Call], where: fx.Node) -> None:
    with graph.inserting_before(where):
        operands = [_operands(graph, c) for c in calls]
        lists = [[o[i] for o in operands] for i in range(4)]
        multi = graph.call_function(_MULTI, (calls[0].x, *lists[:3], calls[0].group_size,
                                             lists[3]))
        outs = [graph.call_function(operator.getitem, (multi, i)) for i in range(len(calls))]
    first = calls[0].node
    copy_source_meta(first, multi)
    for key in _VAL_KEYS:
        if all(key in c.node.meta for c in calls):
            multi.meta[key] = [c.node.meta[key] for c in calls]
    for c, out in zip(calls, outs):
        out.meta.update(c.node.meta)
        c.node.replace_all_uses_with(out)
        graph.erase_node(c.node)


def _operands(graph: fx.Graph, call: _Call) -> tuple[fx.Node | None, ...]:
    """qweight, scales, zeros and bias of `call`: a module's as `get_attr` nodes of its
    buffers, scales and bias converted to x's dtype as `Int4Linear.forward` does, each node
    with a fake tensor in the meta key x has, where x's comes from a fake mode."""
    if call.module is None:
        return (*call.weights[:3], call.bias)
    dtype = _dtype(call.x)
    key = next(k for k in _VAL_KEYS if k in call.x.meta)
    mode = getattr(_val(call.x), "fake_mode", None)
    out = []
    for leaf in _LEAVES:
        t = getattr(call.module, leaf)
        if t is None:
            out.append(None)
            continue
        node = graph.get_attr(f"{call.node.target}.{leaf}")
        if mode is not None:
            node.meta[key] = mode.from_tensor(t, static_shapes=True)
        if leaf in ("scales", "bias") and t.dtype != dtype:
            node = _to(graph, node, dtype, key, mode)
        out.append(node)
    return tuple(out)


def _to(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, key: str, mode) -> fx.Node:
    """`node.to(dtype)`: the module's own call (not `_to_copy`), so that dynamo's graph stays a
    torch-level graph and AOT autograd lowers it as it would have lowered the module."""
    to = graph.call_method("to", (node, dtype))
    if mode is not None:
        with mode:
            to.meta[key] = node.meta[key].to(dtype)
    return to
