"""ONNX Runtime CPU: the real model (SmolLM2-135M) as INT4 MatMulNBits vs a float32 ONNX export.

    python benchmarks/bench_onnx.py --seqs 1 128 512 --threads 2 --out /tmp/results_onnx.md  (then copy into benchmarks/RESULTS.md, section 6)

Both files come from the same exporter settings (torch.onnx dynamo, unoptimized, metadata
stripped; ONNX Runtime applies its own graph optimizations at load). Batch 1, no KV cache: a
forward over `seq` tokens returns logits for all of them, so seq = 1 is the cost of one token on
an empty context and seq = 128 / 512 are prefill throughputs. Correctness is checked before
timing (ONNX Runtime logits vs torch). Quantization is round-to-nearest by default (AWQ gives
the same tensors' shapes, so the same speed; `--quant awq` runs it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import awq_compile
from awq_compile.export import CausalLMLogits, export
from awq_compile.models import load_smollm2
from awq_compile.onnx_export import to_onnx


def float_onnx(model, path: Path, input_ids: torch.Tensor) -> int:
    """The float32 baseline through the same exporter settings as to_onnx."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    seq = torch.export.Dim("seq", min=1)
    program = torch.onnx.export(CausalLMLogits(model), (input_ids,), dynamo=True, optimize=False,
                                opset_version=21, dynamic_shapes=({1: seq},), verbose=False)
    common.ClearMetadataAndDocStringPass()(program.model)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # ir.save appends to an existing data file
    ir.save(program.model, path, external_data=data.name)  # fp32 of 135M params is > 512 MB
    return path.stat().st_size + data.stat().st_size


def session(path: Path, threads: int, accuracy_level: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feed(seq: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seq).integers(0, 49152, (1, seq), dtype=np.int64)}


