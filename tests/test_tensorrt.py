"""awq_compile.to_tensorrt up to the engine build (TensorRT itself is not installable here).

Tested: the signed QDQ ONNX TensorRT parses (symmetric layers straight through, asymmetric ones
converted exactly or with the exact zero-point correction), validated in ONNX Runtime against
torch (float32: 1e-5 absolute; float16 file vs float32 torch: 5e-3 on logits of magnitude < 1);
the refusal and missing-package errors; and the builder call sequence, against a stand-in
`tensorrt` module that records what it is asked (parse, strongly typed flag, shape profile).
"""

import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from awq_compile import AWQConfig, Int4Linear
from awq_compile.onnx_export import to_onnx
from awq_compile.quant import QuantizedWeight, dequantize, pack_int4
from awq_compile.quant import quantize as quantize_weight
from awq_compile.tensorrt import check_tensorrt_onnx, tensorrt_onnx, to_tensorrt

ort = pytest.importorskip("onnxruntime")


def tiny_llama(zero_point: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                qw = quantize_weight(child.weight, 32, zero_point)
                setattr(parent, name, Int4Linear.from_quantized(qw, 32, child.bias))
    model.awq_config = AWQConfig(group_size=32, zero_point=zero_point)
    return model


def ids(t: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, t), generator=torch.Generator().manual_seed(t))


def run(path, array):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: array})[0]


