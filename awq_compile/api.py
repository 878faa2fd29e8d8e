"""`awq_compile.quantize`: capture, run the pass pipeline, return an INT4 model."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from . import passes as P
from .config import AWQConfig
from .nn import Int4Linear
from .passes._graph import fetch_attr
from .passes.fold_scales import fold_group_tensors, inverse_input_scale

__all__ = ["quantize", "quantize_rtn", "capture", "pipeline_steps", "run_pipeline", "apply_plan",
           "prepare_batches", "Batch"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]


def quantize(
    model: nn.Module,
    calibration: Any,
    config: AWQConfig | None = None,
    *,
    inplace: bool = False,
    output: str = "module",
    batch_size: int = 8,
    progress: bool = False,
    device: torch.device | str | None = None,
    stream: bool | None = None,
) -> nn.Module:
    """Quantize `model`'s linear layers to INT4 with AWQ.

    calibration: a LongTensor [n, seq] of token ids (split into batches of up to
    `batch_size`), or a list of batches, each a tensor (the model's first argument), a tuple
    of positional arguments or a dict of keyword arguments; all batches of one shape.

    output="module" (default) returns the model (a deep copy unless `inplace`) with each
    quantized nn.Linear replaced by an `Int4Linear` and AWQ's scales folded into its
    parameters: Hugging Face models keep `generate`, `save_pretrained`-style names, etc.
    output="graph" returns the captured `torch.fx.GraphModule` with `awq.int4_linear` ops; it
    also covers functional `F.linear` calls, which have no module to swap.

    device: where calibration, search and quantization compute (default: the model's device).
    If it differs from where the weights are (a model kept on the CPU, device="cuda"), weights
    are streamed: each is copied to `device` when the graph reads it and freed after its last
    use, so device memory holds one batch's activations and a few weights, never the model.
    `stream` forces that mode on or off (default: on exactly when the devices differ).

    >>> qmodel = quantize(model, calibration=ids, config=AWQConfig(group_size=64))  # doctest: +SKIP
    """
    config = config or AWQConfig()
    if not isinstance(config, AWQConfig):
        raise TypeError(f"quantize: config must be an AWQConfig, got {type(config).__name__}")
    if output not in ("module", "graph"):
        raise ValueError(f"quantize: output={output!r}; choose 'module' or 'graph'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"quantize: batch_size={batch_size!r}: must be a positive integer")
    _check_parameters(model)
    home = _device_of(model)
    device = torch.device(device) if device is not None else home
    stream = device != home if stream is None else stream
    batches = prepare_batches(calibration, batch_size, home)
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    target.eval()
    with torch.no_grad():
        gm = capture(target, batches[0], dynamic=output == "graph")
        run_pipeline(gm, lambda g: _calibrate(g, batches, progress, device if stream else None),
                     config, len(batches), progress,
                     stop_before=None if output == "graph" else "swap_linear_int4",
                     device=device)
        if output == "graph":
            gm.awq_config = config
            return gm
        apply_plan(target, P.scale_groups(gm), [i for _, i in P.linear_infos(gm)], config,
                   device=device)
    target.train(was_training)
    target.awq_config = config
    return target


def quantize_rtn(model: nn.Module, config: AWQConfig | None = None) -> nn.Module:
    """Round-to-nearest baseline: every nn.Linear outside `config.skip` quantized as it is
    (no scales, no clipping), into a copy of `model`. Same format and op as `quantize`."""
    config = config or AWQConfig()
    target = copy.deepcopy(model)
    names = [n for n, m in target.named_modules() if isinstance(m, nn.Linear)
             and not any(n == s or n.endswith("." + s) for s in config.skip)]
    if not names:
        raise ValueError("quantize_rtn: the model has no nn.Linear layers to quantize")
    for name in names:
        lin = target.get_submodule(name)
        info = P.LinearInfo(name + ".weight", None, 0, lin.out_features, lin.in_features, False)
        qw = P.quantize_linear(lin.weight.detach(), info, config)
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent), child,
                Int4Linear.from_quantized(qw, config.group_size, lin.bias).to(lin.weight.device))
    target.awq_config = config
    return target


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_parameters(model: nn.Module) -> None:
    """Refuse, naming it, a parameter of a dtype we cannot quantize from or with NaN/Inf."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.dtype not in _FLOATS:
            raise ValueError(
                f"quantize: parameter {name} has dtype {p.dtype}; supported model dtypes are "
                "float32, float16, bfloat16 (and float64)"
            )
        if p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            raise ValueError(f"quantize: parameter {name} contains NaN or Inf")


def capture(model: nn.Module, batch: Batch, dynamic: bool = False) -> fx.GraphModule:
    """The model as an ATen-level GraphModule (torch.export of `batch`'s shapes; with
    `dynamic`, every tensor dimension may vary where the model allows it).

    Parameters become `get_attr` nodes named by their qualified names; the passes rely on it.
    """
    args, kwargs = batch
    kwargs = dict(kwargs)
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # a KV cache object is no tensor output to trace
    dyn = None
    if dynamic:
        def auto(v):
            return {d: torch.export.Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) else None
        dyn = _dynamic_spec(model, args, kwargs, auto)
    try:
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    except Exception as e:
        raise RuntimeError(
            f"quantize: could not capture the model (torch.export) on calibration batch 0: "
            f"{type(e).__name__}: {e}"
        ) from e
    gm = ep.module()
    gm.awq_capture_kwargs = {k: v for k, v in kwargs.items() if k == "use_cache"}
    return gm


def _dynamic_spec(model, args, kwargs, auto):
    """dynamic_shapes keyed by the forward's parameter names, as torch.export wants them."""
    names = list(inspect.signature(model.forward).parameters)
    spec = {names[i]: auto(a) for i, a in enumerate(args)}
    spec.update({k: auto(v) for k, v in kwargs.items()})
    return spec


def pipeline_steps(
    gm: fx.GraphModule,
    observers: dict[int, P.GroupObserver],
    config: AWQConfig,
    n_batches: int,
    calibrate: Callable[[fx.GraphModule], Any] | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Callable[[], Any]]:
    """Each step of `passes.PIPELINE`, by name, as a callable over `gm`; the observers that
    insert_observers makes land in `observers`. Each returns its count (for stats)."""
    def observe() -> int:
        observers.update(P.insert_observers(gm, config.max_search_tokens, n_batches, config.seed))
        return len(observers)

    return {
        "annotate_scale_groups": lambda: len(P.linear_infos(P.annotate_scale_groups(gm, config.skip))),
        "insert_observers": observe,
        "calibrate": lambda: calibrate(gm) if calibrate is not None else 0,
        "remove_observers": lambda: P.remove_observers(gm),
        "search_scales": lambda: P.search_scales(gm, observers, config, progress, device),
        "fold_scales": lambda: P.fold_scales(gm),
        "search_clip": lambda: (P.search_clip(gm, observers, config, progress, device)
                                if config.clip else 0),
        "swap_linear_int4": lambda: P.swap_linear_int4(gm, config),
    }


def run_pipeline(
    gm: fx.GraphModule,
    calibrate: Callable[[fx.GraphModule], None],
    config: AWQConfig,
    n_batches: int,
    progress: bool = False,
    stop_before: str | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run `passes.PIPELINE` on `gm` in order (up to `stop_before`); returns each step's count."""
    steps = pipeline_steps(gm, {}, config, n_batches, calibrate, progress, device)
    stats = {}
    for name in P.PIPELINE:
        if name == stop_before:
            break
        stats[name] = steps[name]()
        if name == "annotate_scale_groups" and stats[name] == 0:
            raise ValueError(
                "quantize: the model has no linear layers to quantize "
                f"(found none outside AWQConfig.skip={list(config.skip)})"
            )
    return stats


def apply_plan(
    model: nn.Module, groups: Iterable[P.ScaleGroup], infos: Iterable[P.LinearInfo],
    config: AWQConfig, device: torch.device | str | None = None,
) -> int:
    """Fold searched scales into `model`'s parameters and swap its nn.Linear modules for
    Int4Linear, following the plan the passes wrote; returns the number swapped. Each weight
    is quantized once, on `device` (default: where it is), at its first call site's clip
    range; every nn.Linear holding it (tied modules too) gets an Int4Linear over the same
    packed tensors. Nothing is changed before the whole plan is known to apply."""
    groups = list(groups)
    owners: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Linear):
            owners.setdefault(id(mod.weight), []).append(path)
    todo: dict[str, tuple[P.LinearInfo, list[str]]] = {}
    for info in infos:
        if info.weight in todo:
            continue  # one weight at several call sites: quantized at its first
        paths = owners.get(id(fetch_attr(model, info.weight)))
        if not paths:
            raise ValueError(
                f"quantize: {info.weight} is used by a functional linear, not an nn.Linear "
                "module; use quantize(..., output='graph') for such models"
            )
        todo[info.weight] = (info, paths)
    for g in groups:
        if g.scale is not None:
            fold_group_tensors(model, g)
    inv = {g.index: inverse_input_scale(g) for g in groups
           if g.scale is not None and g.searchable and g.absorber.kind == "mul"}
    swapped = 0
    for name, (info, paths) in todo.items():
        w = fetch_attr(model, name).detach()
        qw = P.quantize_linear(w.to(device), info, config)
        for path in paths:
            owner = model.get_submodule(path)
            new = Int4Linear.from_quantized(qw, config.group_size, owner.bias, inv.get(info.group))
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, new.to(owner.weight.device))
            swapped += 1
    return swapped


def prepare_batches(calibration: Any, batch_size: int, device: torch.device) -> list[Batch]:
    """Normalise calibration data to a list of (args, kwargs) of one shape, on `device`."""
    if calibration is None:
        raise ValueError("quantize: calibration data is required (got None)")
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() < 2 or calibration.shape[0] == 0 or calibration.numel() == 0:
            raise ValueError(
                "quantize: a calibration tensor must be [n_samples, seq_len] with n_samples > 0, "
                f"got shape {tuple(calibration.shape)}"
            )
        n = calibration.shape[0]
        bs = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
        items: list[Any] = list(calibration.split(bs))
    else:
        try:
            items = list(calibration)
        except TypeError:
            raise TypeError(
                "quantize: calibration must be a tensor or an iterable of batches, got "
                f"{type(calibration).__name__}"
            ) from None
    if not items:
        raise ValueError("quantize: calibration data is empty")
    batches = [_as_batch(item, i, device) for i, item in enumerate(items)]
    first = _shapes(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if _shapes(b) != first:
            raise ValueError(
                f"quantize: calibration batch {i} has shapes {_shapes(b)}, batch 0 has {first}; "
                "all batches must share one shape (cut the text into fixed-length windows, e.g. "
                "with awq_compile.calib.sample_calibration)"
            )
    return batches


def _as_batch(item: Any, i: int, device: torch.device) -> Batch:
    def move(v):
        if isinstance(v, torch.Tensor):
            if v.numel() == 0:
                raise ValueError(f"quantize: calibration batch {i} is empty")
            return v.to(device)
        return v

    if isinstance(item, torch.Tensor):
        return (move(item),), {}
    if isinstance(item, dict):
        return (), {k: move(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)) and item:
        return tuple(move(v) for v in item), {}
    raise TypeError(
        f"quantize: calibration batch {i} must be a tensor, a tuple of arguments or a dict of "
        f"keyword arguments, got {type(item).__name__}"
    )


def _shapes(b: Batch) -> tuple:
    args, kwargs = b
    return tuple(
        tuple(v.shape) if isinstance(v, torch.Tensor) else None
        for v in (*args, *[kwargs[k] for k in sorted(kwargs)])
    )


def _calibrate(gm: fx.GraphModule, batches: list[Batch], progress: bool,
               stream_to: torch.device | None = None) -> int:
    extra = getattr(gm, "awq_capture_kwargs", {})
    it: Iterable[Batch] = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="calibrate", unit="batch")
    for i, (args, kwargs) in enumerate(it):
        kw = {**extra, **kwargs}
        try:
            if stream_to is None:
                gm(*args, **kw)
            else:
                _StreamingRunner(gm, stream_to).run(*args, *[kw[k] for k in _kwarg_order(gm, kw)])
        except ValueError:
            raise  # our own checks (NaN/Inf activations) say what went wrong already
        except Exception as e:
            raise RuntimeError(
                f"quantize: the model failed on calibration batch {i}: {type(e).__name__}: {e}"
            ) from e
    return len(batches)


def _kwarg_order(gm: fx.GraphModule, kwargs: dict[str, Any]) -> list[str]:
    """Keyword inputs in the order of the graph's placeholders after the positional ones."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return [n for n in names if n in kwargs]


class _StreamingRunner(fx.Interpreter):
    """Runs the captured graph on `device` while its weights stay where they are: a weight is
    copied over only as an argument of the op that reads it, so the copy dies with that op
    (an unlifted export graph reads every parameter at its top: moving them there would hold the
    whole model on the device). Devices baked into the graph at capture
    (arange(..., device=cpu)) are redirected."""

    def __init__(self, gm: fx.GraphModule, device: torch.device) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.device = device

    def _move(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v if v.device == self.device else v.to(self.device, non_blocking=True)
        if isinstance(v, torch.device):
            return self.device
        return v

    def placeholder(self, target, args, kwargs):
        return self._move(super().placeholder(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        args, kwargs = pytree.tree_map(self._move, (args, kwargs))
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        args, kwargs = pytree.tree_map(self._move, (args, kwargs))
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        if target == "_guards_fn":  # export's input-shape guards, checked at capture already
            return None
        args, kwargs = pytree.tree_map(self._move, (args, kwargs))
        return super().call_module(target, args, kwargs)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
