"""Graph helpers shared by the passes: matching linears, naming parameters, walking users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx

aten = torch.ops.aten

# Nodes that consume a tensor only to check it; they never count as a real user.
_CHECK_OPS = {aten._assert_tensor_metadata.default}
if hasattr(aten, "sym_constrain_range_for_size"):
    _CHECK_OPS.add(aten.sym_constrain_range_for_size.default)


@dataclass(frozen=True)
class LinearMatch:
    """One linear y = x @ W.T + b found in the graph."""

    node: fx.Node  # the node producing y
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None


def match_linear(node: fx.Node) -> LinearMatch | None:
    """Recognise `aten.linear(x, W, b)`; None for anything else."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    return LinearMatch(node, x, w, b if isinstance(b, fx.Node) else None)


def param_name(node: object) -> str | None:
    """The qualified name of the parameter or buffer a `get_attr` node reads, else None.

    Passes need parameters as `get_attr` nodes (torch.export's unlifted module has them so;
    the compile backend turns dynamo's parameter inputs into attributes before the passes).
    """
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def fetch_attr(root: torch.nn.Module, target: str) -> torch.Tensor:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{target!r} is not a tensor attribute of the graph module")
    return obj


def set_attr(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at `target`, keeping it a Parameter or buffer as it was."""
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    old = getattr(mod, leaf, None)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))
    elif leaf in getattr(mod, "_buffers", {}):
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of `node` other than metadata checks."""
    return [u for u in node.users if u.target not in _CHECK_OPS]


def copy_source_meta(src: fx.Node, *dsts: fx.Node) -> None:
    """Give each of `dsts` (nodes a rewrite made in place of `src`) src's source location
    (`stack_trace`, `nn_module_stack`) where src has it, so that what is reported about the new
    nodes points at the model's code. Shared by the backend's rewriting passes."""
    for k in ("stack_trace", "nn_module_stack"):
        if k in src.meta:
            for dst in dsts:
                dst.meta[k] = src.meta[k]


def rewrite_each(gm: fx.GraphModule, match: Callable[[fx.Node], Any], rewrite: Callable[[fx.Graph, Any], None]) -> int:
    """rewrite(gm.graph, site) for each node, in graph order as it was before the first rewrite,
    where match(node) gives a site (not None); then lint and recompile if anything changed.
    Returns the number rewritten. Shared by the backend's rewriting passes."""
    done = 0
    for node in list(gm.graph.nodes):
        site = match(node)
        if site is not None:
            rewrite(gm.graph, site)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def node_val(node: object) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
    return None


def hint(v: object) -> object:
    """A concrete value for a possibly symbolic size (SymInt -> its example value); fx nodes
    standing for sizes are replaced by theirs. Other values pass through."""
    if isinstance(v, fx.Node):
        v = v.meta.get("val", v)
    if isinstance(v, torch.SymInt):
        h = v.node.hint
        return int(h) if h is not None else int(v.node.shape_env.size_hint(v.node.expr))
    if isinstance(v, (list, tuple)):
        return type(v)(hint(x) for x in v)
    return v


def concrete_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(hint(d) for d in t.shape)


def iter_linears(gm: fx.GraphModule) -> Iterable[LinearMatch]:
    for node in gm.graph.nodes:
        m = match_linear(node)
        if m is not None:
            yield m
