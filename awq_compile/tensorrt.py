"""TensorRT engines from INT4 models.

TensorRT's INT4 path is weight-only and symmetric: `IDequantizeLayer` takes signed int4 weights,
a build-time scale per block and no zero point (or an all-zero one). Two routes:

    route="qdq" (default): the model -> signed QDQ ONNX (`to_onnx(format="qdq", signed=True)`)
        -> TensorRT's ONNX parser -> a strongly typed engine (the ONNX dtypes decide precision).
        Per layer (OnnxExport.routes):
          symmetric config, or every group with -8 <= q - z <= 7   "qdq_int4": exact, INT4 only
          any other asymmetric group      "qdq_int4+zp_correction": q - 8 as INT4 plus the exact
                                          rank-(K/g) correction (8 - z) s (see onnx_export)
        zero_point_correction=False refuses the second case instead, naming the layers.
    route="plugin": Torch-TensorRT compiles the exported program and runs `awq.int4_linear` as a
        TensorRT plugin that calls the op itself, so our CUDA kernel with the asymmetric formula
        as it is (Torch-TensorRT >= 2.6 with TensorRT >= 10.7 generates the plugin from the
        op's schema and fake impl); where that generator is missing, the op runs in PyTorch
        between TensorRT subgraphs (`TensorRTBuild.route` says which).

Not run here: TensorRT and Torch-TensorRT need an NVIDIA GPU and were not installable on the
machines this was written on. Everything up to the builder is tested (the QDQ ONNX is validated
in ONNX Runtime); the builder calls follow the TensorRT 10 Python API (docs/export.md).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .export import INT4_OP, export
from .onnx_export import OnnxExport, OnnxFormat, _build, _check_target, _save

__all__ = ["to_tensorrt", "tensorrt_onnx", "check_tensorrt_onnx", "TensorRTBuild"]

_ROUTES = ("qdq", "plugin")
_TRT_HINT = (
    "pip install tensorrt (TensorRT >= 10, an NVIDIA GPU and driver). Without it, write the "
    "engine's input with awq_compile.to_onnx(model, 'model.onnx', 'qdq', signed=True, args=...) "
    "and build it where TensorRT is installed: trtexec --onnx=model.onnx --stronglyTyped"
)
_TORCH_TRT_HINT = "pip install torch-tensorrt (matching your torch version; needs TensorRT and a GPU)"


@dataclass(frozen=True)
class TensorRTBuild:
    """What `to_tensorrt` built."""

    engine_path: Path
    route: str
    """"qdq", "plugin" (awq.int4_linear as a TensorRT plugin) or "plugin:pytorch_fallback"."""
    onnx: OnnxExport | None = None
    layers: dict[str, str] = field(default_factory=dict)
    """layer -> "qdq_int4" | "qdq_int4+zp_correction" (route "qdq")."""


def tensorrt_onnx(
    program_or_model: torch.export.ExportedProgram | nn.Module,
    path: str | os.PathLike,
    *,
    args: Sequence[Any] | None = None,
    dtype: torch.dtype | None = torch.float16,
    zero_point_correction: bool = True,
    overwrite: bool = False,
) -> OnnxExport:
    """Write the QDQ ONNX TensorRT builds from: signed int4, no zero points, in `dtype`
    (a model is converted to it first; None keeps its dtype; a program keeps its own).

    Raises, writing nothing, if a layer needs the zero-point correction and
    `zero_point_correction` is False.
    """
    fmt = _check_target(path, OnnxFormat.QDQ, True, 21, overwrite)
    if isinstance(program_or_model, nn.Module) and dtype is not None:
        program_or_model = copy.deepcopy(program_or_model).to(dtype)
    model, routes = _build(program_or_model, fmt, args, None, True, 0, 21)
    corrected = sorted(k for k, v in routes.items() if v == "qdq_int4+zp_correction")
    if corrected and not zero_point_correction:
        raise ValueError(
            f"tensorrt_onnx: {len(corrected)} asymmetric layers have groups with q - z outside "
            f"[-8, 7] (first: {corrected[:3]}), which TensorRT's zero-point-free INT4 cannot hold "
            "as is. Use zero_point_correction=True (exact, adds a rank-K/g GEMM per layer), "
            "route='plugin' (our CUDA kernel inside the engine), or quantize symmetrically "
            "(AWQConfig(zero_point=False))"
        )
    return _save(model, Path(path), fmt, routes, None)


def check_tensorrt_onnx(path: str | os.PathLike) -> list[str]:
    """Reasons TensorRT's INT4 path would reject an ONNX file (empty list: none found):
    DequantizeLinear inputs must be int4/int8 constants with no non-zero zero point."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name}: {node.domain}::{node.op_type} is not a standard op")
        if node.op_type != "DequantizeLinear":
            continue
        w = inits.get(node.input[0])
        if w is None or w.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.INT8):
            problems.append(f"{node.name}: quantized input must be an int4/int8 initializer")
        if len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None or (zp.data_location != onnx.TensorProto.EXTERNAL
                              and numpy_helper.to_array(zp).any()):
                problems.append(f"{node.name}: zero point must be absent or all zeros")
    return problems


