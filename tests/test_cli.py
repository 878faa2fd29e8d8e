"""The awq-compile command line: exit codes, one-line errors, and each command end to end on a
tiny Llama (2 layers, hidden 64) so the whole file runs in seconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from awq_compile import AWQConfig, Int4Linear
from awq_compile.calib import calibration_text
from awq_compile.checkpoint import load_quantized
from awq_compile.cli import main
from awq_compile.evaluate import perplexity

FAST = ["--n-samples", "4", "--seq-len", "32", "--n-grid", "4"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face model folder: a tiny random Llama and the word-level test tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(calibration_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir, text_file):
    out = tmp_path_factory.mktemp("ck") / "tiny-awq"
    assert main(["quantize", "--model", str(tiny_model_dir), "--calib-file", str(text_file),
                 "--out", str(out), *FAST]) == 0
    return out


def _error_line(capsys) -> str:
    """The error: the one and last line of stderr that is not a progress bar."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert len(err) == 1, err
    assert err[0].startswith("awq-compile: error: ")
    return err[0]


# ----------------------------------------------------------------------------- help and errors


def test_help_lists_commands_and_the_sampling_rule(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("quantize", "eval", "export", "bench", "demo"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "calibration sampling rule" in out and "torch.randint(0, T - SEQ_LEN + 1" in out


@pytest.mark.parametrize("argv,message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["quantize", "--group-size", "48", "--out", "x"], "invalid choice: 48"),
    (["quantize"], "the following arguments are required: --out"),
    (["quantize", "--calib-file", "a", "--dataset", "b", "--out", "x"], "not allowed with"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in _error_line(capsys)


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir, text_file):
    cases = [
        (["eval", str(tmp_path / "missing")], "no such folder"),
        (["quantize", "--model", str(tiny_model_dir), "--calib-file", str(tmp_path / "nope.txt"),
          "--out", str(tmp_path / "o")], "does not exist"),
        (["quantize", "--model", str(tiny_model_dir), "--calib-file", str(text_file),
          "--group-size", "128", "--out", str(tmp_path / "o"), *FAST],
         r"--group-size 128 does not divide every linear's K [64, 128]"),
        (["quantize", "--model", str(tiny_model_dir), "--n-samples", "0", "--out", str(tmp_path / "o")],
         "--n-samples must be positive"),
        (["quantize", "--model", str(tiny_model_dir), "--out", str(tiny_model_dir)], "--overwrite"),
        (["eval", str(tiny_model_dir), "--text", str(text_file), "--windows", "1", "--seq-len",
          "100000"], "fewer than one window"),
        (["bench", str(tiny_model_dir), "--base", str(tiny_model_dir)], "not an AWQ checkpoint"),
        (["demo", "--out", str(tiny_model_dir)], "not an empty folder (pass --overwrite)"),
        (["eval", str(tiny_model_dir), "--device", "nonsense"], "--device 'nonsense'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", str(tiny_model_dir), "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in _error_line(capsys)


def test_console_script_and_python_m_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([sys.executable, "-m", "awq_compile", "--help"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0 and "usage: awq-compile" in ok.stdout
    exe = shutil.which("awq-compile") or pytest.skip("awq-compile console script not installed")
    bad = subprocess.run([exe, "eval", str(tmp_path / "nope")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"awq-compile: error: model '{tmp_path / 'nope'}': no such folder (expected 'smollm2' or a "
        "local Hugging Face model folder with config.json)"]


# ----------------------------------------------------------------------------- commands


def test_quantize_writes_a_loadable_checkpoint_with_the_flags(checkpoint, capsys):
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["group_size"] == 64  # largest g dividing K in {64, 128}
    model, tokenizer = load_quantized(checkpoint)
    assert tokenizer is not None
    assert model.awq_config == AWQConfig(group_size=64, n_grid=4, n_samples=4, seq_len=32)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14


def test_quantize_config_flags_and_dataset_source(tmp_path, tiny_model_dir, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [line for line in calibration_text()[:20_000].split("\n")]
    datasets.Dataset.from_dict({"body": rows}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "ds"),
            "--text-column", "body", "--group-size", "32", "--symmetric", "--no-clip",
            "--seed", "3", "--out", str(out), *FAST]
    assert main(argv) == 0
    assert "group size 32" in capsys.readouterr().out
    config = load_quantized(out)[0].awq_config
    assert config == AWQConfig(group_size=32, zero_point=False, clip=False, seed=3, n_grid=4,
                               n_samples=4, seq_len=32)
    argv[argv.index("body")] = "missing"
    assert main(argv + ["--overwrite"]) == 2
    assert "has no column 'missing'; it has ['body']" in _error_line(capsys)


def test_eval_prints_the_checkpoint_perplexity(checkpoint, text_file, capsys):
    assert main(["eval", str(checkpoint), "--text", str(text_file), "--seq-len", "32",
                 "--windows", "3"]) == 0
    printed = float(capsys.readouterr().out.split()[1])
    model, tokenizer = load_quantized(checkpoint)
    expected = perplexity(model, tokenizer, text_file.read_text(), seq_len=32, max_windows=3,
                          progress=False)
    assert math.isclose(printed, expected, rel_tol=1e-4)


def test_bench_prints_a_table(checkpoint, text_file, capsys):
    assert main(["bench", str(checkpoint), "--text", str(text_file), "--seq-len", "32",
                 "--windows", "2", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "perplexity (2 x 32 tokens)" in out and "weights of the 14 quantized linears" in out
    assert "base model:" in out  # default base: the folder recorded in config.json


def test_export_pt2_runs_like_the_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny.pt2"
    assert main(["export", str(checkpoint), "--format", "pt2", "--out", str(out)]) == 0
    program = torch.export.load(str(out))
    model, _ = load_quantized(checkpoint)
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(program.module()(ids), expected, rtol=1e-5, atol=1e-5)


def test_export_onnx_runs_in_onnxruntime_like_the_checkpoint(checkpoint, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "14 INT4 linears written as matmulnbits" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model, _ = load_quantized(checkpoint)
    ids = torch.randint(0, 512, (1, 11))  # not the example length: the sequence is dynamic
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_export_tensorrt_writes_trt_int4_onnx_and_engine_needs_tensorrt(checkpoint, tmp_path, capsys):
    from awq_compile.tensorrt import check_tensorrt_onnx

    out = tmp_path / "tiny.trt.onnx"
    assert main(["export", str(checkpoint), "--format", "tensorrt", "--out", str(out)]) == 0
    assert check_tensorrt_onnx(out) == []
    capsys.readouterr()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["export", str(checkpoint), "--format", "engine", "--out", str(tmp_path / "e")]) == 2
        assert "needs the Python package 'tensorrt'" in _error_line(capsys)
