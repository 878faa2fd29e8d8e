"""Text for calibration and evaluation, and the calibration sampling rule.

Both texts ship inside the package (awq_compile/data, CC BY-SA 3.0, see its LICENSE.md), so a fresh
machine needs no download: calibration draws from the WikiText-2 *validation* split, evaluation uses
the *test* split, which does not overlap it.

    tokens = sample_calibration(tokenizer, calibration_text(), n_samples=128, seq_len=512)
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "calibration_text",
    "evaluation_text",
    "sample_calibration",
    "read_text_file",
    "tokenize_text",
    "CALIBRATION_FILE",
    "EVALUATION_FILE",
]

CALIBRATION_FILE = "wikitext2_tokenized_valid.txt"
EVALUATION_FILE = "wikitext2_raw_test.txt"


def _package_text(name: str) -> str:
    # Bytes then decode: text mode would translate newlines, and the evaluation text is byte-exact.
    return resources.files("awq_compile.data").joinpath(name).read_bytes().decode("utf-8")


def calibration_text() -> str:
    """The shipped WikiText-2 validation split (word level), the default calibration text."""
    return _package_text(CALIBRATION_FILE)


def evaluation_text() -> str:
    """The shipped WikiText-2 raw test split, joined as the Hugging Face `datasets` rows are.

    Each line of `wiki.test.raw` is one row ("" for a blank line, else the line plus its newline)
    and the rows are joined with "\\n\\n": the text GPTQ / AWQ perplexities are quoted on.
    """
    lines = _package_text(EVALUATION_FILE).split("\n")[:-1]
    rows = ["" if not line.strip() else line + "\n" for line in lines]
    return "\n\n".join(rows)


def read_text_file(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; raises if the file is missing or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist")
    text = p.read_bytes().decode("utf-8")
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole `text` as one 1-D LongTensor of token ids, without BOS or any special token."""
    # verbose=False: a long text always exceeds model_max_length, and we window it ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration(
    tokenizer, text: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens from `text`, as a LongTensor [n_samples, seq_len].

    The rule: the whole text is tokenized once (no special tokens) into T tokens; window i starts at
    `starts[i]`, where `starts = torch.randint(0, T - seq_len + 1, (n_samples,), generator=g)` and
    `g = torch.Generator().manual_seed(seed)`. Windows may overlap; the same (text, tokenizer,
    n_samples, seq_len, seed) always gives the same tensor.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(
            f"n_samples and seq_len must be positive, got n_samples={n_samples}, seq_len={seq_len}"
        )
    if not text.strip():
        raise ValueError("calibration text is empty")
    tokens = tokenize_text(tokenizer, text)
    if tokens.numel() < seq_len:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens, fewer than seq_len={seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
