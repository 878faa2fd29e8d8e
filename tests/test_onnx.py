"""awq_compile.to_onnx: MatMulNBits and QDQ exports keep INT4 weights, validate, and match torch.

Tolerances: ONNX Runtime computes the same float32 math in another order. Small models: 1e-5
absolute. The real model (SmolLM2-135M, RTN INT4, g=128, logits up to ~30): 1e-3 absolute, and
the same argmax at every position. QDQ sessions set ONNX Runtime's
`session.qdq_matmulnbits_accuracy_level` to 0: its DequantizeLinear+MatMul -> MatMulNBits fusion
otherwise quantizes activations to int8 (accuracy level 4), a ~1e-2 relative error.
"""

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from awq_compile import AWQConfig, Int4Linear
from awq_compile.export import export
from awq_compile.onnx_export import METADATA_CONFIG_KEY, to_onnx
from awq_compile.quant import quantize as quantize_weight

ort = pytest.importorskip("onnxruntime")

FORMATS = [("matmulnbits", False), ("qdq", False), ("qdq", True)]


class MLP(nn.Module):
    """K = 80 with g = 32: Kp = 96, the last group half padding; a bias and an input_scale."""

    def __init__(self, zero_point: bool = True):
        super().__init__()
        torch.manual_seed(0)
        up, down = nn.Linear(80, 64), nn.Linear(64, 40, bias=False)
        self.up = Int4Linear.from_quantized(
            quantize_weight(up.weight, 32, zero_point), 32, up.bias,
            input_scale=torch.rand(80) + 0.5)
        self.down = Int4Linear.from_quantized(quantize_weight(down.weight, 32, zero_point), 32)
        self.awq_config = AWQConfig(group_size=32, zero_point=zero_point)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def rtn_int4(model: nn.Module, group_size: int, zero_point: bool) -> nn.Module:
    """Every nn.Linear but lm_head -> round-to-nearest Int4Linear, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            qw = quantize_weight(child.weight, group_size, zero_point)
            setattr(model, name, Int4Linear.from_quantized(qw, group_size, child.bias))
        else:
            rtn_int4(child, group_size, zero_point)
    model.awq_config = AWQConfig(group_size=group_size, zero_point=zero_point)
    return model


def session(path, threads: int = 2):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(path, array):
    sess = session(path)
    return sess.run(None, {sess.get_inputs()[0].name: array})[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node]


def float_weight_initializers(model: onnx.ModelProto, shapes) -> list[str]:
    """Float initializers shaped like a dequantized weight ([N, K] or [K, N])."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return [i.name for i in model.graph.initializer
            if i.data_type in floats and tuple(i.dims) in shapes]


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("fmt,signed", FORMATS)
def test_small_model_matches_torch(tmp_path, fmt, signed, zero_point):
    model = MLP(zero_point).eval()
    out = to_onnx(model, tmp_path / "mlp.onnx", fmt, args=(torch.randn(2, 5, 80),), signed=signed)
    proto = onnx.load(out.path)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.randn(2, 11, 80)
    np.testing.assert_allclose(run(out.path, x.numpy()), model(x).detach().numpy(), atol=1e-5, rtol=0)
    assert "awq" not in {n.domain for n in proto.graph.node}
    assert not float_weight_initializers(proto, {(64, 80), (80, 64), (40, 64), (64, 40)})
    if fmt == "matmulnbits":
        assert ops(proto).count("com.microsoft::MatMulNBits") == 2
        assert set(out.routes.values()) == {"matmulnbits"}
    else:
        assert ops(proto).count("DequantizeLinear") == 2
        assert "com.microsoft" not in {n.domain for n in proto.graph.node}


