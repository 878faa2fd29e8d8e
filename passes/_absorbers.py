"""Where a scale group's `1/s` goes: a small registry keyed by the producing op.

AWQ multiplies a group's weight columns by s, so the activation x all its linears read must be
divided by s. That division is free when an op upstream of x is linear per channel: a norm's
weight, the rows of the previous linear, one factor of an elementwise product. `find_absorber`
walks up from x through channel-preserving ops (views, casts, attention's value path) to the first
op a rule in `RULES` can absorb into; where none can, the group gets an explicit `mul`.

A new architecture should need no new code here; a new op, one rule of a few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from ._graph import concrete_shape, hint, match_linear, node_val, param_name, real_users

aten = torch.ops.aten

__all__ = ["ParamTarget", "Absorber", "find_absorber", "RULES", "PASS_THROUGH"]


@dataclass(frozen=True)
class ParamTarget:
    """A tensor that absorbs 1/s along dimension `dim` (w / s, or (1 + w) / s - 1)."""

    name: str
    dim: int
    one_plus: bool = False


@dataclass(frozen=True)
class Absorber:
    """How a group's 1/s is absorbed.

    kind "params": divide `targets` by s, where s lives in the absorber's own channel space of
    `size` channels; the group's input channel k reads absorber channel `channel_map[k]`
    (None: the identity). kind "mul": an explicit `x * (1/s)` in front of the group.
    """

    kind: str
    targets: tuple[ParamTarget, ...] = ()
    size: int = 0
    channel_map: tuple[int, ...] | None = None


MUL = Absorber("mul")

# Ops that keep each channel's identity (values move, channels are not mixed): walk into arg 0.
PASS_THROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default, aten.dropout.default,
    aten.slice.Tensor,  # `x[:, :, None]` in repeat_kv; channel_map checks what a slice keeps
}
# Ops whose output channels are their value input's channels (attention): arg index of value.
VALUE_PATH = {
    aten.scaled_dot_product_attention.default: 2,
    aten.bmm.default: 1,
    aten.matmul.default: 1,
}

Walk = tuple[fx.Node, int]  # (node on the chain, index of the argument the chain enters by)
Found = tuple[tuple[ParamTarget, ...], fx.Node, list[Walk]]


def _per_channel_param(node: object, channels: int) -> tuple[str, int] | None:
    """(name, dim) if `node` is a parameter holding one value per channel of the last dim."""
    name = param_name(node)
    val = node_val(node)
    if name is None or val is None or val.dim() == 0 or val.shape[-1] != channels:
        return None
    if any(d != 1 for d in val.shape[:-1]):
        return None
    return name, val.dim() - 1


def _exclusive(node: fx.Node, allowed: set[fx.Node]) -> bool:
    return all(u in allowed for u in real_users(node))


def _rule_mul(node: fx.Node, walk: Callable) -> Found | None:
    """`x * w` with w a per-channel parameter (a norm's weight, or `1 + w`), else one factor of
    an elementwise product of activations (the gated MLP's `act(gate) * up`)."""
    c = node_val(node).shape[-1]
    a, b = node.args[0], node.args[1]
    for p, other in ((b, a), (a, b)):
        hit = _per_channel_param(p, c)
        if hit is not None and len(real_users(p)) == 1:
            return (ParamTarget(*hit),), node, []
        if isinstance(p, fx.Node) and p.target is aten.add.Tensor and _exclusive(p, {node}):
            w, one = p.args[0], p.args[1]
            hit = _per_channel_param(w, c)
            if hit is not None and one == 1 and len(real_users(w)) == 1:
                return (ParamTarget(*hit, one_plus=True),), node, []
    for i, operand in enumerate((a, b)):
        v = node_val(operand)
        if (isinstance(operand, fx.Node) and v is not None
                and concrete_shape(v) == concrete_shape(node_val(node))):
            found = walk(operand, {node})
            if found is not None:
                targets, head, chain = found
                return targets, head, chain + [(node, i)]
    return None


def _rule_affine(node: fx.Node, walk: Callable) -> Found | None:
    """`x * w + b` (a decomposed LayerNorm's affine part): both w and b absorb."""
    c = node_val(node).shape[-1]
    m, b = node.args[0], node.args[1]
    if not isinstance(m, fx.Node) or m.target is not aten.mul.Tensor or not _exclusive(m, {node}):
        return None
    hb = _per_channel_param(b, c)
    found = _rule_mul(m, lambda *_: None)
    if hb is None or found is None or len(real_users(b)) != 1:
        return None
    return found[0] + (ParamTarget(*hb),), node, []


def _rule_norm(node: fx.Node, walk: Callable) -> Found | None:
    """`aten.layer_norm(x, shape, w, b)` / `aten.rms_norm(x, shape, w)` with an affine weight."""
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if node.target is aten.layer_norm.default and len(node.args) > 3 else None
    c = node_val(node).shape[-1]
    targets = []
    for p in (w, b):
        if p is None:
            continue
        hit = _per_channel_param(p, c)
        if hit is None or len(real_users(p)) != 1:
            return None
        targets.append(ParamTarget(*hit))
    if w is None:
        return None
    return tuple(targets), node, []


def _rule_linear(node: fx.Node, walk: Callable) -> Found | None:
    """The previous linear's output rows (and bias) absorb 1/s, if it owns its weight alone."""
    m = match_linear(node)
    wname = param_name(m.weight)
    if wname is None or len(real_users(m.weight)) != 1:
        return None
    targets = [ParamTarget(wname, 0)]
    if m.bias is not None:
        bname = param_name(m.bias)
        if bname is None or len(real_users(m.bias)) != 1:
            return None
        targets.append(ParamTarget(bname, 0))
    return tuple(targets), node, []


RULES: dict[object, Callable[[fx.Node, Callable], Found | None]] = {
    aten.mul.Tensor: _rule_mul,
    aten.add.Tensor: _rule_affine,
    aten.layer_norm.default: _rule_norm,
    aten.linear.default: _rule_linear,
}
if hasattr(aten, "rms_norm"):
    RULES[aten.rms_norm.default] = _rule_norm


def _walk(node: fx.Node, allowed: set[fx.Node], depth: int = 0) -> Found | None:
    if depth > 32 or node.op != "call_function" or not _exclusive(node, allowed):
        return None
    if node_val(node) is None:
        return None
    rule = RULES.get(node.target)
    if rule is not None:
        return rule(node, lambda n, a: _walk(n, a, depth + 1))
    if node.target in PASS_THROUGH or node.target in VALUE_PATH:
        i = VALUE_PATH.get(node.target, 0)
        src = node.args[i]
        if isinstance(src, fx.Node):
            found = _walk(src, {node}, depth + 1)
            if found is not None:
                targets, head, chain = found
                return targets, head, chain + [(node, i)]
    return None


def find_absorber(x: fx.Node, group: set[fx.Node]) -> Absorber:
    """Decide how the group of linears `group` reading `x` absorbs 1/s (see module docstring)."""
    found = _walk(x, group)
    if found is None:
        return MUL
    targets, head, chain = found
    size = node_val(head).shape[-1]
    cmap = channel_map(head, chain)
    if cmap is None:
        return MUL
    identity = cmap == tuple(range(size))
    return Absorber("params", targets, size, None if identity else cmap)


def channel_map(head: fx.Node, chain: list[Walk]) -> tuple[int, ...] | None:
    """Which head channel each channel of the chain's end reads, by pushing channel ids through
    the chain's ops at their traced shapes. None if channels get mixed."""
    shape = concrete_shape(node_val(head))
    ids = torch.arange(shape[-1]).expand(shape)
    for node, i in chain:
        out = concrete_shape(node_val(node))
        if node.target in VALUE_PATH:
            ids = ids[..., :1, :]
            if ids.dim() >= 3 and len(out) >= 3 and out[-3] != ids.shape[-3]:
                if out[-3] % ids.shape[-3]:
                    return None
                ids = ids.repeat_interleave(out[-3] // ids.shape[-3], dim=-3)
            ids = ids.expand(out)
        elif node.target is aten.mul.Tensor or node.target in PASS_THROUGH and _is_cast(node):
            ids = ids.expand(out)
        else:
            args = [hint(a) for a in node.args]
            args[i] = ids.contiguous()
            ids = node.target(*args, **{k: hint(v) for k, v in node.kwargs.items()})
        if tuple(ids.shape) != out:
            return None
    flat = ids.reshape(-1, ids.shape[-1])
    if not bool((flat == flat[:1]).all()):
        return None
    return tuple(int(v) for v in flat[0])


def _is_cast(node: fx.Node) -> bool:
    return node.target in (
        aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
        aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
        aten.dropout.default,
    )
