"""fold_scales: multiply each group's weight columns by s and absorb 1/s upstream.

    Matches:   y = linear(rms_norm(x) * g, W)            with ScaleGroup(scale=s, absorber=params[g])
    Becomes:   y = linear(rms_norm(x) * (g / s), W * s)  (the same function, up to rounding)

    Matches:   y = linear(gelu(h), W)                    with ScaleGroup(scale=s, absorber=mul)
    Becomes:   y = linear(gelu(h) * (1 / s), W * s)      (an explicit mul node is inserted)

Parameters are replaced by new tensors, never changed in place, so a model the graph was
captured from keeps its own. `fold_group_tensors` is the tensor arithmetic alone, shared with
`awq_compile.api.apply_plan`, which folds the same plan into an eager module.
"""

from __future__ import annotations

import torch
from torch import fx

from awq_compile.algorithm import expand_scale

from ._graph import fetch_attr, set_attr
from .annotate_scale_groups import ScaleGroup, linear_infos, scale_groups

__all__ = ["fold_scales", "fold_group_tensors", "inverse_input_scale"]


def fold_group_tensors(root: torch.nn.Module, group: ScaleGroup) -> None:
    """Fold one group's scale into the tensors of `root` (a GraphModule or the eager model;
    both name parameters alike). Explicit-mul groups only get their columns scaled here."""
    s = group.scale
    se = expand_scale(s, group.absorber.channel_map)
    for name in group.linears:
        w = fetch_attr(root, name)
        set_attr(root, name, (_up(w) * se.to(w.device, _up(w).dtype)).to(w.dtype))
    if group.absorber.kind != "params":
        return
    for t in group.absorber.targets:
        p = fetch_attr(root, t.name)
        shape = [1] * p.dim()
        shape[t.dim] = -1
        sv = s.to(p.device, _up(p).dtype).reshape(shape)
        new = (1 + _up(p)) / sv - 1 if t.one_plus else _up(p) / sv
        set_attr(root, t.name, new.to(p.dtype))


def _up(t: torch.Tensor) -> torch.Tensor:
    """Fold in at least float32 (half-precision parameters), in float64 where they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def inverse_input_scale(group: ScaleGroup) -> torch.Tensor:
    """1/s per input channel, the factor of an explicit-mul group."""
    return 1.0 / expand_scale(group.scale, group.absorber.channel_map)


def fold_scales(gm: fx.GraphModule) -> int:
    """Fold every searched group; returns the number of explicit mul nodes inserted."""
    inserted = 0
    users = {}
    for node, info in linear_infos(gm):
        users.setdefault(info.group, []).append(node)
    by_name = {n.name: n for n in gm.graph.nodes}
    for group in scale_groups(gm):
        if group.scale is None:
            continue
        fold_group_tensors(gm, group)
        if group.absorber.kind == "params":
            continue
        x = by_name[group.input]
        attr = f"awq_inv_scale_{group.index}"
        inv = inverse_input_scale(group).to(x.meta["val"].dtype)
        gm.register_buffer(attr, inv.to(fetch_attr(gm, group.linears[0]).device))
        with gm.graph.inserting_before(users[group.index][0]):
            get = gm.graph.get_attr(attr)
            get.meta["val"] = inv
            mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, get))
            mul.meta["val"] = x.meta["val"]
        for lin in users[group.index]:
            lin.replace_input_with(x, mul)
        inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted
