"""Kernels, each beside the plain-PyTorch reference that defines its math (`hf_kvquant.ops.reference`), and the one
place that picks between them.

The Triton modules (`quantize_kernel`, `attention_kernel`) are imported on first use with CUDA tensors, so
`hf_kvquant` imports and runs without Triton (macOS, Windows, CPU-only images): there everything takes the reference.

Under ``torch.compile`` both operations are PyTorch custom operators (``torch.ops.hf_kvquant.*``) that dynamo keeps
whole in its graph, so a decode step over a preallocated cache compiles with ``fullgraph=True`` into one CUDA graph.
Eager calls go to the implementation directly (a custom operator's dispatch costs host time on every layer).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from ..modes import KVQuantMode
from .reference import attention_reference, dequantize, quantize_into_reference

if TYPE_CHECKING:
    from ..quantized_kv import QuantizedKV


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


def _use_kernels(t: torch.Tensor) -> SimpleNamespace | None:
    return cuda_kernels() if t.is_cuda else None


# -- quantize-on-write -----------------------------------------------------------------------------------------------


def _quantize_into(key, value, slots, buffers, mode: KVQuantMode) -> None:
    kernels = _use_kernels(key)
    impl = quantize_into_reference if kernels is None else kernels.quantize_into
    impl(key, value, slots, buffers, mode)


@torch.library.custom_op("hf_kvquant::quantize_into",
                         mutates_args=("key_data", "key_scale", "value_data", "value_scale"))
def _quantize_into_op(
    key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, key_data: torch.Tensor, key_scale: torch.Tensor,
    value_data: torch.Tensor, value_scale: torch.Tensor, kernel_format: int,
) -> None:
    mode = KVQuantMode.from_kernel_format(kernel_format)
    _quantize_into(key, value, slots, (key_data, key_scale, value_data, value_scale), mode)


def quantize_into(
    key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, buffers: Sequence[torch.Tensor], mode: KVQuantMode
) -> None:
    """`quantize_into_reference`'s contract: the Triton kernel on CUDA tensors, the reference everywhere else."""
    if torch.compiler.is_compiling():
        torch.ops.hf_kvquant.quantize_into(key, value, slots, *buffers, mode.spec.kernel_format)
    else:
        _quantize_into(key, value, slots, buffers, mode)


# -- attention -------------------------------------------------------------------------------------------------------


def _attention(query, key: QuantizedKV, value: QuantizedKV, padding_mask, scaling, sliding_window, softcap, sinks,
               own_workspace=False) -> torch.Tensor:
    kernels = _use_kernels(query)
    if kernels is not None:
        return kernels.attention(query, key, value, padding_mask, scaling, sliding_window, softcap, sinks,
                                 own_workspace)
    end = key.end if key.length is None else key.start + int(key.length)  # the reference reads only live slots
    window = slice(key.start, end)
    k, v = (dequantize(kv.data[:, :, window], kv.scale[:, :, window], torch.float32) for kv in (key, value))
    if padding_mask is not None:
        padding_mask = padding_mask[:, : end - key.start]
    return attention_reference(query, k, v, padding_mask, scaling, sliding_window, softcap, sinks)


@torch.library.custom_op("hf_kvquant::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor, key_data: torch.Tensor, key_scale: torch.Tensor, value_data: torch.Tensor,
    value_scale: torch.Tensor, length: torch.Tensor, padding_mask: torch.Tensor | None, start: int, kernel_format: int,
    scaling: float | None, sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    from ..quantized_kv import QuantizedKV

    mode, end = KVQuantMode.from_kernel_format(kernel_format), key_data.shape[2]
    key = QuantizedKV(key_data, key_scale, start, end, mode, query.dtype, length=length)
    value = QuantizedKV(value_data, value_scale, start, end, mode, query.dtype, length=length)
    # Inside a captured graph: partials allocated per call, from the graph's own memory.
    return _attention(query, key, value, padding_mask, scaling, sliding_window, softcap, sinks, own_workspace=True)


@_attention_op.register_fake
def _(query, key_data, key_scale, value_data, value_scale, length, padding_mask, start, kernel_format, scaling,
      sliding_window, softcap, sinks):
    batch, heads, q_len, head_dim = query.shape
    return query.new_empty(batch, q_len, heads, head_dim)


def attention(query: torch.Tensor, key: QuantizedKV, value: QuantizedKV, padding_mask: torch.Tensor | None = None,
              scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``query [batch, heads, q_len, head_dim]`` over quantized keys and values (the rules of
    `attention_reference`): the Triton kernel on CUDA tensors, dequantize + reference everywhere else. Returns
    ``[batch, q_len, heads, head_dim]`` in the query's dtype."""
    if torch.compiler.is_compiling():
        if key.length is None:
            raise ValueError("hf_kvquant attention compiles over a preallocated cache only: build "
                             "QuantizedPerTokenHeadCache with max_cache_len")
        return torch.ops.hf_kvquant.attention(
            query, key.data, key.scale, value.data, value.scale, key.length, padding_mask, key.start,
            key.mode.spec.kernel_format, scaling, sliding_window, softcap, sinks)
    return _attention(query, key, value, padding_mask, scaling, sliding_window, softcap, sinks)
