"""The `awq-compile` command line (also `python -m awq_compile`).

    awq-compile demo                                   quantize SmolLM2, print before/after
    awq-compile quantize --out smollm2-awq             the embedded SmolLM2, shipped calibration text
    awq-compile quantize --model ./my-llama --calib-file corpus.txt --group-size 64 --out ./q
    awq-compile eval smollm2-awq                       perplexity on the shipped WikiText-2 test text
    awq-compile bench smollm2-awq --base smollm2       float vs INT4: perplexity, latency, bytes
    awq-compile export smollm2-awq --format onnx --out smollm2-awq.onnx

Expected failures (bad paths, bad flags, unreadable checkpoints) print one line,
`awq-compile: error: <message>`, on stderr and exit with status 2. docs/cli.md has the details.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ._cli_steps import (
    _awq_config,
    _calibration_text,
    _check_out,
    _check_positive,
    _device,
    _DTYPES,
    _eval_text,
    _first_line,
    _GROUP_SIZES,
    _latency_ms,
    _linear_shapes,
    _load,
    _mib,
    _pick_group_size,
    _ppl,
    _quantize,
    _table,
    _weight_bytes,
)

__all__ = ["main", "build_parser"]

PROG = "awq-compile"
# Bad input surfaces as these; anything else is a bug and keeps its traceback.
_EXPECTED_ERRORS = (ValueError, OSError, ImportError)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to look) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _OneLineParser(
        prog=PROG, formatter_class=fmt,
        description="AWQ INT4 weight quantization for Hugging Face causal LMs, as a PyTorch "
                    "compiler pass.",
        epilog="Run 'awq-compile <command> --help' for a command's options. Docs: docs/cli.md",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    q = sub.add_parser("quantize", formatter_class=fmt, help="quantize a model and save an AWQ checkpoint",
                       description="Quantize a model's linear layers to INT4 with AWQ and save a "
                                   "Hugging Face AWQ checkpoint (AutoAWQ 'gemm' layout).",
                       epilog=_CALIBRATION_RULE)
    _add_model(q)
    _add_calibration(q)
    _add_config(q)
    q.add_argument("--out", required=True, type=Path, help="output folder for the checkpoint")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    q.add_argument("--allow-input-scale", action="store_true",
                   help="store explicit input scales as <linear>.input_scale (read by awq_compile "
                        "only; vLLM/transformers would ignore them)")

    e = sub.add_parser("eval", formatter_class=fmt, help="perplexity of a model or checkpoint on a text",
                       description="Perplexity of a float model or an AWQ checkpoint: the text is "
                                   "cut into non-overlapping windows of --seq-len tokens.")
    e.add_argument("model", help="'smollm2', a Hugging Face model folder or an AWQ checkpoint folder")
    e.add_argument("--text", type=Path, help="UTF-8 text file (default: the shipped WikiText-2 test split)")
    _add_eval_window(e, windows=40)
    _add_dtype(e)

    x = sub.add_parser("export", formatter_class=fmt, help="export a checkpoint (onnx / tensorrt / pt2)",
                       description="Export an AWQ checkpoint ahead of time, weights kept INT4.",
                       epilog="formats:\n"
                              "  onnx      ONNX, each INT4 linear as com.microsoft::MatMulNBits (ONNX Runtime)\n"
                              "            or, with --onnx-op qdq, as int4/uint4 DequantizeLinear + MatMul\n"
                              "  tensorrt  fp16 ONNX in TensorRT's INT4 form: signed int4 DequantizeLinear, no\n"
                              "            zero points (an exact correction term where needed); build the\n"
                              "            engine with trtexec --onnx=FILE --stronglyTyped\n"
                              "  engine    a serialized TensorRT engine (needs TensorRT and an NVIDIA GPU)\n"
                              "  pt2       torch.export program (torch.export.load after import awq_compile)")
    x.add_argument("checkpoint", type=Path, help="AWQ checkpoint folder (from 'awq-compile quantize')")
    x.add_argument("--format", choices=("onnx", "tensorrt", "engine", "pt2"), default="onnx",
                   help="output format (default: %(default)s)")
    x.add_argument("--onnx-op", choices=("matmulnbits", "qdq"), default="matmulnbits",
                   help="how --format onnx writes INT4 linears (default: %(default)s)")
    x.add_argument("--out", required=True, type=Path, help="output file")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument("--seq-len", type=int, default=16,
                   help="example sequence length; the exported sequence length is dynamic "
                        "(default: %(default)s)")

    b = sub.add_parser("bench", formatter_class=fmt, help="float vs INT4: perplexity, latency, bytes",
                       description="Compare a float model with its AWQ checkpoint on a few windows of "
                                   "the evaluation text, and time one forward pass of each.")
    b.add_argument("checkpoint", type=Path, help="AWQ checkpoint folder")
    b.add_argument("--base", help="the float model it came from: 'smollm2' or a folder (default: the "
                                  "checkpoint's config.json _name_or_path if that folder exists, "
                                  "else smollm2)")
    b.add_argument("--text", type=Path, help="UTF-8 text file (default: the shipped WikiText-2 test split)")
    _add_eval_window(b, windows=8)
    b.add_argument("--repeat", type=int, default=5, help="timed forward passes (default: %(default)s)")
    _add_dtype(b)

    d = sub.add_parser("demo", formatter_class=fmt, help="quantize SmolLM2 and print a before/after table",
                       description="Quantize the embedded SmolLM2-135M with the shipped calibration "
                                   "text and print perplexity, linear weight bytes and quantization "
                                   "time, float vs INT4.", epilog=_CALIBRATION_RULE)
    d.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    d.add_argument("--n-samples", type=int, default=DEMO_N_SAMPLES,
                   help="calibration windows (default: %(default)s; AWQ's published setting is 128)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: %(default)s)")
    d.add_argument("--max-search-tokens", type=int, default=DEMO_SEARCH_TOKENS,
                   help="tokens kept per scale group for the search (default: %(default)s; "
                        "quantize's default is 4096)")
    d.add_argument("--group-size", type=int, choices=_GROUP_SIZES, help="default: the largest that divides every K")
    d.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens (default: %(default)s)")
    d.add_argument("--out", type=Path, help="also save the checkpoint to this folder")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    d.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default: %(default)s)")
    _add_dtype(d)
    return parser


# The demo's defaults keep a CPU run short (docs/cli.md has a measured run); quantize's are AWQ's
# published ones.
DEMO_N_SAMPLES = 16
DEMO_SEARCH_TOKENS = 1024

_CALIBRATION_RULE = """\
calibration sampling rule:
  The calibration text is tokenized once, without special tokens, into T tokens. With
  g = torch.Generator().manual_seed(SEED), the windows start at
  torch.randint(0, T - SEQ_LEN + 1, (N_SAMPLES,), generator=g); each is SEQ_LEN tokens long.
  Windows may overlap. The same text, tokenizer, N_SAMPLES, SEQ_LEN and SEED always give the
  same calibration set. A datasets dataset is first turned into one text: its --text-column
  values, empty rows dropped, joined with blank lines ("\\n\\n")."""


def _add_model(p) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model "
                        "folder (default: %(default)s)")
    _add_dtype(p)


def _add_dtype(p) -> None:
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="dtype of the model's float weights (default: %(default)s)")
    p.add_argument("--device", default="cpu",
                   help="torch device to run on, e.g. cuda (default: %(default)s; the CUDA INT4 "
                        "kernels want --dtype float16 or bfloat16)")


def _add_calibration(p) -> None:
    g = p.add_argument_group("calibration (default: the shipped WikiText-2 validation text)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--calib-file", type=Path, metavar="PATH", help="UTF-8 text file")
    src.add_argument("--dataset", metavar="NAME_OR_PATH",
                     help="a datasets dataset: a folder saved with save_to_disk, a local data "
                          "folder/file, or a hub name where a hub is reachable")
    g.add_argument("--dataset-config", metavar="NAME", help="dataset configuration name")
    g.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    g.add_argument("--text-column", default="text", help="dataset column with the text (default: %(default)s)")
    g.add_argument("--n-samples", type=int, default=128, help="calibration windows (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")


def _add_config(p) -> None:
    g = p.add_argument_group("AWQ configuration (awq_compile.AWQConfig)")
    g.add_argument("--group-size", type=int, choices=_GROUP_SIZES,
                   help="quantization group size (default: the largest of 128/64/32 that divides "
                        "every quantized linear's K, as the checkpoint layout needs)")
    g.add_argument("--symmetric", action="store_true", help="symmetric INT4 (no zero point)")
    g.add_argument("--no-clip", action="store_true", help="skip the weight clipping search")
    g.add_argument("--n-grid", type=int, default=20, help="scale search grid points (default: %(default)s)")
    g.add_argument("--max-search-tokens", type=int, default=4096,
                   help="calibration tokens kept per scale group for the search; the search's "
                        "time grows with it (default: %(default)s)")
    g.add_argument("--skip", nargs="*", default=["lm_head"], metavar="SUFFIX",
                   help="linears left in float, by module-name suffix (default: lm_head)")


def _add_eval_window(p, windows: int) -> None:
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    p.add_argument("--windows", type=int, default=windows,
                   help="number of windows evaluated (default: %(default)s)")


# ----------------------------------------------------------------------------- commands


def _cmd_quantize(args) -> int:
    from .checkpoint import save_quantized

    _check_positive(n_samples=args.n_samples, seq_len=args.seq_len, n_grid=args.n_grid,
                    max_search_tokens=args.max_search_tokens)
    _check_out(args.out, args.overwrite)
    text = _calibration_text(args)
    model, tokenizer = _load(args.model, args)
    config = _awq_config(args, _pick_group_size(model, args.group_size, args.skip))
    qmodel, seconds = _quantize(model, tokenizer, text, config)
    save_quantized(qmodel, args.out, tokenizer, overwrite=args.overwrite,
                   allow_input_scale=args.allow_input_scale)
    print(f"quantized {args.model} in {seconds:.1f} s (group size {config.group_size}, "
          f"{config.n_samples} x {config.seq_len} calibration tokens) -> {args.out}")
    return 0


def _cmd_eval(args) -> int:
    text = _eval_text(args.text)
    model, tokenizer = _load(args.model, args)
    ppl = _ppl(model, tokenizer, text, args.seq_len, args.windows)
    print(f"perplexity {ppl:.4f}  ({args.model}, {args.windows} windows x {args.seq_len} tokens at most)")
    return 0


def _cmd_export(args) -> int:
    from .checkpoint import load_quantized

    _check_positive(seq_len=args.seq_len)
    if args.out.exists() and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists (pass --overwrite to replace it)")
    model, _ = load_quantized(args.checkpoint)
    example = (torch.zeros(1, args.seq_len, dtype=torch.long),)
    if args.format == "pt2":
        from .export import export  # lazy: the exporters are not needed elsewhere

        tmp = args.out.with_name(args.out.name + ".tmp")
        torch.export.save(export(model, example), str(tmp))
        os.replace(tmp, args.out)  # atomic: a failed export leaves no half-written file
    elif args.format == "onnx":
        from .onnx_export import to_onnx

        _print_routes(to_onnx(model, args.out, args.onnx_op, args=example,
                              overwrite=args.overwrite).routes)
    elif args.format == "tensorrt":
        from .tensorrt import tensorrt_onnx

        _print_routes(tensorrt_onnx(model, args.out, args=example, overwrite=args.overwrite).routes)
    else:
        from .tensorrt import to_tensorrt

        _print_routes(to_tensorrt(model, args.out, args=example, overwrite=args.overwrite).layers)
    print(f"exported {args.checkpoint} -> {args.out} ({args.format})")
    return 0


def _print_routes(routes: dict[str, str]) -> None:
    kinds = sorted(set(routes.values()))
    print(f"{len(routes)} INT4 linears written as {', '.join(kinds)}")


def _cmd_bench(args) -> int:
    from .nn import Int4Linear

    _check_positive(repeat=args.repeat)
    text = _eval_text(args.text)
    qmodel, tokenizer = _load(str(args.checkpoint), args)
    if not hasattr(qmodel, "awq_config"):
        raise ValueError(f"{args.checkpoint} is not an AWQ checkpoint")
    base_spec = args.base or _recorded_base(args.checkpoint)
    print(f"base model: {base_spec}")
    base, _ = _load(base_spec, args)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, Int4Linear)]
    rows = [("", "float", "INT4 (AWQ)")]
    ppl = [_ppl(m, tokenizer, text, args.seq_len, args.windows) for m in (base, qmodel)]
    rows.append((f"perplexity ({args.windows} x {args.seq_len} tokens)", *(f"{p:.3f}" for p in ppl)))
    ms = [_latency_ms(m, args.seq_len, args.repeat) for m in (base, qmodel)]
    rows.append((f"forward [1, {args.seq_len}], median of {args.repeat}", *(f"{t:.1f} ms" for t in ms)))
    rows.append((f"weights of the {len(names)} quantized linears",
                 _mib(_weight_bytes(base, names)), _mib(_weight_bytes(qmodel, names))))
    print(_table(rows))
    print(f"device: {_device_name(_device(args.device))}")
    return 0


def _cmd_demo(args) -> int:
    from .calib import calibration_text, evaluation_text
    from .checkpoint import save_quantized

    _check_positive(n_samples=args.n_samples, seq_len=args.seq_len, windows=args.windows)
    _check_out(args.out, args.overwrite)
    model, tokenizer = _load(args.model, args)
    group_size = _pick_group_size(model, args.group_size, ("lm_head",))
    config = _awq_config(argparse.Namespace(
        symmetric=False, no_clip=False, n_grid=20, skip=["lm_head"], n_samples=args.n_samples,
        seq_len=args.seq_len, max_search_tokens=args.max_search_tokens, seed=args.seed), group_size)
    print(f"calibration: {args.n_samples} windows x {args.seq_len} tokens of the shipped WikiText-2 "
          f"validation text, {args.max_search_tokens} tokens per scale search: small settings to "
          "keep a CPU run short (AWQ's published setting, which 'awq-compile quantize' uses: "
          "--n-samples 128 --max-search-tokens 4096)")
    text = evaluation_text()
    ppl_float = _ppl(model, tokenizer, text, 512, args.windows)
    qmodel, seconds = _quantize(model, tokenizer, calibration_text(), config)
    ppl_int4 = _ppl(qmodel, tokenizer, text, 512, args.windows)
    names = [n for n in _linear_shapes(model, config.skip)]
    rows = [("", args.dtype, f"INT4 AWQ (g={group_size})"),
            (f"perplexity, WikiText-2 test ({args.windows} x 512 tokens)", f"{ppl_float:.3f}", f"{ppl_int4:.3f}"),
            (f"weights of the {len(names)} quantized linears",
             _mib(_weight_bytes(model, names)), _mib(_weight_bytes(qmodel, names))),
            ("quantization wall time", "-", f"{seconds:.1f} s")]
    print(_table(rows))
    if args.out is not None:
        save_quantized(qmodel, args.out, tokenizer, overwrite=args.overwrite)
        print(f"checkpoint saved to {args.out}")
    return 0


def _recorded_base(checkpoint: Path) -> str:
    import json

    recorded = json.loads((checkpoint / "config.json").read_text()).get("_name_or_path") or ""
    return recorded if recorded and Path(recorded).is_dir() else "smollm2"


def _device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def _quiet_transformers() -> None:
    """Our own progress bars (calibration, search, evaluation) are the ones worth seeing."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


_COMMANDS = {"quantize": _cmd_quantize, "eval": _cmd_eval, "export": _cmd_export,
             "bench": _cmd_bench, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 on success, 2 on an expected error)."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return _COMMANDS[args.command](args)
    except _EXPECTED_ERRORS as e:
        print(f"{PROG}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
