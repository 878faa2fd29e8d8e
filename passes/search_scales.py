"""search_scales: AWQ's per-group scale search, from the observers' statistics.

    Reads:   n.meta["awq_group"] = ScaleGroup(..., scale=None), its observer, the group's weights
    Writes:  n.meta["awq_group"] = ScaleGroup(..., scale=s, alpha=a)

The graph is not changed. `awq_compile.algorithm.search_scale` does the arithmetic. A group
with a region (passes/_region.py) measures each candidate's error at the region's outputs,
replaying the first calibration batch through it; groups whose weights are shared beyond them
keep s = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import fx

from awq_compile.algorithm import search_scale
from awq_compile.config import AWQConfig

from ._graph import fetch_attr, match_linear, param_name
from ._region import build_region_module
from .annotate_scale_groups import ScaleGroup, scale_groups, set_group
from .insert_observers import GroupObserver, recorded_inputs

__all__ = ["search_scales", "region_loss"]


def search_scales(
    gm: fx.GraphModule,
    observers: dict[int, GroupObserver],
    config: AWQConfig,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> int:
    """Search every group's scale on `device` (default: where the weights are); returns how
    many groups were searched."""
    groups = scale_groups(gm)
    searched = 0
    for group in _progress(groups, progress, "search scales"):
        obs = observers[group.index]
        size = group.absorber.size or group.in_features
        if not group.searchable:
            s, alpha = torch.ones(size), None
        else:
            weights = [fetch_attr(gm, name).to(device) for name in group.linears]
            dev = weights[0].device
            s, alpha, _ = search_scale(
                obs.x_sample.to(dev), obs.x_mean.to(dev), weights,
                config.group_size, config.zero_point, config.n_grid, config.duo_scaling,
                group.absorber.channel_map, size, region_loss(gm, group, weights, dev),
            )
            searched += 1
        set_group(gm, dataclasses.replace(group, scale=s.float().cpu(), alpha=alpha))
    return searched


def region_loss(
    gm: fx.GraphModule, group: ScaleGroup, weights: list[torch.Tensor], device: torch.device
) -> Callable[[list[torch.Tensor]], float] | None:
    """The error of candidate weights at the group's region outputs, on the recorded batch
    (None for a group without region or without a recording)."""
    if group.region is None or group.region.outputs == ():
        return None
    inputs = recorded_inputs(gm, group.region.inputs)
    if any(v is None for v in inputs):
        return None
    region_nodes = set(group.region.nodes)
    by_param: dict[str, str] = {}  # weight node name -> parameter name, for the group's linears
    for node in gm.graph.nodes:
        m = match_linear(node)
        if node.name in region_nodes and m is not None and param_name(m.weight) in group.linears:
            by_param[m.weight.name] = param_name(m.weight)
    mod = build_region_module(gm, group.region, by_param, device)
    inputs = [v.to(device) if isinstance(v, torch.Tensor) else v for v in inputs]
    order = {name: i for i, name in enumerate(group.linears)}
    dtypes = [w.dtype for w in weights]

    def run(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        args = [ws[order[p]].to(dtypes[order[p]]) for p in by_param.values()]
        return [o.float() for o in mod(*inputs, *args) if isinstance(o, torch.Tensor)]

    with torch.no_grad():
        ref = run(weights)
    total = sum(r.numel() for r in ref)

    def loss(ws: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return sum((o - r).pow(2).sum().item() for o, r in zip(run(ws), ref)) / total

    return loss


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="group")
