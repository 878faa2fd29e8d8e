"""Hugging Face AWQ checkpoints ("gemm" layout), written and read by awq_compile.

A checkpoint is a folder that vLLM and transformers recognize as an AutoAWQ model:

    config.json          the model's config + quantization_config = {"quant_method": "awq",
                         "version": "gemm", "bits": 4, "group_size": g, "zero_point": true,
                         "modules_to_not_convert": [...], "awq_compile": AWQConfig.to_dict()}
    model.safetensors    <linear>.qweight int32 [K, N/8], <linear>.qzeros int32 [K/g, N/8],
                         <linear>.scales [K/g, N], <linear>.bias; every other tensor as is
                         (norm weights changed: AWQ folded its scales into them)
    tokenizer files      when a tokenizer is given

    save_quantized(qmodel, "out/", tokenizer)
    model, tokenizer = load_quantized("out/")        # eager model with Int4Linear layers
    apply_checkpoint(float_model, "out/")            # the same, into a model you already hold

The layout is docs/format.md's; docs/checkpoints.md says what is refused and why. Reads use
safetensors only (never pickle); writes go to a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import AWQConfig
from .nn import Int4Linear
from ._checkpoint_read import (  # noqa: F401  (Checkpoint, is_awq_checkpoint: re-exported)
    WEIGHTS_NAME,
    Checkpoint,
    CheckpointError,
    QuantizedLinearState,
    _GROUP_SIZES,
    is_awq_checkpoint,
    read_checkpoint,
)
from .quant import QuantizedWeight, to_autoawq

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "QuantizedLinearState",
    "save_quantized",
    "load_quantized",
    "read_checkpoint",
    "apply_checkpoint",
    "is_awq_checkpoint",
]

# ----------------------------------------------------------------------------- writing


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    allow_input_scale: bool = False,
) -> Path:
    """Write a quantized model (with `model.awq_config`) as an AutoAWQ "gemm" checkpoint.

    Refuses a non-empty `out_dir` unless `overwrite`; the folder is written aside and renamed
    into place, so `out_dir` never holds half a checkpoint. `allow_input_scale=True` stores
    explicit input scales as `<linear>.input_scale`, which only awq_compile reads (vLLM and
    transformers would ignore them and compute wrong outputs), so by default they are refused.

    >>> save_quantized(qmodel, "smollm2-awq", tokenizer)  # doctest: +SKIP
    """
    config = getattr(model, "awq_config", None)
    if not isinstance(config, AWQConfig):
        raise CheckpointError(
            "save_quantized: the model has no awq_config; quantize it with awq_compile.quantize "
            "first (or set model.awq_config)"
        )
    hf = getattr(model, "config", None)
    if hf is None or not hasattr(hf, "to_dict"):
        raise CheckpointError("save_quantized: the model has no Hugging Face `config`")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"save_quantized: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"save_quantized: {out} is not empty (pass overwrite=True to replace it)")
    tensors, float_linears = _checkpoint_tensors(model, config, allow_input_scale)
    config_dict = _hf_config_dict(model, config, float_linears)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    try:
        _write_folder(tmp, model, tensors, config, config_dict, tokenizer)
        _normal_permissions(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _checkpoint_tensors(
    model: nn.Module, config: AWQConfig, allow_input_scale: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in AutoAWQ layout: Int4Linear buffers become qweight/qzeros/scales."""
    tensors: dict[str, torch.Tensor] = {}
    int4_names, float_linears = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, Int4Linear):
            int4_names.add(name)
            tensors.update(_linear_tensors(name, mod, config, allow_input_scale))
        elif isinstance(mod, nn.Linear):
            float_linears.append(name)
    if not int4_names:
        raise CheckpointError("save_quantized: the model has no Int4Linear layer to save")
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in int4_names:
            continue
        alias = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and alias in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen[alias] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    return tensors, float_linears


def _linear_tensors(
    name: str, mod: Int4Linear, config: AWQConfig, allow_input_scale: bool
) -> dict[str, torch.Tensor]:
    n, k, g = mod.out_features, mod.in_features, mod.group_size
    if k % g or n % 8:
        fits = [c for c in _GROUP_SIZES if k % c == 0]
        hint = f" (e.g. AWQConfig(group_size={fits[0]}))" if fits else ""
        raise CheckpointError(
            f"save_quantized: {name} has K={k}, N={n}, group_size={g}; the AutoAWQ layout needs "
            f"K % group_size == 0 and N % 8 == 0 (it has no padding rule). Quantize with a group "
            f"size that divides every K{hint}: for SmolLM2 (K=576) use 64 or 32"
        )
    if mod.input_scale is not None and not allow_input_scale:
        raise CheckpointError(
            f"save_quantized: {name} has an input_scale (AWQ's explicit x*s where no upstream op "
            "absorbed its scales); the AutoAWQ layout has no such tensor, so vLLM and transformers "
            "would compute wrong outputs. Pass allow_input_scale=True to store it as "
            f"'{name}.input_scale' (read back by awq_compile only)"
        )
    scales = mod.scales.detach().cpu()
    stored = scales.to(config.torch_dtype)
    if not torch.equal(stored.to(scales.dtype), scales):
        raise CheckpointError(
            f"save_quantized: {name}.scales ({scales.dtype}) are not exactly representable in the "
            f"config's compute_dtype {config.compute_dtype}"
        )
    qw = QuantizedWeight(mod.qweight.detach().cpu(), stored, mod.zeros.detach().cpu(), k)
    out = {f"{name}.{key}": t.contiguous() for key, t in to_autoawq(qw).items()}
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
    if mod.input_scale is not None:
        out[f"{name}.input_scale"] = mod.input_scale.detach().cpu().contiguous()
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _hf_config_dict(model: nn.Module, config: AWQConfig, float_linears: list[str]) -> dict:
    d = model.config.to_dict()
    d.pop("quantization_config", None)
    d["dtype"] = str(_float_dtype(model)).removeprefix("torch.")
    d.pop("torch_dtype", None)
    d["quantization_config"] = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": config.bits,
        "group_size": config.group_size,
        # qzeros are always stored (8 for symmetric configs), so readers must apply them.
        "zero_point": True,
        "modules_to_not_convert": float_linears or None,
        "awq_compile": config.to_dict(),
    }
    return d


