"""Steps the `awq-compile` commands share (awq_compile/cli.py): loading models and text,
picking a group size, quantizing, measuring. Each raises ValueError / OSError with a one-line
message for bad input, which the command line prints as `awq-compile: error: ...`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GROUP_SIZES = (128, 64, 32)


def _load(spec: str, args):
    """(model, tokenizer) for 'smollm2', a Hugging Face folder or an AWQ checkpoint folder, in
    args.dtype on args.device."""
    from .checkpoint import is_awq_checkpoint, load_quantized

    dtype, device = _DTYPES[args.dtype], _device(args.device)
    if spec != "smollm2" and is_awq_checkpoint(spec):
        model, tokenizer = load_quantized(spec, dtype=dtype)
        if tokenizer is None:
            raise ValueError(f"checkpoint {spec} has no tokenizer files: save it with a tokenizer")
    else:
        from .models import load_model

        model, tokenizer = load_model(spec, dtype=dtype)
    return model.to(device), tokenizer


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {_first_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse an output folder up front, before minutes of quantization."""
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} exists and is not an empty folder (pass --overwrite)")


def _calibration_text(args) -> str:
    from .calib import calibration_text, read_text_file

    if args.calib_file is not None:
        return read_text_file(args.calib_file)
    if args.dataset is not None:
        return _dataset_text(args.dataset, args.dataset_config, args.split, args.text_column)
    return calibration_text()


def _dataset_text(name: str, config: str | None, split: str, column: str) -> str:
    """One text from a datasets dataset: the column's non-empty rows joined by blank lines."""
    import datasets
    from tqdm.auto import tqdm

    try:
        if Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, bad config)
        raise ValueError(f"dataset {name!r}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    if column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; it has {ds.column_names}")
    rows = [r for r in tqdm(ds[column], desc="calibration rows", unit="row") if r and r.strip()]
    if not rows:
        raise ValueError(f"dataset {name!r}: column {column!r} has no text")
    return "\n\n".join(rows)


def _linear_shapes(model, skip) -> dict[str, tuple[int, int]]:
    from torch import nn

    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(n.endswith(s) for s in skip)}


def _pick_group_size(model, requested: int | None, skip) -> int:
    """The group size, checked up front: the checkpoint layout needs it to divide every K."""
    shapes = _linear_shapes(model, skip)
    if not shapes:
        raise ValueError("the model has no linear layers to quantize (check --skip)")
    ks = sorted({k for _, k in shapes.values()})
    fits = [g for g in _GROUP_SIZES if all(k % g == 0 for k in ks)]
    if requested is not None and requested not in fits:
        hint = f"; use --group-size {fits[0]}" if fits else ""
        raise ValueError(f"--group-size {requested} does not divide every linear's K {ks}, which "
                         f"the AWQ checkpoint layout needs{hint}")
    if not fits:
        raise ValueError(f"no supported group size (128, 64, 32) divides every linear's K {ks}")
    bad_n = sorted({n for n, _ in shapes.values() if n % 8})
    if bad_n:
        raise ValueError(f"linears with N={bad_n} (not a multiple of 8) cannot be saved in the AWQ "
                         "checkpoint layout; leave them in float with --skip")
    return requested or fits[0]


def _awq_config(args, group_size: int):
    from .config import AWQConfig

    return AWQConfig(group_size=group_size, zero_point=not args.symmetric, clip=not args.no_clip,
                     n_grid=args.n_grid, n_samples=args.n_samples, seq_len=args.seq_len,
                     max_search_tokens=args.max_search_tokens, seed=args.seed, skip=tuple(args.skip))


def _quantize(model, tokenizer, text: str, config):
    """Sample calibration windows and run AWQ; returns (qmodel, seconds)."""
    from .api import quantize
    from .calib import sample_calibration

    ids = sample_calibration(tokenizer, text, config.n_samples, config.seq_len, config.seed)
    t0 = time.perf_counter()
    qmodel = quantize(model, calibration=ids, config=config, progress=True)
    return qmodel, time.perf_counter() - t0


def _eval_text(path: Path | None) -> str:
    from .calib import evaluation_text, read_text_file

    return read_text_file(path) if path is not None else evaluation_text()


def _ppl(model, tokenizer, text: str, seq_len: int, windows: int) -> float:
    from .evaluate import perplexity

    _check_positive(seq_len=seq_len, windows=windows)
    return perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=windows, progress=True)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _weight_bytes(model, names) -> int:
    """Bytes of the parameters and buffers held by the modules `names`."""
    total = 0
    for n in names:
        m = model.get_submodule(n)
        total += sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    return total


def _latency_ms(model, seq_len: int, repeat: int) -> float:
    """Median wall time of one no-cache forward over [1, seq_len] token ids."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        model(ids, use_cache=False)  # warm-up
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            sync()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
