"""Reading awq_compile / AutoAWQ "gemm" checkpoints: the types and the parser behind
`awq_compile.checkpoint` (which re-exports everything public here).

Reads use safetensors only (never pickle). Every check raises CheckpointError naming the file
and what is wrong; docs/checkpoints.md lists them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import AWQConfig
from .nn import Int4Linear
from .quant import QuantizedWeight, from_autoawq

__all__ = ["CheckpointError", "Checkpoint", "QuantizedLinearState", "read_checkpoint",
           "is_awq_checkpoint", "WEIGHTS_NAME", "INDEX_NAME"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales")
_GROUP_SIZES = (32, 64, 128)


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, or does not match the model."""


@dataclass
class QuantizedLinearState:
    """One quantized linear as read from a checkpoint, already in awq_compile's NK_U8 layout."""

    weight: QuantizedWeight
    group_size: int
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    def to_module(self) -> Int4Linear:
        n = self.weight.qweight.shape[0]
        w = self.weight
        return Int4Linear(w.in_features, n, self.group_size, w.qweight, w.scales, w.zeros,
                          self.bias, self.input_scale)


@dataclass
class Checkpoint:
    """Everything in a checkpoint folder, parsed and validated (see `read_checkpoint`)."""

    path: Path
    hf_config: dict
    """config.json without its quantization_config."""
    quantization_config: dict
    awq_config: AWQConfig
    linears: dict[str, QuantizedLinearState] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Every tensor that is not part of a quantized linear, by state_dict name."""


def is_awq_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose config.json declares an AWQ quantization_config."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return str(qc.get("quant_method", "")).lower() == "awq"


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate a checkpoint folder; tensors come back in awq_compile's layout."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder}: no such folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder}: no config.json")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    qc = hf_config.pop("quantization_config", None)
    group_size = _check_quantization_config(cfg_path, qc)
    raw = _read_tensors(folder)
    linears, tensors = _split_linears(raw, group_size)
    awq_config = _awq_config(qc, linears)
    return Checkpoint(folder, hf_config, qc, awq_config, linears, tensors)


def _check_quantization_config(cfg_path: Path, qc) -> int:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: no quantization_config: not an AWQ checkpoint")
    method = str(qc.get("quant_method", "")).lower()
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if method != "awq":
        raise CheckpointError(f"{cfg_path}: quant_method {method!r} is not 'awq'")
    if version != "gemm":
        raise CheckpointError(
            f"{cfg_path}: AWQ version {version!r} is not supported; awq_compile reads 'gemm'"
        )
    if qc.get("bits", 4) != 4:
        raise CheckpointError(f"{cfg_path}: bits={qc.get('bits')!r}; awq_compile reads 4-bit only")
    g = qc.get("group_size")
    if g not in _GROUP_SIZES:
        raise CheckpointError(
            f"{cfg_path}: group_size={g!r} is not supported; awq_compile runs {list(_GROUP_SIZES)}"
        )
    return g


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {folder}: shard(s) listed in the index missing: {missing}")
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"checkpoint {folder}: only pickle weight files (*.bin/*.pt) found; awq_compile loads "
            "safetensors only (pickle can run code)"
        )
    raise FileNotFoundError(f"checkpoint {folder}: no {WEIGHTS_NAME}")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key in out:
                        raise CheckpointError(f"{f}: tensor {key!r} appears in two shards")
                    out[key] = fh.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(
                f"{f}: cannot read safetensors file (truncated or corrupt?): {e}"
            ) from None
    return out


def _split_linears(
    raw: dict[str, torch.Tensor], group_size: int
) -> tuple[dict[str, QuantizedLinearState], dict[str, torch.Tensor]]:
    prefixes = {k.rpartition(".")[0] for k in raw if k.endswith(".qweight")}
    linears = {}
    for p in sorted(prefixes):
        missing = [s for s in _QUANT_SUFFIXES if f"{p}.{s}" not in raw]
        if missing:
            raise CheckpointError(f"checkpoint: {p} has a qweight but no {', '.join(missing)}")
        qweight, qzeros, scales = (raw.pop(f"{p}.{s}") for s in _QUANT_SUFFIXES)
        try:
            qw = from_autoawq(qweight, qzeros, scales)
        except ValueError as e:
            raise CheckpointError(f"checkpoint: {p}: {e}") from None
        g = qw.in_features // scales.shape[0]
        if g != group_size:
            raise CheckpointError(
                f"checkpoint: {p} has group size {g} (K={qw.in_features}, {scales.shape[0]} groups) "
                f"but config.json says {group_size}"
            )
        bias = raw.pop(f"{p}.bias", None)
        input_scale = raw.pop(f"{p}.input_scale", None)
        linears[p] = QuantizedLinearState(qw, g, bias, input_scale)
    return linears, raw


def _awq_config(qc: dict, linears: dict[str, QuantizedLinearState]) -> AWQConfig:
    ours = qc.get("awq_compile")
    if isinstance(ours, dict):
        try:
            cfg = AWQConfig.from_dict(ours)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint: quantization_config.awq_compile is invalid: {e}") from None
        if cfg.group_size != qc["group_size"]:
            raise CheckpointError(
                f"checkpoint: awq_compile group_size {cfg.group_size} != quantization_config "
                f"group_size {qc['group_size']}"
            )
        return cfg
    # Written by another tool: rebuild what the tensors say (qzeros are read either way).
    scale_dtype = next(iter(linears.values())).weight.scales.dtype if linears else torch.float16
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(scale_dtype, "float32")
    skip = qc.get("modules_to_not_convert") or ["lm_head"]
    return AWQConfig(
        group_size=qc["group_size"],
        zero_point=bool(qc.get("zero_point", True)),
        compute_dtype=dtype_name,
        skip=tuple(skip),
    )