def _write_folder(tmp: Path, model, tensors, config: AWQConfig, config_dict, tokenizer) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "awq_compile": config.to_json()})
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_file"):
        gen.to_json_file(str(tmp / "generation_config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _normal_permissions(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only files; a checkpoint gets the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out. An existing out is first renamed aside, then deleted: out is never a
    mix of old and new files, and a crash leaves either the old or the new checkpoint."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- applying


def apply_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Checkpoint) -> nn.Module:
    """Load a checkpoint into `model` (same architecture, float or quantized): each linear the
    checkpoint quantized becomes an Int4Linear, every other tensor is copied in (strictly), and
    `model.awq_config` is set. Returns the model, in eval mode."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    _check_model_type(model, ck)
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for name, state in ck.linears.items():
            replaced.append((name, _replace_linear(model, name, state)))
        _load_other_tensors(model, ck)  # checks every key and shape before it copies any
    except Exception:
        for name, old in reversed(replaced):  # a mismatch leaves the model as it was
            _set_submodule(model, name, old)
        raise
    model.awq_config = ck.awq_config
    return model.eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_model_type(model: nn.Module, ck: Checkpoint) -> None:
    want = ck.hf_config.get("model_type")
    have = getattr(getattr(model, "config", None), "model_type", None)
    if want and have and want != have:
        raise CheckpointError(
            f"checkpoint {ck.path} is a {want!r} model but the model is {have!r}"
        )


def _replace_linear(model: nn.Module, name: str, state: QuantizedLinearState) -> nn.Module:
    """Swap in the checkpoint's Int4Linear; returns the module it replaced."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(
            f"checkpoint has a quantized linear {name!r} but the model has no such module: "
            "does the checkpoint match the model?"
        ) from None
    if not isinstance(old, (nn.Linear, Int4Linear)):
        raise CheckpointError(f"checkpoint: {name} is a {type(old).__name__}, not a linear layer")
    new = state.to_module()
    if (old.out_features, old.in_features) != (new.out_features, new.in_features):
        raise CheckpointError(
            f"checkpoint: {name} is [{new.out_features}, {new.in_features}] in the checkpoint but "
            f"[{old.out_features}, {old.in_features}] in the model: does the checkpoint match the model?"
        )
    if (old.bias is None) != (new.bias is None):
        has = "has" if new.bias is not None else "has no"
        raise CheckpointError(f"checkpoint: {name} {has} bias, unlike the model's layer")
    device = old.qweight.device if isinstance(old, Int4Linear) else old.weight.device
    _set_submodule(model, name, new.to(device))
    return old


def _load_other_tensors(model: nn.Module, ck: Checkpoint) -> None:
    int4 = {n for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in int4}
    required, aliases, seen = set(), set(), {}
    for key, t in state.items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in seen:
            aliases.add(key)  # tied weights: optional in the file
        else:
            seen[ident] = key
            required.add(key)
    given = set(ck.tensors)
    missing = sorted(required - given)
    unexpected = sorted(given - required - aliases)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ck.path} does not match the model: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    for key in sorted(given):
        if tuple(ck.tensors[key].shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"checkpoint: {key} is {tuple(ck.tensors[key].shape)} in the checkpoint but "
                f"{tuple(state[key].shape)} in the model"
            )
    model.load_state_dict(ck.tensors, strict=False)


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Build the model a checkpoint describes and load it: `(model, tokenizer or None)`.

    `dtype` sets the non-quantized weights' dtype (default: config.json's); INT4 tensors and
    scales stay as stored. transformers builds the skeleton without its own AWQ integration.

    >>> model, tokenizer = load_quantized("smollm2-awq")  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ck = read_checkpoint(path)
    d = dict(ck.hf_config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{ck.path / 'config.json'}: no model_type")
    if dtype is None:
        name = d.get("dtype") or d.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{ck.path / 'config.json'}: unknown dtype {name!r}")
    d.pop("torch_dtype", None)
    d["dtype"] = dtype
    try:
        hf_config = AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ck.path / 'config.json'}: transformers cannot build it: {e}") from None
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    apply_checkpoint(model, ck)
    return model, _load_tokenizer(ck.path)


def _load_tokenizer(folder: Path):
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