def hand_layer(n: int, k: int, kind: str, seed: int) -> Int4Linear:
    """An Int4Linear with chosen codes (g = 32, K = 80 padded to 96):
    "z8": asymmetric with every z = 8;  "fits": z anywhere, every q within [z - 8, z + 7];
    "wide": z anywhere, q anywhere in 0..15 (needs the zero-point correction)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 3
    if kind == "z8":
        z = torch.full((n, groups), 8)
    else:
        z = torch.randint(0, 16, (n, groups), generator=gen)
    zc = z.repeat_interleave(32, dim=1)
    if kind == "wide":
        q = torch.randint(0, 16, (n, 96), generator=gen)
    else:  # uniform in [max(z - 8, 0), min(z + 7, 15)]
        lo, hi = (zc - 8).clamp(min=0), (zc + 8).clamp(max=16)
        q = lo + (torch.rand(n, 96, generator=gen) * (hi - lo)).long()
    q[:, k:] = zc[:, k:]  # the padding rule: padded positions hold the zero point
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).half()
    qw = QuantizedWeight(pack_int4(q.to(torch.uint8)), scales, z.to(torch.uint8), k)
    return Int4Linear.from_quantized(qw, 32)


class HandMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (hand_layer(80, 80, kind, i)
                                  for i, kind in enumerate(["z8", "fits", "wide"]))
        self.awq_config = AWQConfig(group_size=32, zero_point=True)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_symmetric_goes_straight_through(tmp_path):
    model = tiny_llama(zero_point=False)
    out = tensorrt_onnx(model, tmp_path / "sym.onnx", args=(ids(6),), dtype=None)
    assert set(out.routes.values()) == {"qdq_int4"} and len(out.routes) == 14
    assert check_tensorrt_onnx(out.path) == []
    x = ids(17)
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits.numpy()
    np.testing.assert_allclose(run(out.path, x.numpy()), ref, atol=1e-5, rtol=0)
    half = tensorrt_onnx(model, tmp_path / "sym16.onnx", args=(ids(6),))  # float16, TensorRT's default
    got = run(half.path, x.numpy())
    assert got.dtype == np.float16 and check_tensorrt_onnx(half.path) == []
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=5e-3, rtol=0)


def test_asymmetric_layers_convert_exactly(tmp_path):
    model = HandMLP().eval()
    out = tensorrt_onnx(model, tmp_path / "asym.onnx", args=(torch.randn(1, 3, 80),), dtype=None)
    assert out.routes == {"a": "qdq_int4", "b": "qdq_int4", "c": "qdq_int4+zp_correction"}
    assert check_tensorrt_onnx(out.path) == []
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out.path).graph.initializer}
    for name in "abc":  # the stored int4 values (plus correction) give the weight exactly
        layer = getattr(model, name)
        w_ref = dequantize(layer.qweight, layer.scales, layer.zeros, 32, 80, torch.float64).numpy()
        scale = np.repeat(inits[f"{name}.weight_scale"].astype(np.float64), 32, axis=0)[:80]
        w = inits[f"{name}.weight_q"].astype(np.float64) * scale  # [K, N]
        if name == "c":
            e, c = inits["c.group_sum"], inits["c.zp_correction"]
            w = w + e.astype(np.float64) @ c.astype(np.float64)
        np.testing.assert_array_equal(w.T, w_ref)
    x = torch.randn(1, 7, 80)  # batch is static (the example's), the sequence dynamic
    np.testing.assert_allclose(run(out.path, x.numpy()), model(x).detach().numpy(), atol=1e-5, rtol=0)


def test_refuses_the_correction_when_asked(tmp_path):
    with pytest.raises(ValueError, match=r"1 asymmetric layers .*\['c'\].*route='plugin'"):
        tensorrt_onnx(HandMLP(), tmp_path / "x.onnx", args=(torch.randn(1, 3, 80),),
                      dtype=None, zero_point_correction=False)
    assert not list(tmp_path.iterdir())  # refused before writing


def test_check_flags_files_tensorrt_cannot_take(tmp_path):
    model, x = HandMLP(), torch.randn(1, 3, 80)
    unsigned = to_onnx(model, tmp_path / "u.onnx", "qdq", args=(x,))
    problems = check_tensorrt_onnx(unsigned.path)  # layer a (every z = 8) is int4 already
    assert sorted(problems) == [
        f"{layer}/DequantizeLinear: {why}" for layer in "bc" for why in
        ("quantized input must be an int4/int8 initializer", "zero point must be absent or all zeros")]
    nbits = to_onnx(model, tmp_path / "n.onnx", "matmulnbits", args=(x,))
    assert any("com.microsoft::MatMulNBits is not a standard op" in p
               for p in check_tensorrt_onnx(nbits.path))


def test_missing_packages_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    model = HandMLP()
    with pytest.raises(ImportError, match=r"'tensorrt'.*pip install tensorrt.*signed=True"):
        to_tensorrt(model, tmp_path / "m.engine", args=(torch.randn(1, 3, 80),))
    assert not (tmp_path / "m.onnx").exists()  # failed before the export
    with pytest.raises(ImportError, match=r"'torch_tensorrt'.*pip install torch-tensorrt"):
        to_tensorrt(model, tmp_path / "m.engine", args=(torch.randn(1, 3, 80),), route="plugin")
    with pytest.raises(ValueError, match=r"route='int4'; choose one of \['qdq', 'plugin'\]"):
        to_tensorrt(model, tmp_path / "m.engine", route="int4")


def fake_tensorrt(record: dict, parse_ok: bool = True) -> types.ModuleType:
    """A stand-in for the few TensorRT 10 calls `to_tensorrt` makes, recording them. The parser
    reads the real ONNX inputs, so the shape profile is computed from the real file."""
    trt = types.ModuleType("tensorrt")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            record["log_level"] = level

    class Network:
        def __init__(self, flags):
            record["flags"], self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            record["parsed"] = path
            for i in onnx.load(path, load_external_data=False).graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                             for d in i.type.tensor_type.shape.dim)
                self.network.inputs.append(types.SimpleNamespace(name=i.name, shape=dims))
            return parse_ok

        def get_error(self, i):
            return "In node 3: unsupported"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return types.SimpleNamespace(
                set_memory_pool_limit=lambda pool, size: record.update(workspace=(pool, size)),
                add_optimization_profile=lambda p: record.update(profile_added=True))

        def create_optimization_profile(self):
            return types.SimpleNamespace(
                set_shape=lambda name, *s: record.setdefault("shapes", {}).update({name: s}))

        def build_serialized_network(self, network, config):
            return b"serialized engine"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    return trt


def test_engine_build_call_sequence(tmp_path, monkeypatch):
    record = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(record))
    build = to_tensorrt(tiny_llama(zero_point=False), tmp_path / "llama.engine", args=(ids(6),),
                        seq_range=(1, 16, 64), workspace_bytes=1 << 30)
    assert build.engine_path.read_bytes() == b"serialized engine"
    assert build.route == "qdq" and set(build.layers.values()) == {"qdq_int4"}
    assert record["parsed"] == str(tmp_path / "llama.onnx") == str(build.onnx.path)
    assert record["flags"] == 1 << 5  # strongly typed: the float16 ONNX decides the precision
    assert record["shapes"] == {"input_ids": ((1, 1), (1, 16), (1, 64))}
    assert record["workspace"] == ("workspace", 1 << 30) and record["profile_added"]
    x = ids(9)  # the file handed to the parser is the validated one
    with torch.no_grad():
        ref = tiny_llama(zero_point=False)(input_ids=x, use_cache=False).logits.numpy()
    np.testing.assert_allclose(run(build.onnx.path, x.numpy()).astype(np.float32), ref, atol=5e-3)


def test_engine_build_reports_parser_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt({}, parse_ok=False))
    onnx_file = tensorrt_onnx(HandMLP(), tmp_path / "m.onnx", args=(torch.randn(1, 3, 80),)).path
    with pytest.raises(RuntimeError, match=r"could not parse .*m.onnx.*In node 3: unsupported"):
        to_tensorrt(onnx_file, tmp_path / "m.engine")
    with pytest.raises(ValueError, match="not TensorRT's INT4 form"):
        to_tensorrt(to_onnx(HandMLP(), tmp_path / "u.onnx", "qdq",
                            args=(torch.randn(1, 3, 80),)).path, tmp_path / "u.engine")
