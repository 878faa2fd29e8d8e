"""The bad-input catalogue (docs/bad_input.md): each bad input gets a clear error, and the
user's model and files are unchanged afterwards.

Every quantize case runs through `_refused`, which snapshots the model's state_dict (and the
files under a folder, when given), asserts the exception type and message, then checks both
bit for bit. Cases marked xfail(strict=True) are findings not fixed yet: each says what a clear
error would be; when it is fixed the test XPASSes and the marker must go.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from awq_compile import AWQConfig, Int4Linear, quantize, quantize_rtn
from awq_compile.checkpoint import (
    CheckpointError, apply_checkpoint, load_quantized, read_checkpoint, save_quantized,
)

FAST = dict(group_size=32, n_grid=3, clip_grid=3, max_search_tokens=64, max_clip_tokens=32)


class MLP(nn.Module):
    def __init__(self, k: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(k, 64)
        self.b = nn.Linear(64, 32)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.conv(x))


class FunctionalHead(MLP):
    """An nn.Linear followed by a bare-Parameter F.linear (no module to swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 32) * 0.1)

    def forward(self, x):
        return F.linear(super().forward(x), self.w)


def _x(*shape, scale=1.0, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), **kw) * scale


def _files(folder: Path | None) -> dict[str, bytes]:
    if folder is None or not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN included (torch.equal says NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def _refused(fn, model, exc, match, folder: Path | None = None):
    """fn() must raise `exc` matching `match`, leaving `model` and `folder` bit-for-bit as they were."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else {}
    files = _files(folder)
    with pytest.raises(exc, match=match) as info:
        fn()
    if model is not None:
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(_same_bits(after[k], v) for k, v in before.items())
        assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert _files(folder) == files
    return info.value


# ----------------------------------------------------------------------------- models and calibration


def test_no_linear_layers():
    m = ConvOnly()
    _refused(lambda: quantize(m, [_x(2, 4, 8)], AWQConfig(**FAST)), m, ValueError,
             "no linear layers to quantize")
    _refused(lambda: quantize_rtn(m, AWQConfig(**FAST)), m, ValueError, "no nn.Linear layers")


def test_every_linear_skipped():
    m = MLP()
    _refused(lambda: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST, skip=("a", "b"))), m,
             ValueError, r"none outside AWQConfig.skip=\['a', 'b'\]")


@pytest.mark.parametrize("calibration,exc,match", [
    (None, ValueError, "calibration data is required"),
    ([], ValueError, "calibration data is empty"),
    (iter([]), ValueError, "calibration data is empty"),
    (torch.empty(0, 8, dtype=torch.long), ValueError, r"n_samples > 0, got shape \(0, 8\)"),
    (torch.empty(4, 0, dtype=torch.long), ValueError, r"got shape \(4, 0\)"),
    (torch.arange(8), ValueError, r"must be \[n_samples, seq_len\]"),
    ([_x(2, 8, 64), _x(0, 8, 64)], ValueError, "calibration batch 1 is empty"),
    ([_x(2, 8, 64), _x(2, 7, 64)], ValueError, "all batches must share one shape"),
    ("some text", TypeError, "batch 0 must be a tensor, a tuple of arguments or a dict"),
    (3, TypeError, "must be a tensor or an iterable of batches, got int"),
], ids=["none", "empty_list", "empty_iterator", "zero_samples", "zero_length", "one_dim",
        "empty_batch", "ragged", "string", "int"])
def test_empty_short_or_malformed_calibration(calibration, exc, match):
    m = MLP()
    _refused(lambda: quantize(m, calibration, AWQConfig(**FAST)), m, exc, match)


@pytest.mark.parametrize("where", ["nan_first_batch", "inf_last_batch", "overflow_inside"])
def test_nan_or_inf_activations(where):
    m = MLP()
    batches = [_x(2, 8, 64), _x(2, 8, 64)]
    if where == "nan_first_batch":
        batches[0][0, 3, 5] = float("nan")
    elif where == "inf_last_batch":
        batches[1][1, 0, 0] = float("inf")
    else:  # finite inputs whose first linear overflows float32
        batches = [_x(2, 8, 64, scale=1e38)]
    _refused(lambda: quantize(m, batches, AWQConfig(**FAST)), m, ValueError,
             r"NaN/Inf activations at the input of \['a.weight'\]")


def test_non_finite_weight_is_refused():
    m = MLP()
    with torch.no_grad():
        m.b.weight[0, 0] = float("inf")
    _refused(lambda: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST)), m, ValueError, "NaN or Inf")


def test_non_finite_weight_names_the_parameter():
    m = MLP()
    with torch.no_grad():
        m.a.weight[0, 0] = float("nan")
    _refused(lambda: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST)), m, ValueError, r"a\.weight")


@pytest.mark.parametrize("kw,match", [
    (dict(compute_dtype="int8"), "compute_dtype='int8': choose one of"),
    (dict(group_size=48), "group_size=48: supported group sizes are 32, 64, 128"),
    (dict(bits=8), "bits=8: only 4-bit"),
    (dict(clip_max_shrink=1.0), r"clip_max_shrink=1.0: must be in \[0, 1\)"),
    (dict(n_grid=0), "n_grid=0: must be a positive integer"),
    (dict(n_grid=True), "n_grid=True: must be a positive integer"),
    (dict(zero_point="no"), "zero_point='no': must be True or False"),
    (dict(clip_separate_bounds=1), "clip_separate_bounds=1: must be True or False"),
    (dict(skip="lm_head"), "must be a tuple of name suffixes"),
    (dict(version=2), "reads version 1"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bad_config_values(kw, match):
    with pytest.raises(ValueError, match=match):
        AWQConfig(**kw)


def test_unknown_config_field_from_a_file():
    with pytest.raises(ValueError, match=r"unknown fields \['groupsize'\]"):
        AWQConfig.from_dict({"groupsize": 64})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn])
def test_unsupported_model_dtype(dtype):
    m = MLP().to(dtype)
    _refused(lambda: quantize(m, [_x(2, 8, 64).to(dtype)], AWQConfig(**FAST)), m, ValueError,
             "dtype")


def test_float64_model_is_supported():
    """Not an error: float64 models quantize and run in float64."""
    m = MLP().double()
    y = quantize(m, [_x(2, 8, 64, dtype=torch.float64)], AWQConfig(**FAST))(_x(1, 3, 64, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


@pytest.mark.parametrize("output", ["module", "graph"])
def test_group_size_not_dividing_k_without_padding(output):
    m = MLP(k=40)
    _refused(lambda: quantize(m, [_x(2, 8, 40)], AWQConfig(**{**FAST, "pad_k": False}), output=output),
             m, ValueError, "a.weight: in_features=40 is not a multiple of group_size=32 and "
             "AWQConfig.pad_k is False")
    _refused(lambda: quantize_rtn(m, AWQConfig(**{**FAST, "pad_k": False})), m, ValueError,
             "in_features=40 is not a multiple")


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: quantize(m, [_x(2, 8, 64)], {"group_size": 32}), TypeError, "config must be an AWQConfig, got dict"),
    (lambda m: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST), output="onnx"), ValueError, "output='onnx'; choose"),
    (lambda m: quantize(lambda x: x, [_x(2, 8, 64)]), TypeError, "model must be a torch.nn.Module"),
], ids=["config_dict", "output_kind", "not_a_module"])
def test_bad_arguments(call, exc, match):
    m = MLP()
    _refused(lambda: call(m), m, exc, match)


def test_batch_size_zero():
    m = MLP()
    _refused(lambda: quantize(m, torch.zeros(4, 8, dtype=torch.long), batch_size=0), m, ValueError,
             "batch_size")


def test_calibration_the_model_cannot_run():
    m = MLP()
    _refused(lambda: quantize(m, [_x(2, 8, 63)], AWQConfig(**FAST)), m, Exception, "calibration")


def test_functional_linear_in_module_output():
    m = FunctionalHead()
    _refused(lambda: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST)), m, ValueError,
             "w is used by a functional linear.*output='graph'")


def test_failed_inplace_quantize_leaves_model_unchanged():
    m = FunctionalHead()
    _refused(lambda: quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST), inplace=True), m, ValueError,
             "functional linear")


# ----------------------------------------------------------------------------- checkpoints


def _tiny_llama(vocab=128, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "tiny-awq"
    save_quantized(quantize_rtn(_tiny_llama(), AWQConfig(group_size=32)), out)
    return out


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(checkpoint, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "zeros", "garbage_header"])
def test_corrupt_or_truncated_checkpoint(checkpoint, tmp_path, damage):
    ck = _copy(checkpoint, tmp_path)
    f = ck / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "zeros": bytes(100),
                   "garbage_header": raw[:8] + b"#" * 16 + raw[24:]}[damage])
    _refused(lambda: read_checkpoint(ck), None, CheckpointError,
             "cannot read safetensors file \\(truncated or corrupt\\?\\)", folder=ck)
    m = _tiny_llama()
    _refused(lambda: apply_checkpoint(m, ck), m, CheckpointError, "truncated or corrupt", folder=ck)


def test_checkpoint_with_invalid_config_json(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path)
    (ck / "config.json").write_text("{not json")
    _refused(lambda: load_quantized(ck), None, CheckpointError, "config.json: not valid JSON", folder=ck)


@pytest.mark.parametrize("edit,match", [
    (lambda qc: qc.update(group_size=64), "has group size 32 .* but config.json says 64"),
    (lambda qc: qc["awq_compile"].update(zero_point="yes"), "awq_compile is invalid: .*zero_point='yes'"),
    (lambda qc: qc.update(quant_method="gptq"), "quant_method 'gptq' is not 'awq'"),
    (lambda qc: qc.update(bits=8), "bits=8; awq_compile reads 4-bit only"),
], ids=["group_size", "bad_awq_config", "not_awq", "bits"])
def test_checkpoint_config_that_does_not_match_its_tensors(checkpoint, tmp_path, edit, match):
    ck = _copy(checkpoint, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg["quantization_config"])
    (ck / "config.json").write_text(json.dumps(cfg))
    _refused(lambda: read_checkpoint(ck), None, CheckpointError, match, folder=ck)


def test_missing_checkpoint_folder(tmp_path):
    _refused(lambda: read_checkpoint(tmp_path / "nope"), None, FileNotFoundError, "no such folder")


@pytest.mark.parametrize("other,match", [
    (dict(hidden=96), r"down_proj is \[64, 128\] in the checkpoint but \[96, 128\] in the model"),
    (dict(layers=1), "has a quantized linear 'model.layers.1.*' but the model has no such module"),
    (dict(vocab=256), r"lm_head.weight is \(128, 64\) in the checkpoint but \(256, 64\) in the model"),
], ids=["hidden", "layers", "vocab"])
def test_checkpoint_that_does_not_match_the_model(checkpoint, other, match):
    m = _tiny_llama(**other)
    with pytest.raises(CheckpointError, match=match):
        apply_checkpoint(m, checkpoint)


@pytest.mark.parametrize("other", [dict(vocab=256), dict(layers=1)], ids=["vocab", "layers"])
def test_mismatched_checkpoint_leaves_the_model_unchanged(checkpoint, other):
    m = _tiny_llama(**other)
    _refused(lambda: apply_checkpoint(m, checkpoint), m, CheckpointError, "checkpoint", folder=checkpoint)


def test_output_path_that_exists_is_not_overwritten(checkpoint, tmp_path):
    qmodel = quantize_rtn(_tiny_llama(), AWQConfig(group_size=32))
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _refused(lambda: save_quantized(qmodel, folder), None, CheckpointError,
             "is not empty \\(pass overwrite=True", folder=folder)
    file = tmp_path / "a-file"
    file.write_text("mine")
    _refused(lambda: save_quantized(qmodel, file), None, CheckpointError, "exists and is not a folder",
             folder=file)
    _refused(lambda: save_quantized(qmodel, checkpoint), None, CheckpointError, "is not empty",
             folder=checkpoint)


def test_saving_an_unquantized_model(tmp_path):
    m = _tiny_llama()
    _refused(lambda: save_quantized(m, tmp_path / "x"), m, CheckpointError, "has no awq_config")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def asym_program():
    from awq_compile.export import export

    m = MLP()
    qm = quantize(m, [_x(2, 8, 64)], AWQConfig(**FAST))  # zero_point=True: asymmetric
    return qm, export(qm, (_x(1, 8, 64),))


def _ort(path: Path, x: torch.Tensor):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # ORT's default fuses DequantizeLinear + MatMul into MatMulNBits with int8 activations
    # (accuracy level 4): ~0.5 % off. Level 0 keeps float activations, so the file's own
    # arithmetic is what gets compared.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(str(path), opts)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_asymmetric_config_to_symmetric_only_target(asym_program, tmp_path):
    """TensorRT's INT4 (QDQ, signed, no zero points) is symmetric-only. An asymmetric model is
    not refused: each layer gets Wq = q - 8 and an exact zero-point correction GEMM, so the
    file computes what the INT4 model computes."""
    import onnx

    from awq_compile.onnx_export import to_onnx

    qm, ep = asym_program
    signed = to_onnx(ep, tmp_path / "trt.onnx", "qdq", signed=True)
    assert set(signed.routes.values()) <= {"qdq_int4", "qdq_int4+zp_correction"}
    graph = onnx.load(str(signed.path)).graph
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            assert len(node.input) == 2, "symmetric-only target got a zero point"
    x = _x(1, 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(_ort(signed.path, x), qm(x), rtol=1e-5, atol=1e-5)


def test_asymmetric_config_refused_by_tensorrt_without_correction(asym_program, tmp_path):
    from awq_compile.tensorrt import tensorrt_onnx

    _, ep = asym_program
    with pytest.raises(ValueError, match="asymmetric layers have groups with q - z outside "
                       r"\[-8, 7\].*quantize symmetrically \(AWQConfig\(zero_point=False\)\)"):
        tensorrt_onnx(ep, tmp_path / "trt.onnx", zero_point_correction=False)


def test_refused_tensorrt_export_leaves_no_file(asym_program, tmp_path):
    from awq_compile.tensorrt import tensorrt_onnx

    _, ep = asym_program
    _refused(lambda: tensorrt_onnx(ep, tmp_path / "trt.onnx", zero_point_correction=False), None,
             ValueError, "asymmetric layers", folder=tmp_path)


def test_export_argument_errors(asym_program, tmp_path):
    from awq_compile.export import export
    from awq_compile.onnx_export import to_onnx

    _, ep = asym_program
    with pytest.raises(ValueError, match="signed=True needs format='qdq'"):
        to_onnx(ep, tmp_path / "a.onnx", "matmulnbits", signed=True)
    with pytest.raises(ValueError, match="needs opset >= 21"):
        to_onnx(ep, tmp_path / "a.onnx", "qdq", opset=20)
    m = MLP()
    _refused(lambda: export(m, (_x(1, 8, 64),)), m, ValueError, "has no Int4Linear layers")
    assert not list(tmp_path.iterdir())


def test_onnx_output_path_that_exists(asym_program, tmp_path):
    from awq_compile.onnx_export import to_onnx

    _, ep = asym_program
    target = tmp_path / "model.onnx"
    target.write_text("mine")
    _refused(lambda: to_onnx(ep, target, "matmulnbits"), None, (FileExistsError, ValueError),
             "exists", folder=target)
