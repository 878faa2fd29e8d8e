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

__all__ = ["GroupObserver", "ValueRecorder", "insert_observers", "remove_observers",
           "recorded_inputs"]

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


class ValueRecorder(torch.nn.Module):
    """Keeps the value of one node from the first calibration batch: the inputs a group's
    region (passes/_region.py) is replayed on. Whole sequences, since attention mixes them."""

    def __init__(self) -> None:
        super().__init__()
        self.value = None
        self.calls = 0

    def forward(self, v) -> None:
        if self.calls == 0:
            self.value = v.detach().cpu() if isinstance(v, torch.Tensor) else v
        self.calls += 1


def recorded_inputs(gm: fx.GraphModule, names: tuple[str, ...]) -> list:
    """The values the recorders kept for these nodes (first calibration batch)."""
    recorders = gm.meta.get("awq_recorders", {})
    return [recorders[n].value for n in names]


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
    by_name = {n.name: n for n in gm.graph.nodes}
    wanted = dict.fromkeys(n for g in scale_groups(gm) if g.region for n in g.region.inputs)
    recorders = gm.meta.setdefault("awq_recorders", {})
    for name in wanted:
        node = by_name[name]
        recorders[name] = ValueRecorder()
        gm.add_submodule(f"{_PREFIX}rec_{name}", recorders[name])
        with gm.graph.inserting_after(node):
            gm.graph.call_module(f"{_PREFIX}rec_{name}", (node,))
    if observers or wanted:
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