def test_qdq_tensors_are_int4_with_k_real_rows(tmp_path):
    out = to_onnx(MLP(True), tmp_path / "mlp.onnx", "qdq", args=(torch.randn(1, 3, 80),))
    inits = {i.name: i for i in onnx.load(out.path).graph.initializer}
    assert out.routes == {"up": "qdq_uint4", "down": "qdq_uint4"}
    wq, zp, scale = (inits[f"up.weight_{s}"] for s in ("q", "zero_point", "scale"))
    assert (wq.data_type, tuple(wq.dims), len(wq.raw_data)) == (onnx.TensorProto.UINT4, (80, 64), 80 * 64 // 2)
    assert (zp.data_type, tuple(zp.dims)) == (onnx.TensorProto.UINT4, (3, 64))
    assert tuple(scale.dims) == (3, 64)  # ceil(80 / 32) blocks: the last one partial


def test_matmulnbits_bytes_are_the_nk_u8_bytes(tmp_path):
    model = MLP(True)
    out = to_onnx(model, tmp_path / "mlp.onnx", "matmulnbits", args=(torch.randn(1, 3, 80),))
    proto = onnx.load(out.path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_array_equal(inits["up.B"].reshape(64, -1), model.up.qweight.numpy())
    z = model.up.zeros.numpy()  # [64, 3] -> two per byte, low nibble first, odd tail padded
    np.testing.assert_array_equal(inits["up.B_zero_points"][:, 1] & 0xF, z[:, 2])
    np.testing.assert_array_equal(inits["up.B_zero_points"][:, 0] >> 4, z[:, 1])
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"K": 80, "N": 64, "bits": 4, "block_size": 32}


def test_symmetric_matmulnbits_omits_zero_points(tmp_path):
    out = to_onnx(MLP(False), tmp_path / "mlp.onnx", "matmulnbits", args=(torch.randn(1, 3, 80),))
    nodes = [n for n in onnx.load(out.path).graph.node if n.op_type == "MatMulNBits"]
    assert [len(n.input) for n in nodes] == [3, 3]  # default zero point 8


def test_config_in_metadata_props(tmp_path):
    model = MLP(True)
    out = to_onnx(model, tmp_path / "mlp.onnx", "qdq", args=(torch.randn(1, 3, 80),))
    meta = {p.key: p.value for p in onnx.load(out.path).metadata_props}
    assert AWQConfig.from_json(meta[METADATA_CONFIG_KEY]) == model.awq_config
    assert meta["awq_compile.format"] == "qdq"


def test_external_data(tmp_path):
    model = MLP(True)
    out = to_onnx(model, tmp_path / "mlp.onnx", "matmulnbits", args=(torch.randn(1, 3, 80),),
                  external_data=True)
    assert out.external_data == tmp_path / "mlp.onnx.data"
    assert out.external_data.stat().st_size > 64 * 96 // 2  # the packed weights live there
    assert out.nbytes == out.path.stat().st_size + out.external_data.stat().st_size
    x = torch.randn(1, 4, 80)
    np.testing.assert_allclose(run(out.path, x.numpy()), model(x).detach().numpy(), atol=1e-5, rtol=0)


def test_errors(tmp_path):
    model = MLP(True)
    with pytest.raises(ValueError, match="needs example inputs"):
        to_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="signed=True needs format='qdq'"):
        to_onnx(model, tmp_path / "a.onnx", "matmulnbits", args=(torch.randn(1, 3, 80),), signed=True)
    with pytest.raises(ValueError, match="opset >= 21"):
        to_onnx(model, tmp_path / "a.onnx", "qdq", args=(torch.randn(1, 3, 80),), opset=20)
    with pytest.raises(ValueError, match="'int8'"):
        to_onnx(model, tmp_path / "a.onnx", "int8", args=(torch.randn(1, 3, 80),))
    with pytest.raises(ValueError, match="no Int4Linear"):
        to_onnx(nn.Linear(4, 4), tmp_path / "a.onnx", args=(torch.randn(1, 3, 4),))
    assert not list(tmp_path.iterdir())


def test_existing_file_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "mlp.onnx"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match=r"mlp.onnx exists; pass overwrite=True"):
        to_onnx(MLP(True), target, args=(torch.randn(1, 3, 80),))
    assert target.read_text() == "mine"
    out = to_onnx(MLP(True), target, args=(torch.randn(1, 3, 80),), overwrite=True)
    onnx.checker.check_model(str(out.path))


# -- the real model ------------------------------------------------------------------------------

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def real(smollm2):
    """SmolLM2-135M with every linear but lm_head RTN INT4 (asymmetric, g=128: K=576 pads to
    640), its exported program (example seq 8) and torch INT4 logits on a longer prompt."""
    model, tokenizer = smollm2
    qmodel = rtn_int4(copy.deepcopy(model), group_size=128, zero_point=True)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    ep = export(qmodel, (input_ids[:, :8],))
    with torch.no_grad():
        ref = qmodel(input_ids=input_ids, use_cache=False).logits.numpy()
    return qmodel, ep, input_ids.numpy(), ref


def expected_bytes(model: nn.Module, fmt: str) -> tuple[int, int]:
    """(bytes of the float tensors kept, bytes of the INT4 layers' tensors) in the file."""
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    skip = {id(t) for m in int4 for t in m.buffers()}
    seen, float_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            float_bytes += t.numel() * 4
    int4_bytes = 0
    for m in int4:
        n, k, g = m.out_features, m.in_features, m.group_size
        groups = math.ceil(k / g)
        if fmt == "matmulnbits":
            int4_bytes += n * groups * g // 2 + n * groups * 4 + n * math.ceil(groups / 2)
        else:
            int4_bytes += math.ceil(k * n / 2) + groups * n * 4 + math.ceil(groups * n / 2)
    return float_bytes, int4_bytes


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_real_model_exports_int4_and_matches_torch(real, tmp_path, fmt):
    qmodel, ep, input_ids, ref = real
    out = to_onnx(ep, tmp_path / f"smollm2_{fmt}.onnx", fmt)
    onnx.checker.check_model(str(out.path), full_check=True)
    assert len(out.routes) == 210  # 7 linears x 30 layers
    got = run(out.path, input_ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # Size: the float tensors kept (embedding, norms) plus the INT4 layers, graph overhead < 1%
    float_bytes, int4_bytes = expected_bytes(qmodel, fmt)
    assert float_bytes + int4_bytes <= out.nbytes <= (float_bytes + int4_bytes) * 1.01
    bf16_bytes = sum(2 * m.out_features * m.in_features
                     for m in qmodel.modules() if isinstance(m, Int4Linear))
    assert out.nbytes - float_bytes < 0.30 * bf16_bytes  # INT4 + scales: ~0.28x of bf16


@pytest.mark.slow
def test_real_model_tensorrt_form_matches_torch(real, tmp_path):
    """The signed QDQ (TensorRT's form) of the asymmetric real model: INT4 q - 8 plus the exact
    zero-point correction wherever a group does not fit, validated in ONNX Runtime."""
    _, ep, input_ids, ref = real
    out = to_onnx(ep, tmp_path / "smollm2_trt.onnx", "qdq", signed=True)
    onnx.checker.check_model(str(out.path), full_check=True)
    assert set(out.routes.values()) <= {"qdq_int4", "qdq_int4+zp_correction"}
    assert "qdq_int4+zp_correction" in out.routes.values()  # RTN asymmetric: most layers
    got = run(out.path, input_ids)
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()
