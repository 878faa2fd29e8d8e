"""insert_observers: record what the scale search needs about each group's input activation.

    Matches:   n = <group input>;  q = linear(n, Wq) ...     (n.meta["awq"] is a ScaleGroup)
    Becomes:   n = <group input>;  awq_observer_0(n);  q = linear(n, Wq) ...   (a call_module)

Each observer keeps, for its group: the running sum of |x| per channel over every calibration
token (AWQ's s_x), and a bounded sample of token rows, the inputs of the search's loss. The
sample takes `ceil(max_tokens / n_batches)` random rows of each batch from a seeded generator,
so memory per group is at most max_tokens x K values in the activation's dtype, and the result
is deterministic. Observers raise on NaN/Inf activations, naming the group's linears.
`remove_observers` takes them out again.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from .annotate_scale_groups import ScaleGroup, scale_groups

__all__ = ["GroupObserver", "insert_observers", "remove_observers"]

_PREFIX = "awq_observer_"


class GroupObserver(torch.nn.Module):
    """Statistics of one group's input activation."""

    def __init__(self, group: ScaleGroup, max_tokens: int, n_batches: int, seed: int) -> None:
        super().__init__()
        self.group = group
        self.max_tokens = max_tokens
        self.per_batch = max(1, math.ceil(max_tokens / max(1, n_batches)))
        self.gen = torch.Generator().manual_seed(seed * 100003 + group.index)
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self.samples: list[torch.Tensor] = []
        self.kept = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if not torch.isfinite(rows).all():
            raise ValueError(
                f"calibration produced NaN/Inf activations at the input of {list(self.group.linears)}"
            )
        s = rows.abs().sum(dim=0, dtype=torch.float64)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.tokens += rows.shape[0]
        take = min(self.per_batch, self.max_tokens - self.kept, rows.shape[0])
        if take > 0:
            idx = torch.randperm(rows.shape[0], generator=self.gen)[:take].to(rows.device)
            self.samples.append(rows.index_select(0, idx).cpu())
            self.kept += take

    @property
    def x_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise RuntimeError(f"no calibration data reached {list(self.group.linears)}")
        return (self.abs_sum / self.tokens).float()

    @property
    def x_sample(self) -> torch.Tensor:
        return torch.cat(self.samples, dim=0)


def insert_observers(
    gm: fx.GraphModule, max_tokens: int = 4096, n_batches: int = 1, seed: int = 0
) -> dict[int, GroupObserver]:
    """Insert one observer after each annotated group input; returns them by group index."""
    observers: dict[int, GroupObserver] = {}
    groups = {g.input: g for g in scale_groups(gm)}
    for node in list(gm.graph.nodes):
        group = groups.get(node.name)
        if group is None:
            continue
        obs = GroupObserver(group, max_tokens, n_batches, seed)
        observers[group.index] = obs
        gm.add_submodule(f"{_PREFIX}{group.index}", obs)
        with gm.graph.inserting_after(node):
            gm.graph.call_module(f"{_PREFIX}{group.index}", (node,))
    if observers:
        gm.graph.lint()
        gm.recompile()
    return observers


def remove_observers(gm: fx.GraphModule) -> int:
    """Remove every observer node; returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(_PREFIX):
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed
