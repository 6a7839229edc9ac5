"""Kernels, each beside the plain-PyTorch reference that defines its math (`hf_kvquant.ops.reference`).

The Triton modules (`quantize_kernel`, `attention_kernel`) are imported on first use with CUDA tensors, so
`hf_kvquant` imports and runs without Triton (macOS, Windows, CPU-only images): there everything takes the reference.
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import torch

from ..modes import KVQuantMode
from .reference import quantize_into_reference


@functools.cache
def cuda_kernels() -> SimpleNamespace | None:
    """The Triton kernels (``quantize_into``, ``attention``), or None where Triton cannot be imported."""
    try:
        from .attention_kernel import quantized_attention
        from .quantize_kernel import quantize_into_triton
    except ImportError as e:
        warnings.warn(f"hf_kvquant: Triton cannot be imported ({e}); CUDA tensors take the plain-PyTorch path (slow)",
                      stacklevel=3)
        return None
    return SimpleNamespace(quantize_into=quantize_into_triton, attention=quantized_attention)


def quantize_into(
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    mode: KVQuantMode,
) -> None:
    """`quantize_into_reference`'s contract: the Triton kernel on CUDA tensors, the reference everywhere else."""
    kernels = cuda_kernels() if key.is_cuda else None
    impl = quantize_into_reference if kernels is None else kernels.quantize_into
    impl(key, value, slots, key_data, key_scale, value_data, value_scale, mode)
