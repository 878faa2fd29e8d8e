"""search_clip: AWQ's auto-clip, per linear, on the folded weights.

    Reads:   y.meta["awq"] = LinearInfo(clip=True, clip_range=None), the folded weight, the
             group's observed inputs (divided by s: what the folded linear really reads)
    Writes:  y.meta["awq"] = LinearInfo(..., clip_range=b)   b: [N, G, 2] (lower, upper) per group

Runs after fold_scales, so it clips exactly the weights that will be quantized. Linears that
feed attention scores (q, k) are not clipped, as in the reference implementation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from awq_compile.algorithm import expand_scale, search_clip as _search_clip
from awq_compile.config import AWQConfig

from ._graph import fetch_attr
from .annotate_scale_groups import linear_infos, scale_groups
from .insert_observers import GroupObserver
from .search_scales import _progress

__all__ = ["search_clip"]


def search_clip(
    gm: fx.GraphModule,
    observers: dict[int, GroupObserver],
    config: AWQConfig,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> int:
    """Search clip ranges for every clippable linear on `device` (default: where the weights
    are); returns how many were searched."""
    groups = scale_groups(gm)
    searched = 0
    for node, info in _progress(linear_infos(gm), progress, "search clip"):
        if not info.clip:
            continue
        group = groups[info.group]
        w = fetch_attr(gm, info.weight).to(device)
        x = observers[info.group].x_sample[: config.max_clip_tokens].to(w.device).float()
        if group.scale is not None:
            x = x / expand_scale(group.scale, group.absorber.channel_map).to(w.device)
        b = _search_clip(x, w, config.group_size, config.zero_point, config.clip_grid,
                         config.clip_max_shrink, config.clip_separate_bounds)
        node.meta["awq"] = dataclasses.replace(info, clip_range=b.cpu())
        searched += 1
    return searched
