"""fuse_rope_cache: an attention block's q/k/v projections, rotary embedding and KV-cache write in
one INT4 call.

    Matches:   q, k, v = awq.int4_linear_multi(x, [Wq, Wk, Wv], ...)      (fuse_sibling_linears)
               qh = q.view(B, S, -1, D).transpose(1, 2)         (and kh, vh alike)
               q_embed = qh * cos + cat((-qh[..., D/2:], qh[..., :D/2]), -1) * sin
               k_embed = kh * cos + cat((-kh[..., D/2:], kh[..., :D/2]), -1) * sin
               k_cache.index_copy_(2, pos, k_embed)
               v_cache.index_copy_(2, pos, vh)
    Becomes:   q_rot = awq.int4_linear_rope_cache(x, [Wq, Wk, Wv], ..., cos, sin, pos, k_cache, v_cache)
               q_embed = q_rot.view(B, S, -1, D).transpose(1, 2)

This is the rotary embedding of a Llama-style attention (transformers' `apply_rotary_pos_emb`
with `rotate_half`; either operand order of each `*` and `+`) and a static cache's update
(transformers' `StaticCache`: `index_copy_` along the sequence dimension of [B, heads, L, D]
tensors). We do this because at decode sizes the rotation of q, of k with its cache write, and
the cache write of v are three small kernels (and three launch gaps) between the q/k/v
projection and attention, a few us a layer; the CUDA implementation of the op does all of it in
one launch after the projection's.

Only where every intermediate has no other reader, q and k are rotated by the same cos and sin
nodes, both writes take the same positions, nothing between the first and the second write reads
either cache (or a view of one), no in-place op between the projection and the writes touches
anything but a graph input or attribute the op does not read, and the
op's checks accept the example tensors (x [B, S, K], cos and sin [B or 1, 1, S, D] of x's dtype,
the caches [B, kv heads, L, D]). The call stands where the first of the two writes stood.
Run it after `fuse_sibling_linears`, whose three-weight calls it takes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ._graph import copy_source_meta, rewrite_each
from .fuse_sibling_linears import _VAL_KEYS, _barrier, _val

__all__ = ["fuse_rope_cache"]

_MULTI = torch.ops.awq.int4_linear_multi.default
_ROPE = torch.ops.awq.int4_linear_rope_cache.default
_ADD = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}
_NEG = {operator.neg, torch.neg, torch.ops.aten.neg.default}
_CAT = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def fuse_rope_cache(gm: fx.GraphModule) -> int:
    """Fuse each q/k/v projection with its rotary embedding and cache write; returns the number
    fused (one a layer of a Llama with a static cache)."""
    return rewrite_each(gm, lambda n: _match_block(gm.graph, n)
                        if n.op == "call_function" and n.target is _MULTI else None, _rewrite)


def _is(n: object, fns: set, method: str) -> bool:
    return isinstance(n, fx.Node) and (
        (n.op == "call_function" and n.target in fns) or (n.op == "call_method" and n.target == method))


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _shape(n: object) -> tuple | None:
    v = _val(n) if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _heads(y: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(view, transpose) if y's only reader is `y.view(B, S, -1, D)` (or reshape) and its only
    reader `.transpose(1, 2)`."""
    view = _only_user(y)
    if view is None or not (view.op == "call_method" and view.target in ("view", "reshape")):
        return None
    shape = _shape(view)
    tr = _only_user(view)
    if shape is None or len(shape) != 4 or tr is None or view.args[0] is not y:
        return None
    if not (_is(tr, {torch.transpose}, "transpose") and tr.args[0] is view
            and sorted(tr.args[1:]) == [1, 2] and not tr.kwargs):
        return None
    return view, tr