def to_tensorrt(
    source: torch.export.ExportedProgram | nn.Module | str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    args: Sequence[Any] | None = None,
    route: str = "qdq",
    dtype: torch.dtype = torch.float16,
    zero_point_correction: bool = True,
    seq_range: tuple[int, int, int] = (1, 128, 2048),
    workspace_bytes: int = 4 << 30,
    onnx_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> TensorRTBuild:
    """Build a TensorRT engine from a quantized model, its exported program or a QDQ ONNX file.

    `seq_range` = (min, opt, max) of every dynamic input dimension (the sequence length).
    route="qdq" writes the QDQ ONNX to `onnx_path` (default: the engine path with suffix .onnx)
    and builds a strongly typed engine; route="plugin" compiles with Torch-TensorRT. Existing
    files are an error unless `overwrite`.

    >>> build = to_tensorrt(qmodel, "model.engine", args=(ids,))  # doctest: +SKIP
    >>> build.layers["model.model.layers.0.mlp.down_proj"]  # doctest: +SKIP
    'qdq_int4'
    """
    if route not in _ROUTES:
        raise ValueError(f"to_tensorrt: route={route!r}; choose one of {list(_ROUTES)}")
    engine_path = Path(engine_path)
    if engine_path.exists() and not overwrite:
        raise FileExistsError(f"to_tensorrt: {engine_path} exists; pass overwrite=True to replace it")
    if route == "plugin":
        return _build_plugin(source, engine_path, args, dtype, seq_range)
    trt = _import("tensorrt", _TRT_HINT)  # fail before the slow export
    if isinstance(source, (str, os.PathLike)):
        out, onnx_file = None, Path(source)
    else:
        onnx_file = Path(onnx_path) if onnx_path else engine_path.with_suffix(".onnx")
        out = tensorrt_onnx(source, onnx_file, args=args, dtype=dtype,
                            zero_point_correction=zero_point_correction, overwrite=overwrite)
    problems = check_tensorrt_onnx(onnx_file)
    if problems:
        raise ValueError(f"to_tensorrt: {onnx_file} is not TensorRT's INT4 form: {problems[:5]}")
    engine = _build_engine(trt, onnx_file, seq_range, workspace_bytes)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(engine)
    return TensorRTBuild(engine_path, "qdq", out, dict(out.routes) if out else {})


def _build_engine(trt, onnx_file: Path, seq_range, workspace_bytes: int) -> bytes:
    """ONNX -> serialized engine with the TensorRT Python API (strongly typed network)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"to_tensorrt: TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shapes = [tuple(seq if d < 0 else d for d in inp.shape) for seq in seq_range]
        profile.set_shape(inp.name, *shapes)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"to_tensorrt: TensorRT failed to build an engine from {onnx_file}")
    return bytes(engine)


def _build_plugin(source, engine_path: Path, args, dtype, seq_range) -> TensorRTBuild:
    """Torch-TensorRT with awq.int4_linear as a plugin (falls back to PyTorch execution of the
    op where the plugin generator is unavailable)."""
    torch_trt = _import("torch_tensorrt", _TORCH_TRT_HINT)
    if isinstance(source, (str, os.PathLike)):
        raise ValueError("to_tensorrt: route='plugin' needs the model or its exported program")
    if args is None:
        raise ValueError("to_tensorrt: route='plugin' needs example inputs: args=(...)")
    if isinstance(source, nn.Module):
        source = export(copy.deepcopy(source).to(dtype).cuda(), [a.cuda() for a in args],
                        max_seq=seq_range[2])
    route, options = "plugin", {}
    try:
        from torch_tensorrt.dynamo.conversion.plugins import custom_op

        custom_op("awq::int4_linear", supports_dynamic_shapes=True)
    except (ImportError, AttributeError):  # Torch-TensorRT < 2.6 / TensorRT < 10.7
        route = "plugin:pytorch_fallback"
        options = {"torch_executed_ops": {INT4_OP}}
    inputs = [
        torch_trt.Input(min_shape=_with_seq(a, seq_range[0]), opt_shape=_with_seq(a, seq_range[1]),
                        max_shape=_with_seq(a, seq_range[2]), dtype=a.dtype)
        for a in args
    ]
    compiled = torch_trt.dynamo.compile(source, arg_inputs=inputs, min_block_size=1, **options)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    torch_trt.save(compiled, str(engine_path), arg_inputs=[a.cuda() for a in args])
    return TensorRTBuild(engine_path, route)


def _with_seq(a: torch.Tensor, seq: int) -> tuple[int, ...]:
    return (*a.shape[:1], seq, *a.shape[2:]) if a.dim() > 1 else tuple(a.shape)


def _import(name: str, hint: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"to_tensorrt needs the Python package {name!r}, which is not "
                          f"installed ({e}). {hint}") from e
