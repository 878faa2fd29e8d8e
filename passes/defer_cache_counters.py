"""defer_cache_counters: a static KV cache's position counters read by the q/k/v calls themselves,
and their increments made once, at the end of the graph.

    Matches:   pos = torch.arange(S) + counter                  (a layer's cache positions)
               counter.add_(S)                                   (the cache's length, in place)
               q = awq.int4_linear_rope_cache(..., pos, k_cache, v_cache)     (or its _norm form)
    Becomes:   q = awq.int4_linear_rope_cache(..., counter, k_cache, v_cache)
               ...                                               (the rest of the graph)
               torch._foreach_add_([counter of every layer], S)  (just before the output)

This is transformers' `StaticCache` (`StaticLayer.update`): every layer keeps its own 0-d int64
counter, makes its positions from it and adds the step's length to it in place. We do this
because in a compiled decode step each layer's `arange + counter` and `add_` are one small kernel
of their own in front of the q/k/v launch (~1.2 us and a launch gap a layer on an H200), which
also keeps that launch from overlapping the one before it. `int4_linear_rope_cache` takes a 0-d
cache_position as the first position (awq_compile/ops.py, `cache_positions`), and its CUDA
kernels read the counter in place at one token; the increments become one foreach call, which
inductor makes one kernel.

Only where the counter is a graph input or attribute (0-d int64), `add_` with an int is its one
in-place change, every other reader of it (or of a view of it) comes before that `add_` (so it
reads the old value, as it will with the increment at the end), and the positions are
`arange(S)` (start 0, step 1, int64) plus the counter, with S the call's tokens. A counter no
rope call reads that way is left as it is. Run it after `fuse_rope_cache` and
`fuse_add_rms_norm`, whose calls it rewrites.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .fuse_sibling_linears import _barrier, _val

__all__ = ["defer_cache_counters"]

_ROPE_OPS = {torch.ops.awq.int4_linear_rope_cache.default, torch.ops.awq.int4_linear_rope_cache_norm.default}
_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}
# Ops whose result may share the counter's storage: their readers read the counter.
_ALIASING_METHODS = {"to", "view", "view_as", "reshape", "expand", "expand_as", "squeeze", "unsqueeze",
                     "contiguous", "detach", "flatten", "type", "type_as", "__getitem__", "cuda", "cpu"}
_ALIASING_FUNCTIONS = {operator.getitem, torch.reshape, torch.squeeze, torch.unsqueeze, torch.flatten,
                       torch.detach}


def defer_cache_counters(gm: fx.GraphModule) -> int:
    """Make the rope calls read their caches' counters and increment every such counter once at
    the end of the graph; returns the number of counters deferred (one a layer of a Llama with a
    static cache)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    increments: dict[int, list[fx.Node]] = {}
    for counter in [n for n in graph.nodes if n.op in ("placeholder", "get_attr")]:
        val = _val(counter)
        if not (isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype == torch.int64):
            continue
        found = _match_counter(counter, order)
        if found is None:
            continue
        add_, step, calls = found
        for call, index in calls:
            pos = call.args[index]
            call.args = (*call.args[:index], counter, *call.args[index + 1:])
            for n in (pos, *pos.all_input_nodes):  # the positions, then their arange, once unread
                if not n.users and n.op == "call_function":
                    graph.erase_node(n)
        graph.erase_node(add_)
        increments.setdefault(step, []).append(counter)
    if not increments:
        return 0
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        for step, counters in increments.items():
            # the aten overload: its schema marks the tensors written, so no dead-code pass drops it
            graph.call_function(torch.ops.aten._foreach_add_.Scalar, (counters, step))
    graph.lint()
    gm.recompile()
    return sum(len(c) for c in increments.values())


def _aliases(counter: fx.Node) -> set[fx.Node]:
    """The counter and every node that may be a view of it."""
    found, todo = {counter}, [counter]
    while todo:
        for u in todo.pop().users:
            aliasing = ((u.op == "call_method" and u.target in _ALIASING_METHODS)
                        or (u.op == "call_function" and u.target in _ALIASING_FUNCTIONS))
            if aliasing and u.args and u.args[0] in found and u not in found:
                found.add(u)
                todo.append(u)
    return found


def _in_place_add(n: fx.Node, counter: fx.Node) -> int | None:
    """S if n is `counter.add_(S)` (S an int) and its result is unused."""
    if n.op == "call_method" and n.target == "add_" or n.op == "call_function" and n.target in (
            torch.Tensor.add_, torch.ops.aten.add_.Tensor):
        if (len(n.args) == 2 and n.args[0] is counter and isinstance(n.args[1], int)
                and not isinstance(n.args[1], bool) and not n.kwargs and not n.users):
            return n.args[1]
    return None


def _writes(n: fx.Node, reads: set[fx.Node]) -> bool:
    """Whether n may write one of `reads`: an in-place op, or an op whose schema marks an argument
    it is given as written."""
    if _barrier(n):
        return True
    schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        value = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
        given = value if isinstance(value, (list, tuple)) else [value]
        if arg.alias_info is not None and arg.alias_info.is_write and set(given) & reads:
            return True
    return False


def _positions(pos: object, counter: fx.Node, tokens: int) -> bool:
    """Whether pos is `arange(tokens) + counter` (either order), int64 [tokens]."""
    if not (isinstance(pos, fx.Node) and pos.op == "call_function" and pos.target in _ADD
            and len(pos.args) == 2 and not pos.kwargs and counter in pos.args):
        return False
    ar = pos.args[1] if pos.args[0] is counter else pos.args[0]
    if not (isinstance(ar, fx.Node) and ar.op == "call_function" and ar.target is torch.arange):
        return False
    if ar.args not in ((tokens,), (0, tokens), (0, tokens, 1)) or set(ar.kwargs) - {"device", "dtype"}:
        return False
    if ar.kwargs.get("dtype", torch.int64) is not torch.int64:
        return False
    v = _val(pos)
    return isinstance(v, torch.Tensor) and v.dtype == torch.int64 and tuple(v.shape) == (tokens,)


def _match_counter(counter: fx.Node, order: dict) -> tuple[fx.Node, int, list] | None:
    """(the add_, S, [(rope call, index of its cache_position argument)]) for a counter that
    can be deferred, else None."""
    aliases = _aliases(counter)
    readers = {u for a in aliases for u in a.users} - aliases
    adds = [(u, s) for u in counter.users if (s := _in_place_add(u, counter)) is not None]
    if len(adds) != 1:
        return None
    add_, step = adds[0]
    if any(order[r] > order[add_] or _writes(r, aliases) for r in readers - {add_}):
        return None  # a reader of the new value, or another write
    calls = []
    for pos in readers - {add_}:
        for call in pos.users:
            if call.op == "call_function" and call.target in _ROPE_OPS:
                calls += _rope_uses(call, pos, counter)
    return (add_, step, calls) if calls else None


def _rope_uses(call: fx.Node, pos: fx.Node, counter: fx.Node) -> list[tuple[fx.Node, int]]:
    """[(call, index)] where call's cache_position argument (positional) is pos, made from the
    counter for the call's tokens."""
    names = [a.name for a in call.target._schema.arguments]
    index = names.index("cache_position")
    x = _val(call.args[0])
    if index >= len(call.args) or call.args[index] is not pos or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return []
    tokens = x.shape[1]
    if not isinstance(tokens, int) or not _positions(pos, counter, tokens):
        return []
    return [(call, index)]
