"""Ahead-of-time export: a quantized model -> `torch.export.ExportedProgram` with `awq.int4_linear`.

    Before:  model with Int4Linear modules (from awq_compile.quantize)
    After:   ExportedProgram whose graph calls torch.ops.awq.int4_linear.default once per Int4Linear,
             sequence length dynamic (torch.export.Dim), AWQConfig in each op node's meta["custom"]

The program round-trips through `torch.export.save` / `torch.export.load` once `awq_compile` is
imported (importing it registers the op). Loading in a process that has not imported it fails in
torch's deserializer; the node metadata printed with that failure names the import
(`_REQUIRES`). Hugging Face causal LMs are wrapped so the program maps `input_ids [batch, seq]` to
`logits [batch, seq, vocab]` with `use_cache=False`.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Sequence

import torch
from torch import nn

from . import ops as _ops  # noqa: F401  (registers torch.ops.awq.int4_linear)
from .config import AWQConfig
from .nn import Int4Linear

__all__ = ["export", "config_of", "int4_nodes", "CausalLMLogits"]

_META_KEY = "awq_compile"
_REQUIRES = "import awq_compile  (registers torch.ops.awq.int4_linear before torch.export.load)"
INT4_OP = torch.ops.awq.int4_linear.default


class CausalLMLogits(nn.Module):
    """`input_ids [batch, seq] -> logits [batch, seq, vocab]` for a Hugging Face causal LM,
    without the KV cache (an exportable, stateless forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export(
    model: nn.Module,
    args: Sequence[Any],
    *,
    calibration: Any = None,
    config: AWQConfig | None = None,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    seq_dim: int | None = 1,
    max_seq: int | None = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export a quantized model (or quantize, then export) with `torch.export`.

    With `calibration` (and optionally `config`), the model is quantized first by
    `awq_compile.quantize`; otherwise it must already contain `Int4Linear` layers. Unless
    `dynamic_shapes` is given, dimension `seq_dim` of every tensor argument is one dynamic
    `torch.export.Dim("seq", min=1, max=max_seq)`; `seq_dim=None` exports static shapes.

    >>> ep = export(qmodel, (torch.randint(0, 49152, (1, 16)),))  # doctest: +SKIP
    >>> ep.module()(torch.randint(0, 49152, (1, 40))).shape  # any sequence length  # doctest: +SKIP
    """
    if calibration is not None:
        from .api import quantize  # lazy: the quantization stack is not needed to export

        model = quantize(model, calibration=calibration, config=config or AWQConfig())
    elif config is not None and not _has_int4(model):
        raise ValueError(
            "export: config was given without calibration data and the model is not quantized; "
            "pass calibration=... to quantize it first"
        )
    if not _has_int4(model):
        raise ValueError(
            f"export: {type(model).__name__} has no Int4Linear layers; quantize it first "
            "(awq_compile.quantize) or pass calibration=... and config=..."
        )
    config = config or getattr(model, "awq_config", None)
    wrapped = CausalLMLogits(model) if _is_hf_causal_lm(model) else model
    args = tuple(args)
    # quantize(output="graph") records the keyword arguments its capture used (use_cache=False)
    kwargs = {**getattr(model, "awq_capture_kwargs", {}), **(kwargs or {})}
    if dynamic_shapes is None and seq_dim is not None:
        dynamic_shapes = _seq_dynamic_shapes(wrapped, args, kwargs, seq_dim, max_seq)
    with torch.no_grad():
        ep = torch.export.export(
            wrapped, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict
        )
    _annotate(ep, config)
    return ep


def int4_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The `awq.int4_linear` call nodes of an exported program, in graph order."""
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target == INT4_OP]


def config_of(program_or_model: torch.export.ExportedProgram | nn.Module) -> AWQConfig | None:
    """The AWQConfig an exported program (node metadata) or a quantized model (`.awq_config`)
    carries, or None."""
    if isinstance(program_or_model, torch.export.ExportedProgram):
        for node in int4_nodes(program_or_model):
            meta = node.meta.get("custom", {}).get(_META_KEY)
            if isinstance(meta, str):  # torch.export.load gives the JSON text back
                meta = json.loads(meta)
            if meta and meta.get("config"):
                return AWQConfig.from_json(meta["config"])
        return None
    return getattr(program_or_model, "awq_config", None)


def _annotate(ep: torch.export.ExportedProgram, config: AWQConfig | None) -> None:
    """Write the config (and the import a loader needs) into each op node's meta["custom"],
    which torch.export.save serializes with the node."""
    meta = {"requires": _REQUIRES, "config": config.to_json() if config is not None else None}
    for node in int4_nodes(ep):
        node.meta.setdefault("custom", {})[_META_KEY] = meta


def _seq_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, seq_dim: int,
                        max_seq: int | None) -> dict[str, Any]:
    """One Dim("seq") on dimension `seq_dim` of every tensor argument, keyed by parameter name."""
    seq = torch.export.Dim("seq", min=1, max=max_seq) if max_seq else torch.export.Dim("seq", min=1)
    names = list(inspect.signature(module.forward).parameters)
    values = {**dict(zip(names, args)), **kwargs}
    return {
        k: {seq_dim: seq} if isinstance(v, torch.Tensor) and v.dim() > seq_dim else None
        for k, v in values.items()
    }


def _has_int4(model: nn.Module) -> bool:
    """Int4Linear modules, or awq.int4_linear calls in a GraphModule (quantize(output="graph"))."""
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        return True
    graph = getattr(model, "graph", None)
    return isinstance(graph, torch.fx.Graph) and any(n.target == INT4_OP for n in graph.nodes)


def _is_hf_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional for plain modules
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "lm_head")
