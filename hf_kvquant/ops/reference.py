"""The math of every kernel in plain PyTorch: the oracle the Triton kernels are tested against, and what runs where
they cannot (CPU, or no Triton). Imports nothing but torch.

Quantization, for each (batch, kv-head, token) row ``x`` of ``head_dim`` values::

    scale = max(absmax(x) / QMAX, SCALE_FLOOR)       # float32
    q     = x / scale                                  # INT8: round half to even, clamp to +-127
                                                       # FP8 e4m3: saturate to +-448, round to nearest even

Any head_dim works here, and keys and values may have different ones (MLA latents): the output has the values'.

Attention: queries ``[batch, heads, q_len, head_dim]`` attend to ``kv_len`` visible tokens; query ``i`` sits at visible
position ``kv_len - q_len + i`` (the new tokens are the last ones) and sees key ``j`` when

    j <= kv_len - q_len + i                        (causal)
    j >  kv_len - q_len + i - sliding_window       (sliding-window layers)
    padding_mask[b, j]                              (left-padded batches; None: no padding)

Scores are ``(q . k[j]) * scaling``, soft-capped as ``softcap * tanh(score / softcap)`` when asked (Gemma 2), then
masked. Attention sinks (gpt-oss: one logit per query head) join each row's softmax denominator and carry no value.
Rows that see no key at all (padding queries) come out as zeros.

Ring buffers (a preallocated sliding-window layer that holds one window): ``capacity`` slots hold the last tokens of
``total`` written, token ``p`` in slot ``p % capacity``. Attention sees its ``n = min(total, capacity)`` tokens in
position order, visible token ``i`` being position ``total - n + i`` (`ring_slots` gives their slots), and the rules
above apply to that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..modes import SCALE_FLOOR, KVQuantMode


def quantize_reference(x: torch.Tensor, mode: KVQuantMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., head_dim]``: returns ``(q, scale)``, scale of shape ``x.shape[:-1]``."""
    qmax = mode.spec.qmax
    xf = x.float()
    scale = torch.clamp_min(xf.abs().amax(dim=-1, keepdim=True) / qmax, SCALE_FLOOR)
    scaled = (xf / scale).clamp(-qmax, qmax)
    if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        q = scaled.round().to(torch.int8)  # torch.round is round-half-to-even
    elif mode is KVQuantMode.FP8_PER_TOKEN_HEAD:
        q = scaled.to(torch.float8_e4m3fn)
    else:
        raise NotImplementedError(f"quantize_reference has no rounding rule for {mode}")
    return q, scale.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q[..., head_dim] * scale[...]`` in float32, returned as ``dtype``, contiguous (value codes are stored
    token-minor: what follows, such as the Hadamard un-rotation, then runs as over any other tensor)."""
    return (q.contiguous().float() * scale.unsqueeze(-1)).to(dtype)


def ring_slots(total: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[capacity]`` int64: the slot of each token of a ring buffer in position order, after ``total`` (a 0-d integer
    tensor) tokens were written: the first ``min(total, capacity)`` hold positions ``total - n + i``, the rest are
    slots not written yet (``total < capacity``). On the device, no host read: compileable."""
    shift = torch.where(total >= capacity, total % capacity, 0)  # the slot of the oldest token held
    return (torch.arange(capacity, device=total.device) + shift) % capacity


def dequantize_ring(data: torch.Tensor, scale: torch.Tensor, total: torch.Tensor, dtype: torch.dtype, start: int = 0,
                    end: int | None = None) -> torch.Tensor:
    """The ring buffer in slots ``[start, end)`` (``end`` None: the capacity) of codes ``data [batch, kv_heads,
    capacity, head_dim]`` and scales ``scale [batch, kv_heads, capacity]``, dequantized in position order
    (`ring_slots`): ``[batch, kv_heads, end - start, head_dim]`` of ``dtype``, the live tokens first, the same shape
    every step."""
    end = data.shape[2] if end is None else end
    return dequantize_slots(data, scale, start + ring_slots(total, end - start), dtype)


def dequantize_slots(data: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` of the tokens in ``slots`` (an integer tensor), in that order."""
    # Through a byte view: index_select has no float8 kernel on CPU.
    codes = data.view(torch.uint8).index_select(2, slots).view(data.dtype)
    return dequantize(codes, scale.index_select(2, slots), dtype)


def quantize_into_reference(
    key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, buffers: Sequence[torch.Tensor], mode: KVQuantMode
) -> None:
    """Quantize ``key``/``value`` ``[batch, kv_heads, tokens, head_dim]`` (each its own head_dim) and write token ``t``
    into slot ``slots[t]`` of the cache's ``buffers = (key_data, key_scale, value_data, value_scale)``: ``*_data
    [batch, kv_heads, capacity, head_dim]`` in the mode's storage dtype, ``*_scale [batch, kv_heads, capacity]``
    float32."""
    key_data, key_scale, value_data, value_scale = buffers
    for x, data, scale in ((key, key_data, key_scale), (value, value_data, value_scale)):
        q, s = quantize_reference(x, mode)
        # Through byte views: index_copy_ has no float8 kernel on CPU.
        data.view(torch.uint8).index_copy_(2, slots, q.view(torch.uint8))
        scale.index_copy_(2, slots, s)


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over full-precision (e.g. dequantized) ``key`` ``[batch, kv_heads, kv_len, head_dim]`` (the query's
    head_dim) and ``value`` ``[batch, kv_heads, kv_len, value_head_dim]``, by the rules in this module's docstring.
    Returns ``[batch, q_len, heads, value_head_dim]`` in the query's dtype; ``scaling`` defaults to
    ``head_dim**-0.5``."""
    batch, heads, q_len, head_dim = query.shape
    if key.shape[-1] != head_dim or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"attention_reference: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}; keys need the query's head_dim, values the keys' batch, heads and "
                         "length")
    kv_len = key.shape[2]
    group = heads // key.shape[1]
    scaling = head_dim**-0.5 if scaling is None else scaling
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = query.float() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    k_pos = torch.arange(kv_len, device=query.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (k_pos > q_pos - sliding_window)
    visible = visible[None, None]
    if padding_mask is not None:
        visible = visible & padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink_column = sinks.float().reshape(1, heads, 1, 1).expand(batch, heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous()
