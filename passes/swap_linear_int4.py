"""swap_linear_int4: replace each annotated linear by the INT4 op.

    Matches:   y = aten.linear(x, W, b)                   (y.meta["awq"] is a LinearInfo)
    Becomes:   y = awq.int4_linear(x, qweight, scales, zeros, group_size, b)

The weight is clipped (if search_clip chose a range) and quantized once, here; the packed
tensors become buffers next to where the weight was (`<owner>.qweight`, `.scales`, `.zeros`,
the names an `Int4Linear` at that place would have), and the float weight is dropped once
nothing reads it.
"""

from __future__ import annotations

import torch
from torch import fx

from awq_compile.algorithm import apply_clip
from awq_compile.config import AWQConfig
from awq_compile.quant import QuantizedWeight, padded_k, quantize

from ._graph import fetch_attr
from .annotate_scale_groups import LinearInfo, linear_infos

__all__ = ["swap_linear_int4", "quantize_linear"]


def quantize_linear(w: torch.Tensor, info: LinearInfo, config: AWQConfig) -> QuantizedWeight:
    """Clip (if searched) and quantize one folded weight [N, K]."""
    k = w.shape[1]
    if not config.pad_k and padded_k(k, config.group_size) != k:
        raise ValueError(
            f"{info.weight}: in_features={k} is not a multiple of group_size="
            f"{config.group_size} and AWQConfig.pad_k is False"
        )
    if info.clip_range is not None:
        w = apply_clip(w.float(), info.clip_range.to(w.device), config.group_size)
    return quantize(w, config.group_size, config.zero_point, config.torch_dtype)


def swap_linear_int4(gm: fx.GraphModule, config: AWQConfig) -> int:
    """Swap every annotated linear; returns the number of linears swapped."""
    swapped = 0
    done: set[str] = set()  # a weight at several call sites is quantized once, at its first
    for node, info in linear_infos(gm):
        w_node = node.args[1]
        owner, prefix = _owner(gm, info.weight)
        if info.weight not in done:
            qw = quantize_linear(fetch_attr(gm, info.weight), info, config)
            for leaf, t in (("qweight", qw.qweight), ("scales", qw.scales), ("zeros", qw.zeros)):
                owner.register_buffer(prefix.rsplit(".", 1)[-1] + leaf, t)
            done.add(info.weight)
        getters = []
        for leaf in ("qweight", "scales", "zeros"):
            t = fetch_attr(gm, prefix + leaf)
            with gm.graph.inserting_before(node):
                g = gm.graph.get_attr(prefix + leaf)
                g.meta["val"] = t
                getters.append(g)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.awq.int4_linear.default,
                (node.args[0], *getters, config.group_size, bias),
            )
        new.meta["val"] = node.meta.get("val")
        new.meta["awq"] = info
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not w_node.users:
            gm.graph.erase_node(w_node)
            _drop_attr(gm, info.weight)
        swapped += 1
    if swapped:
        gm.graph.lint()
        gm.recompile()
    return swapped


def _owner(gm: fx.GraphModule, name: str) -> tuple[torch.nn.Module, str]:
    """The module owning parameter `name` and the prefix of the packed buffers' names:
    `<owner>.qweight` for a `.weight` (what an Int4Linear there holds), `<owner>.<leaf>_qweight`
    for a parameter of another name (a functional linear's)."""
    path, _, leaf = name.rpartition(".")
    stem = "" if leaf == "weight" else leaf + "_"
    try:
        owner = gm.get_submodule(path)
    except AttributeError:
        owner = gm
        stem = name.replace(".", "_") + "_"
        path = ""
    return owner, (path + "." if path else "") + stem


def _drop_attr(gm: fx.GraphModule, name: str) -> None:
    *path, leaf = name.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]
