"""Flow 1 of the `"awq"` backend: calibrate on the graphs dynamo produces, then serve INT4.
(`calibration` is public as `awq_compile.calibration` and `awq_compile.backend.calibration`.)

    compiled = torch.compile(model, backend="awq", options={"group_size": 64})
    with awq_compile.calibration(compiled) as calib:
        for batch in batches:
            compiled(batch)               # float outputs; observers record activations
    compiled(ids)                         # INT4 from here on (inductor-compiled)
    calib.save("smollm2-awq", tokenizer)  # optional: a checkpoint for options={"checkpoint": ...}

While calibrating, each dynamo graph is lowered to ATen with its parameters as `get_attr` nodes
and run eagerly with the observers of `awq_compile.passes` in it. Observers are shared by
group identity (`awq_compile._plan.assign_keys`), so a frame's recompiles for other shapes feed
the same statistics. On exit the passes after `calibrate` in `passes.PIPELINE` run (scale search,
folding, clip search), `awq_compile.api.apply_plan` (the function `quantize` uses) turns the
result into Int4Linear modules held apart from the user's model, and dynamo's cache for the
model's code is dropped so the next call recompiles into the serving graph.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any, Sequence

import torch
from torch import fx, nn

from . import passes as P
from ._dynamo_graph import ServePlan, TensorNames, to_attr_graph
from ._plan import assign_keys, collect, key, resolve_conflicts, set_tensor, shadow_plan
from .api import capture, pipeline_steps
from .config import AWQConfig

__all__ = ["calibration", "Calibration", "model_state", "find_state", "root_module"]

_CALIBRATE = P.PIPELINE.index("calibrate")
_BEFORE = P.PIPELINE[:_CALIBRATE]
_AFTER = tuple(s for s in P.PIPELINE[_CALIBRATE + 1:] if s != "swap_linear_int4")
"""Steps run while graphs are compiled, and at the end; the module swap is apply_plan's."""


class ModelState:
    """What the backend remembers about one root module (weakly: it dies with the module)."""

    def __init__(self, root: nn.Module) -> None:
        self._root = weakref.ref(root)
        self.codes: set = set()  # code objects dynamo compiled for this model
        self.plan: ServePlan | None = None
        self.config: AWQConfig | None = None
        self.active: Calibration | None = None
        self.checkpoint_plans: dict = {}

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:
            raise RuntimeError("awq backend: the model was garbage-collected")
        return root

    def drop_compiled(self) -> None:
        """Make dynamo recompile this model's code at its next call."""
        for code in list(self.codes):
            torch._dynamo.reset_code(code)
        self.codes.clear()


_STATES: "weakref.WeakKeyDictionary[nn.Module, ModelState]" = weakref.WeakKeyDictionary()


def model_state(root: nn.Module) -> ModelState:
    state = _STATES.get(root)
    if state is None:
        state = _STATES[root] = ModelState(root)
    return state


def find_state(example_inputs: Sequence[Any]) -> ModelState | None:
    """The state of a known model owning any of these tensors (graphs after a graph break in a
    submodule still map to the whole model)."""
    ids = {id(t) for t in example_inputs if isinstance(t, torch.Tensor)}
    for root, state in list(_STATES.items()):
        if any(id(t) in ids for t in (*root.parameters(), *root.buffers())):
            return state
    return None


