"""search_scales: AWQ's per-group scale search, from the observers' statistics.

    Reads:   n.meta["awq"] = ScaleGroup(..., scale=None), its observer, the group's weights
    Writes:  n.meta["awq"] = ScaleGroup(..., scale=s, alpha=a)

The graph is not changed. `awq_compile.algorithm.search_scale` does the arithmetic; groups whose
weights are shared beyond them keep s = 1.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from awq_compile.algorithm import search_scale
from awq_compile.config import AWQConfig

from ._graph import fetch_attr
from .annotate_scale_groups import scale_groups, set_group
from .insert_observers import GroupObserver

__all__ = ["search_scales"]


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
                group.absorber.channel_map, size,
            )
            searched += 1
        set_group(gm, dataclasses.replace(group, scale=s.float().cpu(), alpha=alpha))
    return searched


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="group")
