"""The plan a calibration produces, built from the analysed ATen graphs of one model.

Several graphs (a graph break, recompiles for other shapes) may hold the same scale group: a
group's identity is `assign_keys`'s key. `resolve_conflicts` keeps tensors that several graphs
use from being scaled inconsistently; `collect` gathers each group once, renumbered; and
`shadow_plan` runs `awq_compile.api.apply_plan`, the function `quantize` uses, on a shadow of
the model that shares its tensors, so the INT4 weights equal quantize's and the model is left
as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx, nn

from . import passes as P
from ._dynamo_graph import ServePlan, TensorNames
from .api import apply_plan
from .config import AWQConfig
from .passes._absorbers import MUL
from .passes._graph import fetch_attr
from .passes.annotate_scale_groups import set_group

__all__ = ["assign_keys", "key", "resolve_conflicts", "collect", "shadow_plan", "set_tensor"]


def key(ep: fx.GraphModule, group: P.ScaleGroup) -> tuple:
    return ep.meta["awq_keys"][group.index]


def assign_keys(ep: fx.GraphModule, code: Any) -> None:
    """Give each group an identity that holds across graphs: the frame's code object (the
    recompiles of a frame for other shapes share it, the graphs of a graph break do not), its
    linears and absorber, and which of the groups alike it is (one Linear called on two inputs
    gives two groups). Groups of one key share their observers and are searched once."""
    keys, seen = {}, {}
    for g in P.scale_groups(ep):
        like = (code, g.linears, g.absorber.kind, tuple(t.name for t in g.absorber.targets))
        keys[g.index] = (*like, seen.get(like, 0))
        seen[like] = seen.get(like, 0) + 1
    ep.meta["awq_keys"] = keys


def collect(ep, done, groups, infos) -> None:
    """Append `ep`'s groups not collected before, renumbered globally, and their linears."""
    renum = {}
    for g in P.scale_groups(ep):
        k = key(ep, g)
        if k in done:
            continue
        done.add(k)
        renum[g.index] = len(groups)
        groups.append(dataclasses.replace(g, index=len(groups)))
    for _, info in P.linear_infos(ep):
        if info.group in renum:
            infos.append(dataclasses.replace(info, group=renum[info.group]))


def resolve_conflicts(eps: list[fx.GraphModule], names: TensorNames) -> None:
    """Keep a tensor that several graphs use from being scaled inconsistently: a group whose
    weight another graph reads (outside the same group) keeps s = 1; a group whose absorber
    another graph reads gets an explicit `x * (1/s)` instead. One graph alone needs none of
    this (annotate_scale_groups checks users there)."""
    def canon(ep, name):
        t = fetch_attr(ep, name)
        return names.canonical(t) if names.owns(t) else name

    claims: dict[str, set] = {}
    readers: dict[str, set[int]] = {}
    keys = []
    for i, ep in enumerate(eps):
        keys.append({key(ep, g) for g in P.scale_groups(ep)})
        for n in ep.graph.nodes:
            if n.op == "get_attr":
                readers.setdefault(canon(ep, n.target), set()).add(i)
        for g in P.scale_groups(ep):
            for w in g.linears:
                claims.setdefault(canon(ep, w), set()).add(("w", key(ep, g)))
            for t in g.absorber.targets:
                claims.setdefault(canon(ep, t.name), set()).add(("a", key(ep, g)))
    for ep in eps:
        for g in P.scale_groups(ep):
            k = key(ep, g)

            def shared(name, role):
                c = canon(ep, name)
                rivals = {x for x in claims[c] if x[0] == role and x[1] != k}
                return bool(rivals) or any(k not in keys[j] for j in readers.get(c, ()))

            new = g
            if g.searchable and any(shared(w, "w") for w in g.linears):
                new = dataclasses.replace(new, searchable=False)
            if g.absorber.kind == "params" and any(shared(t.name, "a") for t in g.absorber.targets):
                new = dataclasses.replace(new, absorber=MUL)
            if new is not g:
                set_group(ep, new)


def shadow_plan(root: nn.Module, groups, infos, config: AWQConfig) -> ServePlan:
    """Run `apply_plan` on a shadow of `root` holding only the tensors the plan touches (the
    same tensor objects; apply_plan replaces, never writes in place), and keep the result."""
    shadow = nn.Module()
    paths = {i.weight.rpartition(".")[0] for i in infos}
    for path in sorted(paths):
        mod = root.get_submodule(path)
        if isinstance(mod, nn.Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device="meta")
            lin.weight, lin.bias = mod.weight, mod.bias
            _set_module(shadow, path, lin)
    wanted = [n for i in infos for n in (i.weight, i.bias) if n]
    wanted += [n for g in groups for n in (*g.linears, *(t.name for t in g.absorber.targets))]
    for name in wanted:
        if not _has_attr(shadow, name):
            set_tensor(shadow, name, fetch_attr(root, name))
    apply_plan(shadow, groups, infos, config)
    linears = {p: shadow.get_submodule(p) for p in sorted(paths)}
    tensors = {t.name: fetch_attr(shadow, t.name)
               for g in groups if g.scale is not None and g.absorber.kind == "params"
               for t in g.absorber.targets if t.name.rpartition(".")[0] not in linears}
    return ServePlan(linears, tensors, source="calibration", config=config)


def _set_module(root: nn.Module, path: str, mod: nn.Module) -> None:
    parent = root
    *dirs, leaf = path.split(".")
    for d in dirs:
        if not hasattr(parent, d):
            parent.add_module(d, nn.Module())
        parent = getattr(parent, d)
    parent.add_module(leaf, mod)


def set_tensor(root: nn.Module, name: str, t: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    if path and not _has_attr(root, path):
        _set_module(root, path, nn.Module())
    owner = root.get_submodule(path)
    if isinstance(t, nn.Parameter) or isinstance(getattr(owner, leaf, None), nn.Parameter):
        owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, False)
    else:
        owner._buffers[leaf] = t


def _has_attr(root: nn.Module, name: str) -> bool:
    obj: Any = root
    for part in name.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
