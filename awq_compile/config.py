"""The one configuration object of awq_compile.

`AWQConfig` is frozen and versioned: it travels inside every artifact (checkpoint metadata, ONNX
`metadata_props`) and loaders read it from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = ["AWQConfig", "Int4Format", "CONFIG_VERSION"]

CONFIG_VERSION = 1

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Int4Format(str, Enum):
    """How an INT4 linear's weight is laid out in memory (see docs/format.md)."""

    NK_U8 = "nk_u8"
    """qweight uint8 [N, Kp/2]: row n holds input channels k = 2b (low nibble) and 2b+1 (high
    nibble) of byte b; scales [N, Kp/g] in the compute dtype; zeros uint8 [N, Kp/g] in 0..15.
    Kp = K rounded up to the group size; padded positions hold the zero point (dequantize to 0)."""


@dataclass(frozen=True)
class AWQConfig:
    """What to quantize and how.

    >>> AWQConfig(group_size=64).group_size
    64
    """

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    """Asymmetric quantization with an integer zero point, AWQ's `(q - z) * s`. False: symmetric,
    q in [-8, 7], stored as q + 8 with a fixed zero point of 8."""
    n_grid: int = 20
    duo_scaling: bool = True
    """Scale search uses s = s_x^a / s_w^(1-a) (AutoAWQ's duo scaling) instead of s_x^a alone."""
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_separate_bounds: bool = True
    """With zero_point, search the clip's lower and upper bounds separately (a 2-D grid of
    clip_grid * clip_max_shrink steps each) instead of one symmetric [-m, m] as AWQ does."""
    n_samples: int = 128
    seq_len: int = 512
    max_search_tokens: int = 4096
    """Token rows kept per scale group for the scale search (memory: tokens x K x 4 bytes)."""
    max_clip_tokens: int = 512
    skip: tuple[str, ...] = ("lm_head",)
    """Linears left in floating point, matched by parameter-name suffix of the weight's owner."""
    compute_dtype: str = "float16"
    """dtype of the stored scales (and of INT4 compute on the GPU)."""
    pad_k: bool = True
    """Pad K up to a multiple of the group size (the last group is partial). False: raise."""
    format: Int4Format = Int4Format.NK_U8
    seed: int = 0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"AWQConfig.bits={self.bits!r}: only 4-bit quantization is supported")
        if self.group_size not in (32, 64, 128):
            raise ValueError(
                f"AWQConfig.group_size={self.group_size!r}: supported group sizes are 32, 64, 128"
            )
        for name in ("zero_point", "duo_scaling", "clip", "clip_separate_bounds", "pad_k"):
            if not isinstance(getattr(self, name), bool):  # "false" from a file is truthy
                raise ValueError(f"AWQConfig.{name}={getattr(self, name)!r}: must be True or False")
        _check_positive("n_grid", self.n_grid)
        _check_positive("clip_grid", self.clip_grid)
        _check_positive("n_samples", self.n_samples)
        _check_positive("seq_len", self.seq_len)
        _check_positive("max_search_tokens", self.max_search_tokens)
        _check_positive("max_clip_tokens", self.max_clip_tokens)
        if isinstance(self.clip_max_shrink, bool) or not isinstance(self.clip_max_shrink, (int, float)) \
                or not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(
                f"AWQConfig.clip_max_shrink={self.clip_max_shrink!r}: must be in [0, 1)"
            )
        if self.compute_dtype not in _DTYPES:
            raise ValueError(
                f"AWQConfig.compute_dtype={self.compute_dtype!r}: choose one of {sorted(_DTYPES)}"
            )
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"AWQConfig.skip={self.skip!r}: must be a tuple of name suffixes")
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "format", Int4Format(self.format))
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"AWQConfig.version={self.version!r}: this awq_compile reads version {CONFIG_VERSION}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["format"] = self.format.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AWQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AWQConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        d = dict(d)
        if "skip" in d:
            d["skip"] = tuple(d["skip"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "AWQConfig":
        return cls.from_dict(json.loads(s))


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"AWQConfig.{name}={value!r}: must be a positive integer")
