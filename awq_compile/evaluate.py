"""Perplexity the way GPTQ / AWQ papers quote it, so our figures compare with theirs.

    ppl = perplexity(model, tokenizer, evaluation_text(), seq_len=512, max_windows=40)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .calib import tokenize_text

__all__ = ["perplexity", "logits_of"]


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: `.logits`, else the first item of a tuple/list, else `out`."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _device_of(model) -> torch.device:
    # A bare callable or a parameter-free GraphModule has no device of its own: run on the CPU.
    for tensor in _first_tensors(model):
        return tensor.device
    return torch.device("cpu")


def _first_tensors(model):
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()


def _forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        # No KV cache: it is never reused here and would hold memory for every layer.
        return logits_of(model(input_ids, use_cache=False))
    return logits_of(model(input_ids))


def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_windows: int | None = 40,
    progress: bool = True,
) -> float:
    """exp of the mean next-token cross-entropy of `model` over `text`.

    The text is tokenized once (no BOS, no special tokens) and cut into non-overlapping windows of
    `seq_len` tokens (stride = seq_len; a partial last window is dropped); the first `max_windows`
    windows are used (None: all). Each window predicts its tokens 1..seq_len-1 from its own context
    only, and the loss is averaged over all predicted tokens. `model(input_ids)` may return an HF
    output, a tuple whose first item is the logits, or the logits themselves.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one token predicted), got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    tokens = tokenize_text(tokenizer, text)
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)

    device = _device_of(model)
    total_nll = 0.0
    with torch.inference_mode():
        for window in _maybe_tqdm(windows, progress, n_windows):
            ids = window.unsqueeze(0).to(device)
            logits = _forward(model, ids)
            # Float32 loss whatever the model dtype, summed in float64: 600 windows of fp16 sums drift.
            nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            total_nll += nll.item()
    return math.exp(total_nll / (n_windows * (seq_len - 1)))


def _maybe_tqdm(windows: torch.Tensor, progress: bool, total: int):
    if not progress:
        return windows
    from tqdm.auto import tqdm

    return tqdm(windows, total=total, desc="perplexity", unit="window")
