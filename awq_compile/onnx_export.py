"""ONNX export of INT4 programs, weights kept INT4 in the file.

Every `awq.int4_linear` (N outputs, K inputs, group g, G = ceil(K / g) groups) becomes one of:

    "matmulnbits":  y = com.microsoft::MatMulNBits(x, B, scales, zero_points)
                        {K, N, bits=4, block_size=g}
                    B uint8 [N, G, g/2] = qweight's bytes unchanged (docs/format.md), scales [N, G],
                    zero_points uint8 [N, ceil(G/2)] (two per byte, low nibble first; omitted when
                    every z = 8, MatMulNBits' default). ONNX Runtime's fast INT4 path.
    "qdq":          y = MatMul(x, DequantizeLinear(Wq [K, N], scale [G, N], zp [G, N]))
                        {axis=0, block_size=g}
                    opset >= 21 blocked quantization. Symmetric layers: Wq int4 = q - 8, no zp.
                    Asymmetric layers: Wq uint4 = q, zp uint4 = z: (q - z) * s exactly.
    "qdq", signed:  TensorRT's form: int4 only, no zero points. An asymmetric layer whose every
                    group satisfies -8 <= q - z <= 7 stores Wq = q - z (exact). Otherwise it stores
                    Wq = q - 8 and adds the exact zero-point correction, computed in float32:
                        (q - z) s = (q - 8) s + (8 - z) s
                        y = x Wq_s + (x E) C,   E [K, G] sums x per group, C [G, N] = (8 - z) s
                    a rank-G GEMM (G = K / g) next to the INT4 one.

The padding rule: MatMulNBits carries the real K as an attribute and B keeps the padded bytes; the
QDQ weight keeps only the K real rows, its last block partial, as blocked DequantizeLinear allows.

How: `torch.onnx.export(dynamo=True)` translates the op into a placeholder node
`awq::Int4Linear(x, qweight, scales, zeros) {group_size}` (bias as a separate Add), then
`_lower` replaces each placeholder, re-laying the constant tensors out in numpy. The layouts are
constant transforms of the weights: simple in numpy, and no Reshape/bit ops left in the graph for
a runtime to fold (folding a DequantizeLinear would store float weights).
"""

from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import AWQConfig, CONFIG_VERSION
from .export import config_of, export, int4_nodes
from .quant import unpack_int4

__all__ = ["to_onnx", "OnnxFormat", "OnnxExport", "METADATA_CONFIG_KEY"]

METADATA_CONFIG_KEY = "awq_compile.config"
_EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf caps a file at 2 GiB; stay well below it
_OPSET = 21  # blocked DequantizeLinear with int4/uint4 needs opset >= 21
_PLACEHOLDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class OnnxFormat(str, Enum):
    """How an INT4 linear is written in ONNX (see the module docstring for the exact tensors)."""

    MATMULNBITS = "matmulnbits"
    """com.microsoft::MatMulNBits: B uint8 [N, G, g/2] (the NK_U8 bytes), ONNX Runtime only."""
    QDQ = "qdq"
    """Standard DequantizeLinear (int4/uint4, blocked along K, opset >= 21) + MatMul."""


@dataclass(frozen=True)
class OnnxExport:
    """What `to_onnx` wrote: the file(s) and how each INT4 linear was lowered."""

    path: Path
    format: OnnxFormat
    routes: dict[str, str] = field(default_factory=dict)
    """layer -> "matmulnbits" | "qdq_int4" | "qdq_uint4" | "qdq_int4+zp_correction"."""
    external_data: Path | None = None

    @property
    def nbytes(self) -> int:
        """Size on disk of the model file plus its external data."""
        extra = self.external_data.stat().st_size if self.external_data else 0
        return self.path.stat().st_size + extra


def to_onnx(
    program_or_model: torch.export.ExportedProgram | nn.Module,
    path: str | os.PathLike,
    format: OnnxFormat | str = OnnxFormat.MATMULNBITS,
    *,
    args: Sequence[Any] | None = None,
    config: AWQConfig | None = None,
    signed: bool = False,
    accuracy_level: int = 0,
    external_data: bool | None = None,
    opset: int = _OPSET,
    overwrite: bool = False,
) -> OnnxExport:
    """Write an INT4 program (or a quantized model, exported first with `args`) as ONNX.

    `signed=True` (format "qdq" only) writes TensorRT's INT4 form (no zero points; exact
    zero-point correction where needed). `accuracy_level` is MatMulNBits' attribute (0: float
    compute; 4: int8 activations, faster on CPU, not bit-faithful). `external_data=None` stores
    weights in `<path>.data` only when they exceed 1 GiB. The AWQConfig (from `config`, the
    program's metadata or `model.awq_config`) goes into metadata_props["awq_compile.config"].
    An existing `path` (or its `.data`) is an error unless `overwrite`.

    >>> out = to_onnx(qmodel, "model.onnx", "matmulnbits", args=(ids,))  # doctest: +SKIP
    >>> out.routes["model.model.layers.0.mlp.down_proj"]  # doctest: +SKIP
    'matmulnbits'
    """
    fmt = _check_target(path, format, signed, opset, overwrite)
    model, routes = _build(program_or_model, fmt, args, config, signed, accuracy_level, opset)
    return _save(model, Path(path), fmt, routes, external_data)


