"""fuse_gated_mlp: a gated MLP's gate and up projections and their activation in one INT4 call.

    Matches:   g = awq.int4_linear(x, Wg, Sg, Zg, gs, bg)       (or a plain Int4Linear module call)
               u = awq.int4_linear(x, Wu, Su, Zu, gs, bu)
               h = silu(g) * u          (F.silu without inplace, aten.silu, an nn.SiLU module;
                                         operator.mul, torch.mul, aten.mul.Tensor, .mul; either order)
    Becomes:   h = awq.int4_linear_glu(x, [Wg, Wu], [Sg, Su], [Zg, Zu], gs, [bg, bu])

We do this because at decode sizes `silu(g) * u` is one more kernel launch between the gate/up
and down projections, and the folded CUDA decode kernel can compute gate row r and up row r in
one tile and write only the product (`awq_compile.ops` has the rounding). A bf16 model cannot:
its projections are cuBLAS calls. It runs before `fuse_sibling_linears`, which then fuses
what is left (q/k/v).

Only where g, the silu and u have no other reader, both projections read the same x with the
same group size and packed K and have the same number of rows (known from the weights' meta or
the modules), and the product cannot broadcast (g and u are the same size by then). A module call
is matched as `fuse_sibling_linears` matches it (exactly `Int4Linear`, no hooks, no input scale),
its buffers read by new `get_attr` nodes.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .fuse_sibling_linears import _Call, _match_call, _operands, _rows

__all__ = ["fuse_gated_mlp"]

_SILU = {F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu}
_MUL = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul}
_GLU = torch.ops.awq.int4_linear_glu.default


def fuse_gated_mlp(gm: fx.GraphModule) -> int:
    """Fuse each `silu(gate(x)) * up(x)` of two INT4 linears; returns the number fused (one a
    layer of a Llama)."""
    fused = 0
    for h in list(gm.graph.nodes):
        found = _match_glu(gm, h)
        if found is None:
            continue
        gate, up, act = found
        graph = gm.graph
        with graph.inserting_before(h):
            lo, hi = _operands(graph, gate), _operands(graph, up)
            lists = [[lo[i], hi[i]] for i in range(4)]
            new = graph.call_function(_GLU, (gate.x, *lists[:3], gate.group_size, lists[3]))
        new.meta.update(h.meta)
        h.replace_all_uses_with(new)
        for n in (h, act, gate.node, up.node):
            graph.erase_node(n)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


def _match_glu(gm: fx.GraphModule, h: fx.Node) -> tuple[_Call, _Call, fx.Node] | None:
    """(the gate call, the up call, the silu node) if h = silu(gate(x)) * up(x) as the module
    docstring says."""
    if not _is_mul(h) or len(h.args) != 2 or h.kwargs:
        return None
    for act, u in (h.args, h.args[::-1]):
        if not (isinstance(act, fx.Node) and isinstance(u, fx.Node)) or act is u:
            continue
        g = _silu_input(gm, act)
        if g is None or len(act.users) != 1 or len(g.users) != 1 or len(u.users) != 1:
            continue
        gate, up = _match_call(gm, g), _match_call(gm, u)
        if (gate is not None and up is not None and gate.x is up.x and gate.group_size == up.group_size
                and gate.packed_k is not None and gate.packed_k == up.packed_k
                and _rows(gate) is not None and _rows(gate) == _rows(up)):
            return gate, up, act
    return None


def _is_mul(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MUL) or (n.op == "call_method" and n.target == "mul")


def _silu_input(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    if n.op == "call_function" and n.target in _SILU:
        inplace = n.kwargs.get("inplace", n.args[1] if len(n.args) > 1 else False)
        if inplace is False and n.args and isinstance(n.args[0], fx.Node) and set(n.kwargs) <= {"inplace"}:
            return n.args[0]
        return None
    if n.op == "call_module" and len(n.args) == 1 and not n.kwargs and isinstance(n.args[0], fx.Node):
        mod = gm.get_submodule(n.target)
        if (type(mod) is torch.nn.SiLU and not mod.inplace and not mod._forward_hooks
                and not mod._forward_pre_hooks):
            return n.args[0]
    return None
