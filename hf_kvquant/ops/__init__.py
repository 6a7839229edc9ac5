"""Kernels, each beside the plain-PyTorch reference that defines its math (`hf_kvquant.ops.reference`), and the one
place that picks between them.

The operations take the cache's buffers as plain tensors (codes ``[batch, kv_heads, capacity, head_dim]``, float32
scales ``[batch, kv_heads, capacity]``) and which slots to read: ops imports nothing of the package above it (only
`hf_kvquant.modes`), so the cache and its hand-over type (`hf_kvquant.QuantizedKV`) build on ops, never the reverse.

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

import torch

from ..modes import KVQuantMode
from .limits import MAX_KERNEL_HEAD_DIM
from .reference import (
    attention_reference,
    dequantize_ring,
    dequantize_slots,
    quantize_into_reference,
    ring_slots,
)

__all__ = ["MAX_KERNEL_HEAD_DIM", "SDPA_PREFILL_MIN_QUERIES", "attention", "attention_through_sdpa", "cuda_kernels",
           "dequantize_ring", "quantize_into", "ring_slots"]


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


def _prefills_through_sdpa(query, key_data, value_data, length, padding_mask, sliding_window, softcap,
                           sinks) -> bool:
    """A long prefill that PyTorch's fused kernels compute exactly: causal attention (bottom-right aligned) in half
    precision over a window the host knows (no ``length`` on the device), without padding, sliding window,
    soft-capping or sinks."""
    return (query.shape[2] >= SDPA_PREFILL_MIN_QUERIES and query.dtype in (torch.float16, torch.bfloat16)
            and length is None and padding_mask is None and sliding_window is None and softcap is None
            and sinks is None and key_data.shape[-1] == value_data.shape[-1])


def attention_through_sdpa(query: torch.Tensor, key_data: torch.Tensor, key_scale: torch.Tensor,
                           value_data: torch.Tensor, value_scale: torch.Tensor, *, start: int = 0,
                           end: int | None = None, scaling: float | None = None) -> torch.Tensor:
    """Causal attention of ``query [batch, heads, q_len, head_dim]`` over slots ``[start, end)`` (``end`` None: the
    capacity) of the buffers (as `attention` takes them), widened to the query's dtype by the dequantize kernel (one
    layer's window, for this call only) and handed to ``scaled_dot_product_attention``. Returns ``[batch, q_len,
    heads, head_dim]``."""
    from torch.nn.attention.bias import causal_lower_right

    from .dequantize_kernel import dequantize_window

    end = key_data.shape[2] if end is None else end
    if query.shape[2] > end - start:
        raise ValueError(f"attention_through_sdpa needs a window holding the {query.shape[2]} queries' tokens (window "
                         f"{end - start})")
    k = dequantize_window(key_data, key_scale, query.dtype, start, end)
    v = dequantize_window(value_data, value_scale, query.dtype, start, end)
    causal = causal_lower_right(query.shape[2], k.shape[2])  # the new tokens are the window's last
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=causal, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def _attention(query, key_data, key_scale, value_data, value_scale, padding_mask, start, end, length, ring,
               mask_offset, scaling, sliding_window, softcap, sinks, own_workspace=False) -> torch.Tensor:
    kernels = _use_kernels(query)
    if kernels is not None:
        if _prefills_through_sdpa(query, key_data, value_data, length, padding_mask, sliding_window, softcap, sinks):
            return attention_through_sdpa(query, key_data, key_scale, value_data, value_scale, start=start, end=end,
                                          scaling=scaling)
        return kernels.attention(query, key_data, key_scale, value_data, value_scale, padding_mask, start=start,
                                 end=end, length=length, ring=ring, mask_offset=mask_offset, scaling=scaling,
                                 sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                 own_workspace=own_workspace)
    # The reference reads the live slots in position order (the length is read on the host), at their positions
    # [first, first + live) of the mask's columns, after `first` positions of zeros that the mask hides: the same sums
    # as attention over a cache that keeps every token (a window hiding the old ones), to the bit.
    if ring:
        total, capacity = int(length), end - start
        live = min(total, capacity)
        slots = start + ring_slots(length, capacity)[:live]
        first = mask_offset + total - live
    else:
        live = end - start if length is None else int(length)
        slots = torch.arange(start, start + live, device=key_data.device)
        first = mask_offset
    k, v = (_at_positions(dequantize_slots(data, scale, slots, torch.float32), first)
            for data, scale in ((key_data, key_scale), (value_data, value_scale)))
    if first or padding_mask is not None:
        held = torch.arange(first + live, device=query.device) >= first
        padding_mask = held[None].expand(query.shape[0], -1) if padding_mask is None else (
            padding_mask[:, : first + live].bool() & held)
    return attention_reference(query, k, v, padding_mask, scaling, sliding_window, softcap, sinks)


def _at_positions(tokens: torch.Tensor, first: int) -> torch.Tensor:
    """``tokens [batch, kv_heads, live, head_dim]`` after ``first`` positions of zeros."""
    return tokens if not first else torch.cat([tokens.new_zeros(*tokens.shape[:2], first, tokens.shape[-1]), tokens], 2)


@torch.library.custom_op("hf_kvquant::attention", mutates_args=())
def _attention_op(
    query: torch.Tensor, key_data: torch.Tensor, key_scale: torch.Tensor, value_data: torch.Tensor,
    value_scale: torch.Tensor, length: torch.Tensor, padding_mask: torch.Tensor | None, start: int, end: int,
    ring: bool, mask_offset: int, scaling: float | None, sliding_window: int | None, softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    # Inside a captured graph: partials allocated per call, from the graph's own memory.
    return _attention(query, key_data, key_scale, value_data, value_scale, padding_mask, start, end, length, ring,
                      mask_offset, scaling, sliding_window, softcap, sinks, own_workspace=True)


@_attention_op.register_fake
def _(query, key_data, key_scale, value_data, value_scale, length, padding_mask, start, end, ring, mask_offset,
      scaling, sliding_window, softcap, sinks):
    batch, heads, q_len, _ = query.shape
    return query.new_empty(batch, q_len, heads, value_data.shape[-1])  # the values' head_dim, which may differ (MLA)


def attention(
    query: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    length: torch.Tensor | None = None,
    ring: bool = False,
    mask_offset: int = 0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query [batch, heads, q_len, head_dim]`` over slots ``[start, end)`` (``end`` None: the
    capacity) of one layer's quantized buffers, by the rules of `attention_reference`: the Triton kernel on CUDA
    tensors, dequantize + reference everywhere else. Returns ``[batch, q_len, heads, value_head_dim]`` in the query's
    dtype.

    ``key_data [batch, kv_heads, capacity, head_dim]`` and ``value_data [batch, kv_heads, capacity, value_head_dim]``
    are int8 or float8_e4m3fn codes (values may have their own head_dim: MLA), ``key_scale``/``value_scale [batch,
    kv_heads, capacity]`` their float32 scales. ``length`` (a preallocated cache, whose shapes must not change from
    step to step): a 0-d integer tensor on the device, the live slots from ``start``; slots past it are never read.

    ``ring=True`` (with ``length``, the tokens ever written): the window is a ring buffer, token ``p`` in slot
    ``start + p % (end - start)``; attention sees its last ``min(length, end - start)`` tokens in position order
    (`ring_slots`). Exact for queries that fit in the ring with their past; a prefill that wraps it needs a window
    built for it.

    ``padding_mask [batch, columns]`` (True/1 = attend): column ``mask_offset + i`` for the ``i``-th token attended to;
    in a ring token ``i`` is position ``length - n + i``, so a mask over absolute positions (``mask_offset`` 0) serves
    every step."""
    end = key_data.shape[2] if end is None else end
    if ring and length is None:
        raise ValueError("hf_kvquant attention: a ring buffer needs its token count on the device (length)")
    if torch.compiler.is_compiling():
        if length is None:
            raise ValueError("hf_kvquant attention compiles over a preallocated cache only: build "
                             "QuantizedPerTokenHeadCache with max_cache_len")
        return torch.ops.hf_kvquant.attention(query, key_data, key_scale, value_data, value_scale, length,
                                              padding_mask, start, end, ring, mask_offset, scaling, sliding_window,
                                              softcap, sinks)
    return _attention(query, key_data, key_scale, value_data, value_scale, padding_mask, start, end, length, ring,
                      mask_offset, scaling, sliding_window, softcap, sinks)