def _check_target(path, format, signed: bool, opset: int, overwrite: bool) -> OnnxFormat:
    """Argument checks that need no export, so a refusal costs nothing and writes nothing."""
    fmt = OnnxFormat(format)
    if signed and fmt is not OnnxFormat.QDQ:
        raise ValueError(f"to_onnx: signed=True needs format='qdq', got format={fmt.value!r}")
    if fmt is OnnxFormat.QDQ and opset < 21:
        raise ValueError(f"to_onnx: format 'qdq' needs opset >= 21 (int4 blocked), got {opset}")
    path = Path(path)
    for f in (path, path.with_name(path.name + ".data")):
        if f.exists() and not overwrite:
            raise FileExistsError(f"to_onnx: {f} exists; pass overwrite=True to replace it")
    return fmt


def _build(program_or_model, fmt: OnnxFormat, args, config, signed, accuracy_level, opset):
    """(lowered onnx_ir.Model with metadata, layer -> route), nothing written yet."""
    if isinstance(program_or_model, torch.export.ExportedProgram):
        ep = program_or_model
    elif args is None:
        raise ValueError("to_onnx: a model needs example inputs: to_onnx(model, path, args=(...))")
    else:
        ep = export(program_or_model, args, config=None)
    config = config or config_of(ep) or config_of(program_or_model)
    if not int4_nodes(ep):
        raise ValueError("to_onnx: the program has no awq.int4_linear op; quantize the model first")
    model = _placeholder_model(ep, opset)
    routes = _lower(model, fmt, signed=signed, accuracy_level=accuracy_level)
    model.metadata_props[METADATA_CONFIG_KEY] = config.to_json() if config else ""
    model.metadata_props["awq_compile.format"] = fmt.value + ("+signed" if signed else "")
    model.metadata_props["awq_compile.config_version"] = str(CONFIG_VERSION)
    return model, routes


@functools.lru_cache(maxsize=1)
def _placeholder_op():
    """The onnxscript op `awq::Int4Linear`, with a schema so the exporter's tracer accepts it."""
    import onnxscript
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = defs.OpSchema(
        "Int4Linear", "awq", 1, "awq::int4_linear, replaced by awq_compile before saving",
        inputs=[param("x", "T"), param("qweight", "U"), param("scales", "T"), param("zeros", "U")],
        outputs=[param("y", "T")],
        type_constraints=[("T", floats, ""), ("U", ["tensor(uint8)"], "")],
        attributes=[defs.OpSchema.Attribute("group_size", defs.OpSchema.AttrType.INT, "")],
    )
    return onnxscript.values.Op(onnxscript.values.Opset("awq", 1), "Int4Linear", schema)


def _translate_int4_linear(x, qweight, scales, zeros, group_size: int, bias=None):
    from onnxscript import opset18 as op

    y = _placeholder_op()(x, qweight, scales, zeros, group_size=group_size)
    return y if bias is None else op.Add(y, bias)


def _placeholder_model(ep: torch.export.ExportedProgram, opset: int):
    """The program as ONNX with awq::Int4Linear placeholders. Cached per program and opset
    (torch.onnx.export is the slow step); callers get a clone that shares the tensors.

    Unoptimized on purpose: onnxscript's optimizer spends minutes on an LLM's pattern rewrites
    that ONNX Runtime repeats at load time, and its constant folding would store a folded
    (transposed) copy of a tied embedding as lm_head's weight."""
    cache = _PLACEHOLDER_CACHE.setdefault(ep, {})
    if opset not in cache:
        from .export import INT4_OP

        program = torch.onnx.export(
            ep, dynamo=True, opset_version=opset, verbose=False, optimize=False,
            custom_translation_table={INT4_OP: _translate_int4_linear},
        )
        cache[opset] = program.model
    return cache[opset].clone()


