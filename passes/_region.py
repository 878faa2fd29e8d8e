"""The region a scale group's error is measured on: its linears and what they feed, up to the
next linear or residual add (the attention block for q/k/v, the MLP for gate/up).

AWQ's reference code measures a group's quantization error at the output of a whole block; the
graph has no blocks, but its dataflow draws the same line: starting from the group's linears,
every node that reads a value they influence belongs to the region, except that a following
linear ends it (its output is a region output, its weight stays float) and so does an add whose
other operand is an outside activation of the full shape (a residual connection). Everything
the region reads from outside (the group input, rotary tables, masks, sizes) is recorded during
calibration and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ._graph import concrete_shape, fetch_attr, match_linear, node_val, real_users

aten = torch.ops.aten

__all__ = ["Region", "find_region", "build_region_module"]


@dataclass(frozen=True)
class Region:
    nodes: tuple[str, ...]  # graph order, the group's linears included
    inputs: tuple[str, ...]  # outside values the region reads (not parameters)
    outputs: tuple[str, ...]


def _is_residual(node: fx.Node, tainted: set[fx.Node]) -> bool:
    if node.target not in (aten.add.Tensor, aten.add_.Tensor):
        return False
    out = node_val(node)
    for a in node.args[:2]:
        v = node_val(a)
        if (isinstance(a, fx.Node) and a not in tainted and v is not None and out is not None
                and concrete_shape(v) == concrete_shape(out)):
            return True
    return False


def find_region(gm: fx.GraphModule, members: list[fx.Node], max_nodes: int = 256) -> Region | None:
    """The region of a group whose linear nodes are `members`; None if it is not bounded
    within `max_nodes` or holds anything but function calls."""
    nodes = list(gm.graph.nodes)
    first = min(nodes.index(m) for m in members)
    tainted: set[fx.Node] = set(members)
    region: list[fx.Node] = [n for n in nodes if n in tainted]
    outputs: list[fx.Node] = []
    for n in nodes[first:]:
        if n in tainted or not any(a in tainted for a in n.all_input_nodes):
            continue
        lin = match_linear(n)
        if lin is not None and lin.x in tainted and lin.weight not in tainted:
            region.append(n)  # the next linear: its output is measured, it stays float
            outputs.append(n)
            continue
        if n.op == "output" or _is_residual(n, tainted):
            outputs.extend(a for a in n.all_input_nodes if a in tainted and a not in outputs)
            continue
        if n.op != "call_function":
            return None
        tainted.add(n)
        region.append(n)
        if len(region) > max_nodes:
            return None
    inside = set(region)
    for n in tainted:  # a value used beyond the region is measured too
        if any(u not in inside for u in real_users(n)) and n not in outputs:
            outputs.append(n)
    inputs: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    order = {n: i for i, n in enumerate(nodes)}
    outputs.sort(key=order.__getitem__)
    return Region(tuple(n.name for n in region), tuple(n.name for n in inputs),
                  tuple(n.name for n in outputs))


def build_region_module(
    gm: fx.GraphModule, region: Region, weights: dict[str, str], device: torch.device | None
) -> fx.GraphModule:
    """A standalone GraphModule computing the region's outputs from its inputs, followed by one
    placeholder per name in `weights` (weight node name -> parameter name), which replaces that
    parameter. Other parameters are copied onto `device`; devices baked into the graph too."""
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for name in region.inputs:
        env[by_name[name]] = g.placeholder(f"in_{name}")
    for node_name in weights:
        env[by_name[node_name]] = g.placeholder(f"w_{node_name}")

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter read inside the region
            flat = str(a.target).replace(".", "__")
            root.register_buffer(flat, fetch_attr(gm, str(a.target)).detach().to(device))
            env[a] = g.get_attr(flat)
        return env[a]

    def dev(v):
        return device if isinstance(v, torch.device) and device is not None else v

    for name in region.nodes:
        n = by_name[name]
        new = g.node_copy(n, arg)
        new.args = tuple(dev(v) for v in new.args)
        new.kwargs = {k: dev(v) for k, v in new.kwargs.items()}
        env[n] = new
    g.output(tuple(env[by_name[o]] for o in region.outputs))
    return fx.GraphModule(root, g)

