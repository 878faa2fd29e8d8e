"""annotate_scale_groups: find AWQ's scale groups from the graph's dataflow.

    Matches:   q = linear(n, Wq); k = linear(n, Wk); v = linear(n, Wv)     n = rms_norm(x) * g
    Annotates: n.meta["awq_group"] = ScaleGroup(linears=(Wq, Wk, Wv), absorber=params[g])
               q.meta["awq"] = LinearInfo(group=0, clip=False)  # q, k feed attention scores

Two keys, because one node can be both: in `linear(linear(x, W1), W2)` the first linear is a
member of one group and the input of the next.

A group is the set of linears that read the same activation node; all of them share one scale
vector s (their weight columns are multiplied by s, the activation divided by it). How the
division is absorbed upstream is decided by `_absorbers.find_absorber`. Nothing is rewritten:
later passes read only these annotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ._absorbers import VALUE_PATH, Absorber, find_absorber
from ._region import Region, find_region
from ._graph import LinearMatch, iter_linears, match_linear, node_val, param_name, real_users

__all__ = ["ScaleGroup", "LinearInfo", "annotate_scale_groups", "scale_groups", "linear_infos",
           "set_group"]

aten = torch.ops.aten


@dataclass(frozen=True, eq=False)
class LinearInfo:
    """One linear to quantize."""

    weight: str  # qualified name of its weight
    bias: str | None
    group: int  # index into the ScaleGroup list
    out_features: int
    in_features: int
    clip: bool  # False for linears feeding attention scores (q, k), as AWQ does
    clip_range: torch.Tensor | None = None  # [N, G, 2] (lower, upper), written by search_clip


@dataclass(frozen=True, eq=False)
class ScaleGroup:
    """Linears reading one activation, sharing one scale vector."""

    index: int
    input: str  # name of the activation node
    linears: tuple[str, ...]  # weight names, in graph order
    in_features: int
    absorber: Absorber
    searchable: bool  # False when a weight is shared beyond this group (s stays 1)
    region: Region | None = None  # where the search measures the error (None: the linears)
    scale: torch.Tensor | None = None  # [absorber size], written by search_scales
    alpha: float | None = None


def annotate_scale_groups(gm: fx.GraphModule, skip: tuple[str, ...] = ()) -> fx.GraphModule:
    """Annotate every quantizable linear and its group; see the module docstring.

    `skip`: weight owners whose names end with one of these (e.g. "lm_head") stay float.
    """
    by_input: dict[fx.Node, list[LinearMatch]] = {}
    for m in iter_linears(gm):
        name = param_name(m.weight)
        if name is None or node_val(m.weight) is None or node_val(m.weight).dim() != 2:
            continue  # a weight computed at run time is not ours to quantize
        owner = name.rsplit(".", 1)[0]
        if any(owner == s or owner.endswith("." + s) for s in skip):
            continue
        by_input.setdefault(m.x, []).append(m)

    groups = []
    for x, members in by_input.items():
        index = len(groups)
        searchable = all(_weight_only_here(m, members) for m in members)
        absorber = find_absorber(x, {m.node for m in members})
        group = ScaleGroup(
            index=index,
            input=x.name,
            # One weight read twice here (a Linear called twice, tied weights) is scaled once.
            linears=tuple(dict.fromkeys(param_name(m.weight) for m in members)),
            # The weight's K, not x's: a graph input's last dim may be a SymInt (dynamic capture).
            in_features=int(node_val(members[0].weight).shape[1]),
            absorber=absorber,
            searchable=searchable,
            region=_region(gm, members) if searchable else None,
        )
        x.meta["awq_group"] = group
        groups.append(group)
        for m in members:
            w = node_val(m.weight)
            m.node.meta["awq"] = LinearInfo(
                weight=param_name(m.weight),
                bias=param_name(m.bias),
                group=index,
                out_features=w.shape[0],
                in_features=w.shape[1],
                clip=not _feeds_attention_scores(m.node),
            )
    gm.meta["awq_groups"] = tuple(groups)
    return gm


def scale_groups(gm: fx.GraphModule) -> tuple[ScaleGroup, ...]:
    """The groups `annotate_scale_groups` found (empty before it ran)."""
    return gm.meta.get("awq_groups", ())


def linear_infos(gm: fx.GraphModule) -> list[tuple[fx.Node, LinearInfo]]:
    """The annotated linear nodes, in graph order."""
    return [(n, n.meta["awq"]) for n in gm.graph.nodes if isinstance(n.meta.get("awq"), LinearInfo)]


def set_group(gm: fx.GraphModule, group: ScaleGroup) -> None:
    """Store an updated ScaleGroup (on its input node and in the module's group list)."""
    groups = list(scale_groups(gm))
    groups[group.index] = group
    gm.meta["awq_groups"] = tuple(groups)
    for node in gm.graph.nodes:
        if node.name == group.input:
            node.meta["awq_group"] = group


def _region(gm: fx.GraphModule, members: list[LinearMatch]) -> Region | None:
    """The group's region, unless it is just its own linears (then the search's cheaper
    direct loss measures the same thing)."""
    region = find_region(gm, [m.node for m in members])
    names = {m.node.name for m in members}
    if region is None or set(region.nodes) <= names:
        return None
    return region


def _weight_only_here(m: LinearMatch, members: list[LinearMatch]) -> bool:
    """Scaling W's columns changes every use of W: allowed only if all its uses are linears of
    this very group (a Linear called on two different inputs, or a weight tied to an
    embedding, keeps s = 1)."""
    nodes = {o.node for o in members}
    return all(u in nodes and match_linear(u).weight is m.weight for u in real_users(m.weight))


def _feeds_attention_scores(node: fx.Node, max_depth: int = 24) -> bool:
    """Whether this linear's output reaches an attention op's query or key (not its value)."""
    frontier, seen = [(node, 0)], {node}
    while frontier:
        n, depth = frontier.pop()
        for u in real_users(n):
            if u in seen:
                continue
            seen.add(u)
            if u.target in VALUE_PATH:
                vi = VALUE_PATH[u.target]
                if any(a is n for j, a in enumerate(u.args[:vi])):
                    return True
                continue
            if match_linear(u) is not None or depth + 1 >= max_depth:
                continue
            frontier.append((u, depth + 1))
    return False