def _half(n: object, t: fx.Node, upper: bool, h: int) -> bool:
    """n is t[..., h:] (upper) or t[..., :h]."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and n.args[0] is t and isinstance(n.args[1], tuple) and len(n.args[1]) == 2
            and n.args[1][0] is Ellipsis and isinstance(n.args[1][1], slice)):
        return False
    sl = n.args[1][1]
    want = (h, None, None) if upper else (None, h, None)
    return (sl.start, sl.stop, sl.step) in (want, (want[0] or 0, want[1], want[2]))


def _rope(t: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, list[fx.Node]] | None:
    """(result, cos, sin, the nodes in between) if t's readers are exactly
    `t * cos + cat((-t[..., D/2:], t[..., :D/2]), -1) * sin` (either operand order)."""
    shape = _shape(t)
    if shape is None or len(shape) != 4 or shape[-1] % 2 or len(t.users) != 3:
        return None
    h = shape[-1] // 2
    users = list(t.users)
    mul_t = next((u for u in users if _is(u, _MUL, "mul")), None)
    hi = next((u for u in users if _half(u, t, True, h)), None)
    lo = next((u for u in users if _half(u, t, False, h)), None)
    if mul_t is None or hi is None or lo is None or len(mul_t.args) != 2 or mul_t.kwargs:
        return None
    cos = mul_t.args[1] if mul_t.args[0] is t else mul_t.args[0]
    neg = _only_user(hi)
    if not (_is(neg, _NEG, "neg") and neg.args == (hi,) and _only_user(lo) is not None):
        return None
    cat = _only_user(neg)
    if not (_is(cat, _CAT, "") and _only_user(lo) is cat and list(cat.args[0]) == [neg, lo]):
        return None
    if cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) not in (-1, 3):
        return None
    mul_s = _only_user(cat)
    if not (_is(mul_s, _MUL, "mul") and len(mul_s.args) == 2 and not mul_s.kwargs and cat in mul_s.args):
        return None
    sin = mul_s.args[1] if mul_s.args[0] is cat else mul_s.args[0]
    add = _only_user(mul_t)
    if not (_is(add, _ADD, "add") and _only_user(mul_s) is add and set(add.args) == {mul_t, mul_s}
            and len(add.args) == 2 and not add.kwargs):
        return None
    if not (isinstance(cos, fx.Node) and isinstance(sin, fx.Node)):
        return None
    return add, cos, sin, [mul_t, hi, lo, neg, cat, mul_s, add]


def _index_copy(n: fx.Node | None, src: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(cache, positions) if n is `cache.index_copy_(2, positions, src)`."""
    if not (isinstance(n, fx.Node) and n.op == "call_method" and n.target == "index_copy_"
            and len(n.args) == 4 and not n.kwargs and n.args[3] is src and n.args[1] in (2, -2)):
        return None
    cache, pos = n.args[0], n.args[2]
    if not (isinstance(cache, fx.Node) and isinstance(pos, fx.Node)):
        return None
    return cache, pos


def _match_block(graph: fx.Graph, multi: fx.Node) -> dict | None:
    qweights = multi.args[1] if len(multi.args) > 1 else None
    if not isinstance(qweights, (list, tuple)) or len(qweights) != 3 or len(multi.args) != 6:
        return None
    outs = {}
    for u in multi.users:
        if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
            return None
        outs[u.args[1]] = u
    if sorted(outs) != [0, 1, 2] or len(multi.users) != 3:
        return None
    heads = [_heads(outs[i]) for i in range(3)]
    if any(hd is None for hd in heads):
        return None
    q_rope, k_rope = _rope(heads[0][1]), _rope(heads[1][1])
    if q_rope is None or k_rope is None or q_rope[1:3] != k_rope[1:3]:
        return None
    k_copy, v_copy = _only_user(k_rope[0]), _only_user(heads[2][1])
    kc, vc = _index_copy(k_copy, k_rope[0]), _index_copy(v_copy, heads[2][1])
    if kc is None or vc is None or kc[1] is not vc[1] or kc[0] is vc[0]:
        return None
    (k_cache, pos), (v_cache, _) = kc, vc
    cos, sin = q_rope[1], q_rope[2]
    x = multi.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = sorted((k_copy, v_copy), key=order.__getitem__)
    inputs = [x, *[w for lst in multi.args[1:4] for w in lst], *[b for b in multi.args[5] if b is not None],
              cos, sin, pos, k_cache, v_cache]
    if not all(isinstance(n, fx.Node) and order[n] < order[first] for n in inputs):
        return None
    if any(order[u] < order[first] for u in q_rope[0].users):
        return None
    # Between the projection and the first write, an in-place op may only touch a graph input or
    # attribute the op does not read (a static cache's position counter), never a view; between
    # the two writes nothing may read a cache or a view of one (both writes now happen where the
    # first stood).
    if not _moves_safely(multi, first, inputs):
        return None
    tainted = {k_cache, v_cache}  # the caches and what was computed from them
    for n in graph.nodes:
        if n is last:
            break
        if n not in (k_copy, v_copy) and set(n.all_input_nodes) & tainted:
            if order[n] > order[first]:
                return None
            tainted.add(n)
    val = _fake_call(multi, cos, sin, pos, k_cache, v_cache)
    if val is None:
        return None
    return {"multi": multi, "outs": outs, "heads": heads, "q_rope": q_rope, "k_rope": k_rope,
            "copies": (k_copy, v_copy), "first": first, "args": (cos, sin, pos, k_cache, v_cache),
            "val": val}