def _lower(model, fmt: OnnxFormat, *, signed: bool, accuracy_level: int) -> dict[str, str]:
    """Replace every awq::Int4Linear placeholder; returns layer -> route."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    graph, routes, done = model.graph, {}, {}
    for node in list(graph):
        if node.domain != "awq" or node.op_type != "Int4Linear":
            continue
        x = node.inputs[0]
        layer = _layer_name(node.inputs[1])
        w = _Int4Weights.from_node(node, _static_k(x, layer))
        if fmt is OnnxFormat.MATMULNBITS:
            y, route = _matmulnbits(ir, graph, node, x, w, layer, accuracy_level, done)
        else:
            y, route = _qdq(ir, graph, node, x, w, layer, signed, done)
        y.type, y.shape = x.type, ir.Shape([*x.shape[:-1], w.n])
        node.outputs[0].replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        routes[layer] = route
    common.RemoveUnusedNodesPass()(model)
    # The exporter's per-node metadata (stack traces, ~2 KB a node) would outweigh a small model.
    common.ClearMetadataAndDocStringPass()(model)
    model.opset_imports.pop("awq", None)
    if fmt is OnnxFormat.MATMULNBITS:
        model.opset_imports["com.microsoft"] = 1
    return routes


@dataclass
class _Int4Weights:
    qweight: np.ndarray  # uint8 [N, Kp/2]
    scales: np.ndarray  # [N, G], the op's compute dtype
    zeros: np.ndarray  # uint8 [N, G]
    group_size: int
    k: int

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @functools.cached_property
    def q(self) -> np.ndarray:
        """uint8 [N, K]: the codes of the real columns (padding dropped)."""
        packed = torch.from_numpy(np.ascontiguousarray(self.qweight))
        return unpack_int4(packed).numpy()[:, : self.k]

    @classmethod
    def from_node(cls, node, k: int) -> "_Int4Weights":
        g = node.attributes["group_size"].as_int()
        qweight, scales, zeros = (_const(v) for v in node.inputs[1:4])
        n, kp = qweight.shape[0], qweight.shape[1] * 2
        if not kp - g < k <= kp or scales.shape != (n, kp // g) or zeros.shape != scales.shape:
            raise ValueError(
                f"to_onnx: inconsistent INT4 tensors: x has K={k}, qweight {qweight.shape}, "
                f"scales {scales.shape}, zeros {zeros.shape}, group_size {g}"
            )
        return cls(qweight, scales, zeros, g, k)


def _matmulnbits(ir, graph, node, x, w: _Int4Weights, layer, accuracy_level, done):
    key = (layer, "matmulnbits")
    if key not in done:
        n, groups, g = w.n, w.scales.shape[1], w.group_size
        b = _init(ir, graph, f"{layer}.B", w.qweight.reshape(n, groups, g // 2))
        s = _init(ir, graph, f"{layer}.B_scales", w.scales)
        zp = None
        if not (w.zeros == 8).all():  # 8 is MatMulNBits' default zero point for 4 bits
            z = np.pad(w.zeros, ((0, 0), (0, groups % 2)))
            zp = _init(ir, graph, f"{layer}.B_zero_points", (z[:, 0::2] | (z[:, 1::2] << 4)))
        done[key] = (b, s, zp)
    b, s, zp = done[key]
    attrs = {"K": w.k, "N": w.n, "bits": 4, "block_size": w.group_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    inputs = [x, b, s] + ([zp] if zp is not None else [])
    mm = ir.node("MatMulNBits", inputs, attrs, domain="com.microsoft", name=f"{layer}/MatMulNBits")
    graph.insert_before(node, mm)
    return mm.outputs[0], "matmulnbits"


def _qdq(ir, graph, node, x, w: _Int4Weights, layer, signed, done):
    key = (layer, "qdq", signed)
    if key not in done:
        done[key] = _qdq_constants(ir, graph, w, layer, signed)
    wq, scale, zp, corr, route = done[key]
    dq = ir.node(
        "DequantizeLinear", [wq, scale] + ([zp] if zp is not None else []),
        {"axis": 0, "block_size": w.group_size}, name=f"{layer}/DequantizeLinear",
    )
    mm = ir.node("MatMul", [x, dq.outputs[0]], name=f"{layer}/MatMul")
    new = [dq, mm]
    y = mm.outputs[0]
    if corr is not None:
        new += _zero_point_correction(ir, x, y, corr, layer)
        y = new[-1].outputs[0]
    graph.insert_before(node, new)
    return y, route


def _qdq_constants(ir, graph, w: _Int4Weights, layer, signed):
    """(Wq, scale, zp | None, (E, C) | None, route) for one layer."""
    g = w.group_size
    z_cols = np.repeat(w.zeros, g, axis=1)[:, : w.k].astype(np.int16)  # z per column
    v = w.q.astype(np.int16) - z_cols
    symmetric = bool((w.zeros == 8).all())
    scale = _init(ir, graph, f"{layer}.weight_scale", np.ascontiguousarray(w.scales.T))
    if not signed and not symmetric:
        wq = _init_packed(ir, graph, f"{layer}.weight_q", w.q.T, ir.DataType.UINT4)
        zp = _init_packed(ir, graph, f"{layer}.weight_zero_point", w.zeros.T, ir.DataType.UINT4)
        return wq, scale, zp, None, "qdq_uint4"
    if v.min() >= -8 and v.max() <= 7:  # exact as signed int4 without a zero point
        wq = _init_packed(ir, graph, f"{layer}.weight_q", v.T, ir.DataType.INT4)
        return wq, scale, None, None, "qdq_int4"
    wq = _init_packed(ir, graph, f"{layer}.weight_q", w.q.T.astype(np.int16) - 8, ir.DataType.INT4)
    e = np.zeros((w.k, w.scales.shape[1]), np.float32)  # [K, G]: 1 where column k is in group G
    e[np.arange(w.k), np.arange(w.k) // g] = 1.0
    c = ((8.0 - w.zeros.astype(np.float32)) * w.scales.astype(np.float32)).T  # [G, N], exact
    corr = (_init(ir, graph, f"{layer}.group_sum", e),
            _init(ir, graph, f"{layer}.zp_correction", c))
    return wq, scale, None, corr, "qdq_int4+zp_correction"


def _zero_point_correction(ir, x, y, corr, layer):
    """Nodes computing y + (x E) C in float32 (a float16 C would round (8 - z) * s)."""
    e, c = corr
    nodes, xf = [], x
    if x.dtype != ir.DataType.FLOAT:
        nodes.append(ir.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{layer}/CastIn"))
        xf = nodes[-1].outputs[0]
    nodes.append(ir.node("MatMul", [xf, e], name=f"{layer}/GroupSum"))
    nodes.append(ir.node("MatMul", [nodes[-1].outputs[0], c], name=f"{layer}/ZeroPointCorrection"))
    corr_out = nodes[-1].outputs[0]
    if x.dtype != ir.DataType.FLOAT:
        nodes.append(ir.node("Cast", [corr_out], {"to": x.dtype}, name=f"{layer}/CastOut"))
        corr_out = nodes[-1].outputs[0]
    nodes.append(ir.node("Add", [y, corr_out], name=f"{layer}/AddCorrection"))
    return nodes


def _const(value) -> np.ndarray:
    """The constant behind a placeholder input: an initializer, possibly through Cast/Identity
    nodes the exporter did not fold (large tensors)."""
    import onnx_ir as ir

    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.domain == "" and producer.op_type == "Identity":
        return _const(producer.inputs[0])
    if producer is not None and producer.domain == "" and producer.op_type == "Cast":
        to = ir.DataType(producer.attributes["to"].as_int())
        return _const(producer.inputs[0]).astype(to.numpy())
    raise ValueError(
        f"to_onnx: awq.int4_linear input {value.name!r} is not a constant (produced by "
        f"{producer.op_type if producer else 'a graph input'}); INT4 weights must be buffers"
    )


def _static_k(x, layer: str) -> int:
    k = x.shape[-1] if x.shape is not None else None
    if not isinstance(k, int):
        raise ValueError(f"to_onnx: {layer}: the input's last dimension must be static, got {k!r}")
    return k


def _layer_name(qweight_value) -> str:
    name = qweight_value.name or "int4_linear"
    return name[: -len(".qweight")] if name.endswith(".qweight") else name


def _init(ir, graph, name: str, array: np.ndarray):
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
    graph.register_initializer(value)
    return value


def _init_packed(ir, graph, name: str, values: np.ndarray, dtype):
    """An int4/uint4 initializer: elements in row-major order, two per byte, low nibble first."""
    flat = (values.astype(np.int16) & 0xF).astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = flat[0::2] | (flat[1::2] << 4)
    tensor = ir.PackedTensor(packed, dtype, shape=values.shape, name=name)
    value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(dtype), shape=tensor.shape)
    graph.register_initializer(value)
    return value


def _save(model, path: Path, fmt, routes, external_data: bool | None) -> OnnxExport:
    import onnx_ir as ir

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    if external_data is None:
        external_data = total > _EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data") if external_data else None
    if data is not None and data.exists():
        data.unlink()  # ir.save appends to an existing file (overwrite was checked)
    ir.save(model, path, external_data=data.name if data else None)
    return OnnxExport(path, fmt, routes, data)
