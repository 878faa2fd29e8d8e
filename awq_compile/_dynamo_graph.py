"""What the `"awq"` backend does to the graphs dynamo hands it (torch-level FX graphs).

With `inline_inbuilt_nn_modules` (torch's default) a dynamo graph receives the module's
parameters and buffers as placeholders, among the real inputs. Everything here works from the
placeholders' example tensors, which are the module's own tensor objects:

* `TensorNames` names each use of such a tensor by its qualified name in the root module;
  a tensor reachable under several names (tied embeddings) is named after the module whose
  code uses it, read from the node's `nn_module_stack` (keyed by module id).
* `to_attr_graph` turns the parameter placeholders into `get_attr` nodes named by qualified
  name, the form the AWQ passes read (after `awq_compile.api.capture` lowers it to ATen).
* `ServePlan` is the result of a quantization, free of any module: an `Int4Linear` per
  quantized linear and a new tensor per other changed parameter. `rewrite_for_serving`
  applies it to a dynamo graph:

      Matches:   y = torch._C._nn.linear(x, L_..._q_proj_parameters_weight_, None)
      Becomes:   y = awq_int4_model_layers_0_self_attn_q_proj(x)      (an Int4Linear)
      Matches:   n = ... * L_..._input_layernorm_parameters_weight_
      Becomes:   n = ... * awq_tensor_model_layers_0_input_layernorm_weight   (a get_attr)

  The user's module is never touched: its float tensors stay graph inputs, unused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn

from .config import AWQConfig
from .nn import Int4Linear

__all__ = ["TensorNames", "ServePlan", "to_attr_graph", "rewrite_for_serving", "is_linear",
           "float_linears"]

_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR_TARGETS


def _linear_arg(node: fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


class TensorNames:
    """Qualified names of a root module's parameters and buffers, by tensor identity."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.names: dict[int, list[str]] = {}
        for name, t in (*root.named_parameters(remove_duplicate=False),
                        *root.named_buffers(remove_duplicate=False)):
            if t is not None:
                self.names.setdefault(id(t), []).append(name)
        self.modules = {id(m): p for p, m in root.named_modules(remove_duplicate=False)}
        self.saved = set(root.state_dict(keep_vars=True))  # non-persistent buffers are not

    def owns(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.names

    def canonical(self, t: torch.Tensor) -> str:
        return self.names[id(t)][0]

    def aliases(self, t: torch.Tensor) -> list[str]:
        return self.names[id(t)]

    def use_name(self, t: torch.Tensor, user: fx.Node) -> str:
        """The name `user` reads `t` by: with several candidates, the innermost module on the
        node's `nn_module_stack` that holds `t` directly decides (`lm_head.weight`, not
        `model.embed_tokens.weight`, for a tied head)."""
        cands = self.names[id(t)]
        if len(cands) == 1:
            return cands[0]
        stack = user.meta.get("nn_module_stack") or {}
        for key in reversed(list(stack)):
            path = self.modules.get(_as_int(key))
            if path is None:
                continue
            for c in cands:
                if c.rpartition(".")[0] == path:
                    return c
        return cands[0]


def _as_int(key: object) -> int | None:
    try:
        return int(str(key))
    except ValueError:
        return None


def root_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], names: TensorNames):
    """(placeholder, tensor) for each graph input that is a tensor of the root module."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(p, t) for p, t in zip(phs, example_inputs) if names.owns(t)]


def to_attr_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], names: TensorNames
) -> tuple[fx.GraphModule, list[int]]:
    """A copy of `gm` whose root-tensor placeholders are `get_attr` nodes by qualified name
    (one per distinct name used), and the positions of the inputs it still takes."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = []
    first = _first_op(graph)
    back = {new: old for old, new in env.items()}
    for i, (old, t) in enumerate(zip(phs, example_inputs)):
        new = env[old]
        if not names.owns(t):
            keep.append(i)
            continue
        getters: dict[str, fx.Node] = {}
        for user in list(new.users):
            name = names.use_name(t, back.get(user, user))
            if name not in getters:
                with graph.inserting_before(first):
                    getters[name] = graph.get_attr(name)
            user.replace_input_with(new, getters[name])
        graph.erase_node(new)
    return fx.GraphModule(names.root, graph), keep




@dataclass
class ServePlan:
    """A quantization to serve: `linears` by owner path (`model.layers.0.mlp.up_proj`),
    `tensors` (folded norm weights, or a checkpoint's every other tensor) by qualified name."""

    linears: dict[str, Int4Linear] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "calibration"
    strict: bool = False
    """True for a checkpoint: every saved tensor a graph reads must come from the plan."""
    config: AWQConfig | None = None


