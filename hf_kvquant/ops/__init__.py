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

# The widest head_dim (of keys, or of values) the Triton kernels take: their tiles are padded to a power of two, and
# one of 1024 channels would not fit a program's registers. The plain-PyTorch reference takes any head_dim; the cache
# refuses wider heads only on CUDA devices, where the kernels run.
MAX_KERNEL_HEAD_DIM = 512


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


# Query tokens from which a prefill takes PyTorch's fused attention (cuDNN / flash) over the window dequantized to the
# query's dtype: those kernels run the tensor cores at full rate, where hf_kvquant's kernel widens every K/V tile in its
# inner loop. Decode steps and short chunks stay in hf_kvquant's kernel, which reads the cache's bytes once.
SDPA_PREFILL_MIN_QUERIES = 256


def _prefills_through_sdpa(query, key: QuantizedKV, value: QuantizedKV, padding_mask, sliding_window, softcap,
                           sinks) -> bool:
    """A long prefill that PyTorch's fused kernels compute exactly: causal attention (bottom-right aligned) in half
    precision over a window the host knows, without padding, sliding window, soft-capping or sinks."""
    return (query.shape[2] >= SDPA_PREFILL_MIN_QUERIES and query.dtype in (torch.float16, torch.bfloat16)
            and key.length is None and padding_mask is None and sliding_window is None and softcap is None
            and sinks is None and key.data.shape[-1] == value.data.shape[-1])


def attention_through_sdpa(query: torch.Tensor, key: QuantizedKV, value: QuantizedKV,
                           scaling: float | None = None) -> torch.Tensor:
    """Causal attention of ``query [batch, heads, q_len, head_dim]`` over the window of ``key``/``value``, widened to
    the query's dtype by the dequantize kernel (one layer's window, for this call only) and handed to
    ``scaled_dot_product_attention``. Returns ``[batch, q_len, heads, head_dim]``."""
    from torch.nn.attention.bias import causal_lower_right

    from .dequantize_kernel import dequantize_window

    window = key.end - key.start
    if key.length is not None or query.shape[2] > window:
        raise ValueError(
            f"attention_through_sdpa needs a window whose length the host knows (key.length None; got "
            f"{'a length on the device' if key.length is not None else 'none'}) holding the {query.shape[2]} queries' "
            f"tokens (window {window}): a preallocated layer's live length is on the device, use ops.attention")
    k, v = dequantize_window(key, query.dtype), dequantize_window(value, query.dtype)
    causal = causal_lower_right(query.shape[2], k.shape[2])  # the new tokens are the window's last
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=causal, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _attention(query, key: QuantizedKV, value: QuantizedKV, padding_mask, scaling, sliding_window, softcap, sinks,
               own_workspace=False) -> torch.Tensor:
    kernels = _use_kernels(query)
    if kernels is not None:
        if _prefills_through_sdpa(query, key, value, padding_mask, sliding_window, softcap, sinks):
            return attention_through_sdpa(query, key, value, scaling)
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
    batch, heads, q_len, _ = query.shape
    value_head_dim = value_data.shape[-1] * KVQuantMode.from_kernel_format(kernel_format).spec.values_per_byte
    return query.new_empty(batch, q_len, heads, value_head_dim)  # the values' head_dim, which may differ (MLA)


def attention(query: torch.Tensor, key: QuantizedKV, value: QuantizedKV, padding_mask: torch.Tensor | None = None,
              scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``query [batch, heads, q_len, head_dim]`` over quantized keys (of the query's head_dim) and values
    (of their own head_dim, which may differ: MLA), by the rules of `attention_reference`: the Triton kernel on CUDA
    tensors, dequantize + reference everywhere else. Returns ``[batch, q_len, heads, value_head_dim]`` in the query's
    dtype."""
    if torch.compiler.is_compiling():
        if key.length is None:
            raise ValueError("hf_kvquant attention compiles over a preallocated cache only: build "
                             "QuantizedPerTokenHeadCache with max_cache_len")
        return torch.ops.hf_kvquant.attention(
            query, key.data, key.scale, value.data, value.scale, key.length, padding_mask, key.start,
            key.mode.spec.kernel_format, scaling, sliding_window, softcap, sinks)
    return _attention(query, key, value, padding_mask, scaling, sliding_window, softcap, sinks)
