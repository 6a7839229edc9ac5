"""The quantization modes of the KV cache and their constants."""

from __future__ import annotations

import enum

import torch

INT8_QMAX = 127.0
FP8_E4M3_QMAX = 448.0
# Floor of a per-token-head scale: an all-zero token-head must not divide by zero.
SCALE_FLOOR = 1e-6


class KVQuantMode(str, enum.Enum):
    """How keys and values are stored: one float32 scale per (batch, kv-head, token).

    The string values are the names vLLM's users already pass as ``kv_cache_dtype``.
    """

    INT8_PER_TOKEN_HEAD = "int8_per_token_head"
    FP8_PER_TOKEN_HEAD = "fp8_per_token_head"

    @classmethod
    def parse(cls, mode: KVQuantMode | str) -> KVQuantMode:
        """Accepts a member or its string name; anything else raises a `ValueError` listing the names."""
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            try:
                return cls(mode)
            except ValueError:
                pass
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown KV-cache quantization mode {mode!r}; accepted: {accepted}")

    @property
    def qmax(self) -> float:
        return INT8_QMAX if self is KVQuantMode.INT8_PER_TOKEN_HEAD else FP8_E4M3_QMAX

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self is KVQuantMode.INT8_PER_TOKEN_HEAD else torch.float8_e4m3fn