def rewrite_for_serving(
    gm: fx.GraphModule, example_inputs: Sequence[Any], names: TensorNames, plan: ServePlan
) -> int:
    """Apply `plan` to a dynamo graph (see the module docstring); returns the number of
    linears swapped. Raises on a shape mismatch or, for a strict plan, a tensor it lacks."""
    inputs = dict(root_inputs(gm, example_inputs, names))
    swapped = 0
    for node in list(gm.graph.nodes):
        w = _linear_arg(node, 1, "weight") if is_linear(node) else None
        if w not in inputs:
            continue
        path, _, leaf = names.use_name(inputs[w], node).rpartition(".")
        if leaf == "weight" and path in plan.linears:
            _swap_linear(gm, node, path, plan.linears[path], inputs[w])
            swapped += 1
    missing = []
    consts: dict[str, fx.Node] = {}
    for ph, t in inputs.items():
        for user in list(ph.users):
            name = names.use_name(t, user)
            key = next((a for a in [name, *names.aliases(t)] if a in plan.tensors), None)
            if key is None:
                if any(a in names.saved for a in names.aliases(t)):
                    missing.append(name)
                continue
            if key not in consts:
                consts[key] = _const(gm, key, plan.tensors[key], t)
            user.replace_input_with(ph, consts[key])
    if missing and plan.strict:
        raise ValueError(
            f"awq backend: the {plan.source} has no tensor for {_few(sorted(set(missing)))}, "
            "which the model reads: does it match the model?"
        )
    gm.graph.lint()
    gm.recompile()
    _name_new_tensors(gm)
    return swapped


def _name_new_tensors(gm: fx.GraphModule) -> None:
    """AOT autograd lifts a dynamo graph's own parameters and buffers to inputs and looks each
    up in `gm._param_name_to_source` (the guard source dynamo recorded). The INT4 tensors are
    constants of the compiled graph, so each gets a constant source of its own name."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    table = dict(table)
    for name, _ in (*gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False)):
        table.setdefault(name, ConstantSource(f"__awq_{name}"))
    gm._param_name_to_source = table


def _swap_linear(gm: fx.GraphModule, node: fx.Node, path: str, mod: Int4Linear,
                 w: torch.Tensor) -> None:
    if (mod.out_features, mod.in_features) != tuple(w.shape):
        raise ValueError(
            f"awq backend: {path} is [{mod.out_features}, {mod.in_features}] in the quantized "
            f"plan but its weight is {list(w.shape)} in the model: does it match the model?"
        )
    target = "awq_int4_" + path.replace(".", "_")
    if not hasattr(gm, target):
        gm.add_submodule(target, mod.to(w.device))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (node.args[0] if node.args else node.kwargs["input"],))
    new.meta.update({k: v for k, v in node.meta.items() if k != "grapharg"})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _const(gm: fx.GraphModule, name: str, value: torch.Tensor, like: torch.Tensor) -> fx.Node:
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"awq backend: {name} is {list(value.shape)} in the quantized plan but "
            f"{list(like.shape)} in the model: does it match the model?"
        )
    if value.is_floating_point() and like.is_floating_point():
        value = value.to(like.dtype)
    target = "awq_tensor_" + name.replace(".", "_") + "_" + like.device.type
    if not hasattr(gm, target):
        gm.register_buffer(target, value.to(like.device))
    with gm.graph.inserting_before(_first_op(gm.graph)):
        return gm.graph.get_attr(target)


def _first_op(graph: fx.Graph) -> fx.Node:
    """Where new get_attr nodes go: after every placeholder."""
    return next(n for n in graph.nodes if n.op != "placeholder")


def float_linears(gm: fx.GraphModule, example_inputs: Sequence[Any],
                  names: TensorNames | None, skip: tuple[str, ...]) -> list[str]:
    """Names of the linears in `gm` that read a module weight and are not in `skip`: what a
    plan should have quantized."""
    found = []
    phs = {n: t for n, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                example_inputs)}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        w = _linear_arg(node, 1, "weight")
        t = phs.get(w)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            continue
        if names is not None and names.owns(t):
            owner = names.use_name(t, node).rpartition(".")[0]
        else:
            owner = _stack_path(node) or w.name
        if not any(owner == s or owner.endswith("." + s) for s in skip):
            found.append(owner)
    return found


def _stack_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path).split(".", 1)[-1] if "." in str(path) else None


def _few(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def warn_unplanned(linears: list[str], source: str) -> None:
    if linears:
        warnings.warn(
            f"awq backend: {len(linears)} linear layer(s) are not in the {source} and stay in "
            f"floating point: {_few(linears)}", stacklevel=3,
        )