def _moves_safely(start: fx.Node, stop: fx.Node, inputs) -> bool:
    """Whether what is computed up to `start` may move down to `stop`: an in-place op between them
    may only touch a graph input or attribute that none of `inputs` (the moved call's operands)
    is, never a view. Shared with fuse_add_rms_norm."""
    watched = {n for n in inputs if isinstance(n, fx.Node)}
    n = start.next
    while n is not stop:
        if _barrier(n) and (set(n.all_input_nodes) & watched or not n.args or not isinstance(n.args[0], fx.Node)
                            or n.args[0].op not in ("placeholder", "get_attr")):
            return False
        n = n.next
    return True


def _fake_call(multi: fx.Node, cos, sin, pos, k_cache, v_cache) -> tuple[str, torch.Tensor] | None:
    """The op's output on the example tensors (its meta), or None where the op's checks refuse
    them or they are unknown."""
    key = next((k for k in _VAL_KEYS if k in multi.args[0].meta), None)
    x = _val(multi.args[0])
    mode = getattr(x, "fake_mode", None)
    vals = [_val(n) if isinstance(n, fx.Node) else n for n in (cos, sin, pos, k_cache, v_cache)]
    lists = [[_val(n) if isinstance(n, fx.Node) else None for n in lst] for lst in multi.args[1:4]]
    biases = [_val(n) if isinstance(n, fx.Node) else None for n in multi.args[5]]
    if key is None or mode is None or not all(isinstance(v, torch.Tensor) for v in (*vals, *lists[0], *lists[1], *lists[2])):
        return None
    try:
        with mode:
            # the fake kernel checks and allocates; it writes nothing
            out = torch.ops.awq.int4_linear_rope_cache.default(x, *lists, multi.args[4], biases, *vals)
    except (ValueError, RuntimeError):
        return None
    return key, out


def _rewrite(graph: fx.Graph, m: dict) -> None:
    multi, first = m["multi"], m["first"]
    q_view = m["heads"][0][0]
    q_embed = m["q_rope"][0]
    with graph.inserting_before(first):
        call = graph.call_function(_ROPE, (*multi.args, *m["args"]))
        view = graph.call_method(q_view.target, (call, *q_view.args[1:]), dict(q_view.kwargs))
        tr = graph.call_method("transpose", (view, 1, 2))
    key, out = m["val"]
    call.meta[key] = out
    copy_source_meta(multi, call)
    mode = out.fake_mode
    with mode:
        view.meta[key] = out.view(*_shape(q_view))
        tr.meta[key] = view.meta[key].transpose(1, 2)
    q_embed.replace_all_uses_with(tr)
    for copy in m["copies"]:
        copy.replace_all_uses_with(copy.args[0])  # index_copy_ returns the cache itself
    dead = [*m["copies"], *reversed(m["q_rope"][3]), *reversed(m["k_rope"][3])]
    for view_, tr_ in m["heads"]:
        dead += [tr_, view_]
    dead += [m["outs"][i] for i in range(3)] + [multi]
    for n in dead:
        graph.erase_node(n)
