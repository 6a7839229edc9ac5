"""The quantization modes of the KV cache. Each mode carries its whole spec, so adding one (INT4 is the obvious next)
means adding a member and its `ModeSpec`, and every place that branches on the mode raises until it handles it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

INT8_QMAX = 127.0
FP8_E4M3_QMAX = 448.0
# Floor of a per-token-head scale: an all-zero token-head must not divide by zero.
SCALE_FLOOR = 1e-6

# The integer constants the Triton kernels branch on (a constexpr per storage format).
KERNEL_INT8 = 0
KERNEL_FP8_E4M3 = 1


@dataclass(frozen=True)
class ModeSpec:
    """What a mode stores: ``storage_dtype`` codes, ``values_per_byte`` of them per byte, each ``x / scale`` with
    ``scale = max(absmax / qmax, SCALE_FLOOR)``; ``kernel_format`` is the constant the kernels branch on; ``short_name``
    the alias accepted everywhere a mode is named."""

    storage_dtype: torch.dtype
    qmax: float
    values_per_byte: int
    kernel_format: int
    short_name: str


class KVQuantMode(str, enum.Enum):
    """How keys and values are stored: one float32 scale per (batch, kv-head, token).

    The string values are the names vLLM's users already pass as ``kv_cache_dtype``; the short names ``"int8"`` and
    ``"fp8"`` are accepted too.
    """

    INT8_PER_TOKEN_HEAD = "int8_per_token_head"
    FP8_PER_TOKEN_HEAD = "fp8_per_token_head"

    @classmethod
    def parse(cls, mode: KVQuantMode | str) -> KVQuantMode:
        """A member, its name or its short name; anything else raises a `ValueError` listing the accepted names."""
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            for member in cls:
                if mode in (member.value, member.spec.short_name):
                    return member
        raise ValueError(f"unknown KV-cache quantization mode {mode!r}; accepted: {', '.join(map(repr, mode_names()))}")

    @classmethod
    def from_kernel_format(cls, kernel_format: int) -> KVQuantMode:
        """The mode whose `ModeSpec.kernel_format` is ``kernel_format`` (custom operators carry the mode as it)."""
        for member in cls:
            if member.spec.kernel_format == kernel_format:
                return member
        raise ValueError(f"no KV-cache mode has kernel format {kernel_format!r}")

    @property
    def spec(self) -> ModeSpec:
        try:
            return _SPECS[self]
        except KeyError:
            raise NotImplementedError(f"KV-cache mode {self.value!r} has no ModeSpec") from None

    @property
    def qmax(self) -> float:
        return self.spec.qmax

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.spec.storage_dtype

    @property
    def short_name(self) -> str:
        return self.spec.short_name


_SPECS = {
    KVQuantMode.INT8_PER_TOKEN_HEAD: ModeSpec(torch.int8, INT8_QMAX, 1, KERNEL_INT8, "int8"),
    KVQuantMode.FP8_PER_TOKEN_HEAD: ModeSpec(torch.float8_e4m3fn, FP8_E4M3_QMAX, 1, KERNEL_FP8_E4M3, "fp8"),
}


def mode_names() -> tuple[str, ...]:
    """Every accepted name: the canonical ones, then the short ones."""
    return (*(m.value for m in KVQuantMode), *(m.short_name for m in KVQuantMode))