def time_interleaved(sessions: dict, seq: int, iters: int) -> dict[str, float]:
    """Median seconds of one forward over `seq` tokens (batch 1) per session, after 2 warm-up
    runs each. Sessions take turns, so a change in the machine's load hits all of them alike."""
    inputs = feed(seq)
    for sess in sessions.values():
        for _ in range(2):
            sess.run(None, inputs)
    times = {name: [] for name in sessions}
    for _ in range(iters):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, inputs)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_ms(path: Path, threads: int, level: int | None, seq: int, runs: int = 10) -> dict[str, float]:
    """ONNX Runtime's profiler: milliseconds per forward spent in each op type."""
    import collections
    import json

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = threads, 3, True
    so.profile_file_prefix = str(path.with_suffix(""))  # next to the model, removed below
    if level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feed(seq))
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--quant", choices=["rtn", "awq"], default="rtn")
    ap.add_argument("--workdir", default=None, help="where the ONNX files go (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = load_smollm2()
    cfg = awq_compile.AWQConfig(group_size=args.group_size)
    if args.quant == "awq":
        from awq_compile.calib import calibration_text, sample_calibration

        calib = sample_calibration(tok, calibration_text(), cfg.n_samples, cfg.seq_len)
        qmodel = awq_compile.quantize(model, calib, cfg)
    else:
        qmodel = awq_compile.quantize_rtn(model, cfg)
    prompt = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_onnx_"))
    work.mkdir(parents=True, exist_ok=True)

    ep = export(qmodel, (prompt[:, :8],))
    int4 = to_onnx(ep, work / "smollm2_int4.onnx", "matmulnbits", overwrite=True)
    acc4 = to_onnx(ep, work / "smollm2_int4_acc4.onnx", "matmulnbits", accuracy_level=4,
                   overwrite=True)
    qdq = to_onnx(ep, work / "smollm2_int4_qdq.onnx", "qdq", overwrite=True)
    fp32_bytes = float_onnx(copy.deepcopy(model), work / "smollm2_fp32.onnx", prompt[:, :8])
    with torch.no_grad():
        ref_int4 = qmodel(input_ids=prompt, use_cache=False).logits.numpy()
        ref_fp32 = model(input_ids=prompt, use_cache=False).logits.numpy()

    # name: (file, ONNX Runtime's accuracy level for DequantizeLinear+MatMul fusions, reference)
    variants = {
        "fp32 (MatMul)": (work / "smollm2_fp32.onnx", None, ref_fp32),
        "INT4 MatMulNBits, accuracy_level 0": (int4.path, None, ref_int4),
        "INT4 MatMulNBits, accuracy_level 4": (acc4.path, None, ref_int4),
        "INT4 QDQ (fused by ORT, level 0)": (qdq.path, 0, ref_int4),
    }
    sessions, checks = {}, []
    for name, (path, level, ref) in variants.items():
        sessions[name] = session(path, args.threads, level)
        got = sessions[name].run(None, {"input_ids": prompt.numpy()})[0]
        err = float(np.abs(got - ref).max())
        same = float((got.argmax(-1) == ref.argmax(-1)).mean())
        checks.append(f"| {name} | {err:.2e} | {same:.0%} |")
    rows, load = [], [os.getloadavg()[0]]
    for seq in args.seqs:
        medians = time_interleaved(sessions, seq, args.iters if seq > 1 else 5 * args.iters)
        for name, sec in medians.items():
            rows.append(f"| {name} | 1 x {seq} | {sec * 1e3:.1f} | {seq / sec:.1f} |")
            print(rows[-1], flush=True)
    del sessions
    load.append(os.getloadavg()[0])
    kernels = []
    for name, (path, level, _) in variants.items():
        ms = kernel_ms(path, args.threads, level, seq=1)
        gemm = ms.get("MatMul", 0.0) + ms.get("MatMulNBits", 0.0)
        kernels.append(f"| {name} | {ms.get('MatMulNBits', 0.0):.1f} | {ms.get('MatMul', 0.0):.1f} "
                       f"| {sum(ms.values()) - gemm:.1f} | {sum(ms.values()):.1f} |")

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    bf16_int4_linears = sum(2 * m.out_features * m.in_features for m in qmodel.modules()
                            if isinstance(m, awq_compile.Int4Linear))
    lines = [
        f"ONNX Runtime {ort.__version__} CPUExecutionProvider, {args.threads} threads, {cpu}; "
        f"SmolLM2-135M, {args.quant.upper()} INT4 g={args.group_size} asymmetric, lm_head float; "
        f"median of {args.iters} runs (5x that for seq 1), the variants taking turns; 1-minute "
        f"load average {load[0]:.1f} before and {load[-1]:.1f} after the timing (other jobs "
        "share these cores).",
        "",
        "| model | shape (batch x seq) | latency ms | tokens/s |",
        "|---|---|---|---|",
        *rows,
        "",
        "Where the time of one token (1 x 1) goes, from ONNX Runtime's profiler (ms per forward; "
        "MatMul includes the float lm_head, 49152 x 576, and attention; the rest is ~2200 small "
        "ops); the gap to the latency above is the executor's own overhead:",
        "",
        "| model | MatMulNBits | MatMul | other ops | all kernels |",
        "|---|---|---|---|---|",
        *kernels,
        "",
        "Correctness before timing (logits of a 13-token prompt vs torch: the INT4 files vs the "
        "torch INT4 model, fp32 vs torch fp32):",
        "",
        "| model | max abs logit error | same argmax |",
        "|---|---|---|",
        *checks,
        "",
        f"Files: fp32 {fp32_bytes / 1e6:.1f} MB, INT4 MatMulNBits {int4.nbytes / 1e6:.1f} MB, "
        f"INT4 QDQ {qdq.nbytes / 1e6:.1f} MB "
        f"(the quantized linears would be {bf16_int4_linears / 1e6:.1f} MB in bf16; the float "
        "embedding, tied to lm_head, is 113 MB of either file).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
