"""swap_decode_attention: a decode step's attention as one `awq::decode_attention` call.

    Matches:   out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0.0,
                                                   is_causal=False, scale=..., enable_gqa=...)
               where k and v may be transformers' repeat_kv of a cache:
               cache[:, :, None, :, :].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)
    Becomes:   out = awq.decode_attention(q, k, v, attn_mask, scale, enable_gqa)
               (with repeat_kv: the cache itself and enable_gqa=True)

We do this because at decode (one query token, or a few) torch's attention kernels are tiled for
long query blocks and read every cache position, masked ones included: on an H200, a 7B layer's
attention over a 384-position static cache took 8 us at batch 1 and 18 us at batch 8
(benchmarks/RESULTS.md, section 3). `decode_attention`'s CUDA kernel reads only the positions
the mask leaves, once for all the query heads of a KV head, which also makes repeat_kv's copy of
the cache unnecessary.

Only where `only_if(q, k, v, attn_mask)` accepts the example tensors (by default
`awq_compile._cuda.decode_attention_applies`: the CUDA kernel serves them, so graphs on the CPU
and prefill graphs are left alone), dropout is 0, there is no causal flag (torch's is aligned to
the top left, which a decode step does not want), and, to see through repeat_kv, nothing between
the copy and the attention may write in place. The call stands where the attention stood. The calls that read one mask (a decoder's layers)
read one copy of it with fixed strides, which inductor makes once (`_share_masks`).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch
from torch import fx

from ._graph import copy_source_meta
from .fuse_sibling_linears import _VAL_KEYS, _barrier, _val

__all__ = ["swap_decode_attention"]

_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def swap_decode_attention(gm: fx.GraphModule, only_if: Callable[..., bool] | None = None) -> int:
    """Put `awq::decode_attention` in place of each scaled_dot_product_attention call that
    `only_if` accepts; returns the number swapped (one a layer of a decode graph)."""
    if only_if is None:
        from awq_compile._cuda import decode_attention_applies as only_if
    done = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SDPA:
            done += _swap(gm.graph, node, only_if)
    if done:
        _share_masks(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return done


def _call_args(node: fx.Node) -> dict | None:
    if len(node.args) > len(_PARAMS) or any(k not in _PARAMS for k in node.kwargs):
        return None
    args = dict(_DEFAULTS, **dict(zip(_PARAMS, node.args)), **node.kwargs)
    return args if all(p in args for p in _PARAMS[:3]) else None


def _cache_of(kv: fx.Node, stop: fx.Node) -> tuple[fx.Node, int] | None:
    """(cache, G) if kv is `cache[:, :, None, :, :].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)`
    and nothing between the reshape and `stop` writes in place."""
    if not (isinstance(kv, fx.Node) and kv.op == "call_method" and kv.target in ("reshape", "view")):
        return None
    exp = kv.args[0]
    if not (isinstance(exp, fx.Node) and exp.op == "call_method" and exp.target == "expand"):
        return None
    item = exp.args[0]
    full = slice(None, None, None)
    if not (isinstance(item, fx.Node) and item.op == "call_function" and item.target is operator.getitem
            and item.args[1] == (full, full, None, full, full) and isinstance(item.args[0], fx.Node)):
        return None
    cache, shape, ex = _val(item.args[0]), _val(kv), _val(exp)
    if not all(isinstance(t, torch.Tensor) for t in (cache, shape, ex)) or cache.dim() != 4 or ex.dim() != 5:
        return None
    b, hkv, length, d = cache.shape
    g = ex.shape[2]
    if tuple(ex.shape) != (b, hkv, g, length, d) or tuple(shape.shape) != (b, hkv * g, length, d):
        return None
    n = kv.next
    while n is not stop:
        if _barrier(n):
            return None
        n = n.next
    return item.args[0], g


def _swap(graph: fx.Graph, node: fx.Node, only_if) -> int:
    a = _call_args(node)
    if a is None or a["dropout_p"] != 0.0 or a["is_causal"] is not False:
        return 0
    q, k, v, mask, scale, gqa = a["query"], a["key"], a["value"], a["attn_mask"], a["scale"], a["enable_gqa"]
    if not isinstance(gqa, bool) or not (scale is None or isinstance(scale, (int, float))):
        return 0
    scale = None if scale is None else float(scale)
    kc, vc = _cache_of(k, node), _cache_of(v, node)
    repeats = []  # repeat_kv's nodes, erased once the call no longer reads them
    if kc is not None and vc is not None and kc[1] == vc[1]:
        repeats = [k, k.args[0], k.args[0].args[0], v, v.args[0], v.args[0].args[0]]
        k, v, gqa = kc[0], vc[0], True
    if not all(isinstance(t, fx.Node) for t in (q, k, v)) or not (mask is None or isinstance(mask, fx.Node)):
        return 0
    vals = [_val(t) for t in (q, k, v)] + [None if mask is None else _val(mask)]
    key = next((x for x in _VAL_KEYS if x in node.meta), None)
    mode = getattr(vals[0], "fake_mode", None)
    if key is None or mode is None or not all(isinstance(t, torch.Tensor) for t in vals[:3]):
        return 0
    if mask is not None and not isinstance(vals[3], torch.Tensor):
        return 0
    if not only_if(*vals):
        return 0
    try:
        with mode:  # the fake kernel checks the arguments and allocates
            out = torch.ops.awq.decode_attention.default(*vals, scale, gqa)
    except (ValueError, RuntimeError):
        return 0
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.awq.decode_attention.default, (q, k, v, mask, scale, gqa))
    call.meta[key] = out
    copy_source_meta(node, call)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for n in repeats:
        if not n.users:
            graph.erase_node(n)
    return 1


def _share_masks(graph: fx.Graph) -> None:
    """Give the decode_attention calls that read one mask node one contiguous copy of it, made
    before the first of them. A decoder's layers all read the model's mask, usually computed
    from the cache's counter and expanded; inductor recomputes a cheap pointwise input into a
    buffer of the strides each extern call was traced with, so every layer had its own mask
    kernel and launch gap (H200 7B: ~0.8-1.2 us and a gap a layer). A forced-strides copy is
    lowered to one buffer that every call reads as it is. Not where something between
    the first and the last call may write the mask in place."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    # A copy with the given strides unless the tensor has them (eagerly too); inductor lowers it
    # to one realized buffer, which every reader then takes as it is.
    force_strides = torch.ops.prims.inductor_force_stride_order.default
    calls: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        if (n.op == "call_function" and n.target is torch.ops.awq.decode_attention.default
                and isinstance(n.args[3], fx.Node)):
            calls.setdefault(n.args[3], []).append(n)
    for mask, readers in calls.items():
        first, last = readers[0], readers[-1]
        n, written = first, False
        while n is not last and not written:
            written = _barrier(n) and mask in n.all_input_nodes
            n = n.next
        val = _val(mask)
        if written or not isinstance(val, torch.Tensor) or len(readers) < 2:
            continue
        with getattr(val, "fake_mode", None) or contextlib.nullcontext():
            dense = val.contiguous()
        if not all(type(x) is int for x in dense.stride()):  # symbolic strides: no node holds them
            continue
        with graph.inserting_before(first):
            shared = graph.call_function(force_strides, (mask, list(dense.stride())))
        shared.meta[next(k for k in _VAL_KEYS if k in mask.meta)] = dense
        for r in readers:
            r.args = (*r.args[:3], shared, *r.args[4:])