def root_module(target: Any) -> nn.Module:
    """The nn.Module behind what torch.compile returned: an OptimizedModule, a module
    compiled with `module.compile()`, or a compiled bound method (`model.forward`)."""
    mod = getattr(target, "_orig_mod", None)
    if isinstance(mod, nn.Module):
        return mod
    if isinstance(target, nn.Module):
        return target
    orig = getattr(target, "_torchdynamo_orig_callable", None)
    owner = getattr(orig, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    raise TypeError(
        "awq_compile.calibration: expected what torch.compile(model, backend='awq') returned "
        f"(or a module compiled with model.compile(backend='awq')), got {type(target).__name__}"
    )


class Calibration:
    """The calibration context of one model; see the module docstring. After the block:
    `plan` (the INT4 layers and folded tensors served), `quantized_model()`, `save()`."""

    def __init__(self, model: Any, n_batches: int | None = None) -> None:
        if n_batches is not None and (not isinstance(n_batches, int) or n_batches <= 0):
            raise ValueError(f"awq_compile.calibration: n_batches={n_batches!r} must be a positive int")
        _check_backend(model)
        self.state = model_state(root_module(model))
        self.n_batches = n_batches or 1
        self.config: AWQConfig | None = None
        self.graphs: list[_CalibratedGraph] = []
        self.observers: dict[tuple, P.GroupObserver] = {}
        self.plan: ServePlan | None = None
        self.stats: dict[str, int] = {}

    def __enter__(self) -> "Calibration":
        if self.state.active is not None:
            raise RuntimeError("awq_compile.calibration: this model is already being calibrated")
        self.state.drop_compiled()
        self.state.plan = None
        self.state.active = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.state.active = None
        try:
            if exc_type is None:
                self.plan = self._finish()
                self.state.plan, self.state.config = self.plan, self.config
        finally:
            for cg in self.graphs:
                cg.release()
            self.graphs.clear()
            self.observers.clear()
            self.state.drop_compiled()

    def graph(self, gm: fx.GraphModule, example_inputs: Sequence[Any], config: AWQConfig,
              code: Any = None):
        """The callable the backend returns for a graph compiled during calibration."""
        if self.config is None:
            self.config = config
        elif config != self.config:
            raise ValueError(
                f"awq backend: two graphs of one calibration have different options "
                f"({self.config} vs {config})"
            )
        cg = _CalibratedGraph(self, gm, example_inputs, code if code is not None else object())
        self.graphs.append(cg)
        return cg

    def _finish(self) -> ServePlan:
        exports = [e for cg in self.graphs for e in cg.exports.values()]
        if not any(o.tokens for o in self.observers.values()):
            raise RuntimeError(
                "awq_compile.calibration: no calibration data reached a linear layer; call the "
                "compiled model on calibration batches inside the `with` block"
            )
        unique, covered = [], set()
        for ep, obs in exports:  # recompiles and re-exports of one graph add no new group
            keys = {key(ep, g) for g in P.scale_groups(ep)}
            if keys - covered:
                unique.append((ep, obs))
                covered |= keys
        root = self.state.root
        names = TensorNames(root)
        resolve_conflicts([ep for ep, _ in unique], names)
        groups: list[P.ScaleGroup] = []
        infos: list[P.LinearInfo] = []
        done: set[tuple] = set()
        with torch.no_grad():
            for ep, obs in unique:
                steps = pipeline_steps(ep, obs, self.config, 1)
                for name in _AFTER:
                    self.stats[name] = self.stats.get(name, 0) + int(steps[name]() or 0)
                collect(ep, done, groups, infos)
            plan = shadow_plan(root, groups, infos, self.config)
        torch._dynamo.utils.counters["awq"]["quantize"] += 1
        self.stats["linears"] = len(plan.linears)
        unseen = [p for p, m in root.named_modules() if isinstance(m, nn.Linear)
                  and p not in plan.linears and not _skipped(p, self.config.skip)]
        if unseen:
            warnings.warn(
                f"awq_compile.calibration: {len(unseen)} linear layer(s) never ran inside a "
                f"compiled graph while calibrating and stay in floating point: {unseen[:5]}"
                f"{' ...' if len(unseen) > 5 else ''} (code dynamo ran eagerly, e.g. a frame it "
                "skipped after a graph break, is not quantized)", stacklevel=3,
            )
        return plan

    def quantized_model(self) -> nn.Module:
        """A copy of the model with the plan applied: what `awq_compile.quantize` returns
        (Int4Linear modules, folded norms, `awq_config`); its Int4Linear modules are the ones
        the compiled graphs serve (shared, not copied)."""
        if self.plan is None:
            raise RuntimeError("awq_compile.calibration: no plan yet (leave the `with` block first)")
        root = self.state.root
        skip = {id(m) for p, m in root.named_modules() if p in self.plan.linears}
        memo = {id(t): None for m in root.modules() if id(m) in skip for t in m.parameters()}
        target = copy.deepcopy(root, memo)  # the swapped linears' float weights are not copied
        target.__dict__.pop("_compiled_call_impl", None)
        for path, mod in self.plan.linears.items():
            parent, _, child = path.rpartition(".")
            setattr(target.get_submodule(parent), child, mod)
        for name, t in self.plan.tensors.items():
            set_tensor(target, name, t)
        target.awq_config = self.config
        return target

    def save(self, path, tokenizer=None, **kwargs) -> Any:
        """`awq_compile.checkpoint.save_quantized(self.quantized_model(), path, ...)`: a
        checkpoint to serve later with `options={"checkpoint": path}`."""
        from .checkpoint import save_quantized

        return save_quantized(self.quantized_model(), path, tokenizer, **kwargs)


def calibration(model: Any, *, n_batches: int | None = None) -> Calibration:
    """Calibrate a model compiled with `backend="awq"`: a context manager; every call of the
    compiled model inside the block is a calibration batch. On exit the AWQ search runs once
    and the compiled model serves INT4 from its next call. The user's model is not changed.

    n_batches: how many batches will come (optional). The scale search keeps at most
    `max_search_tokens` token rows per group, `ceil(max_search_tokens / n_batches)` from each
    batch, as `awq_compile.quantize` does; without it rows are taken from the first batches.

    >>> compiled = torch.compile(model, backend="awq")             # doctest: +SKIP
    >>> with awq_compile.calibration(compiled):                      # doctest: +SKIP
    ...     for ids in batches: compiled(ids)
    """
    return Calibration(model, n_batches)


def _skipped(path: str, skip: tuple[str, ...]) -> bool:
    return any(path == s or path.endswith("." + s) for s in skip)


class _CalibratedGraph:
    """One dynamo graph while calibrating: runs its ATen form (one export per input shape)
    with shared observers; after calibration (should dynamo still call it) the INT4 graph."""

    def __init__(self, calib: Calibration, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 code: Any):
        self.calib = calib
        self.code = code
        self.gm = gm
        names = TensorNames(calib.state.root)
        self.attr_gm, self.keep = to_attr_graph(gm, example_inputs, names)
        self.exports: dict[tuple, tuple[fx.GraphModule, dict[int, P.GroupObserver]]] = {}
        self.served = None

    def __call__(self, *args: Any) -> Any:
        if self.calib.state.active is not self.calib:
            return self._serve(*args)
        user = [args[i] for i in self.keep]
        sig = _signature(user)
        if sig not in self.exports:
            self.exports[sig] = self._export(user)
        with torch.no_grad():
            return self.exports[sig][0](*user)

    def _export(self, user: list[Any]):
        cfg = self.calib.config
        with torch.no_grad():
            ep = capture(self.attr_gm, (tuple(user), {}))
        observers: dict[int, P.GroupObserver] = {}
        steps = pipeline_steps(ep, observers, cfg, self.calib.n_batches)
        for name in _BEFORE:
            steps[name]()
        assign_keys(ep, self.code)
        for node in ep.graph.nodes:
            mod = ep.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(mod, P.GroupObserver):
                shared = self.calib.observers.setdefault(key(ep, mod.group), mod)
                ep.add_submodule(node.target, shared)
                observers[mod.group.index] = shared
        return ep, observers

    def release(self) -> None:
        """Drop the calibration-time exports and observers (their memory)."""
        self.exports.clear()
        self.attr_gm = None

    def _serve(self, *args: Any) -> Any:
        from .backend import serve_graph  # the serving half lives with the backend

        if self.served is None:
            self.served = serve_graph(self.calib.state, self.gm, list(args), inductor=False)
        return self.served(*args)


def _check_backend(target: Any) -> None:
    """Fail early on an OptimizedModule compiled with another backend or bad options (for other
    targets the backend checks its options at the first compiled call)."""
    obj = getattr(getattr(target, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if obj is None or hasattr(obj, "compiler_name") and hasattr(obj, "kwargs"):
            break
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
    if obj is None or not hasattr(obj, "kwargs"):
        return
    from .backend import awq_backend, parse_options

    if obj.compiler_name != "awq" and getattr(obj, "compiler_fn", None) is not awq_backend:
        raise ValueError(
            f"awq_compile.calibration: the model was compiled with backend={obj.compiler_name!r}; "
            "use torch.compile(model, backend='awq')"
        )
    parse_options(obj.kwargs.get("options"))


def _signature(values: list[Any]) -> tuple:
    return tuple((tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else v
                 for v in values)
