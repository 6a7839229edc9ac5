"""How a layer's quantized keys and values sit in memory: the value-code layouts, the growth policy of growable layers,
and the slot ramps their writes index with.

A layer holds four buffers: ``key_data [batch, kv_heads, capacity, key codes]`` and ``value_data [batch, kv_heads,
capacity, value codes]`` (int8 or float8_e4m3fn; codes = head_dim / values per byte), ``key_scale`` and ``value_scale``
``[batch, kv_heads, capacity]`` (float32). Value codes are stored in one of two layouts (`TokenMinor`, `HeadDimMinor`),
which the layer class picks.
"""

from __future__ import annotations

import torch

# Growth policy: capacity = round_up(needed + max(GROWTH_MIN_TOKENS, needed // GROWTH_FRACTION), CAPACITY_GRANULE).
# The held bytes stay within ~1.6 % (+ 80 tokens) of the used bytes, and the amortised copy per new
# token stays bounded (each growth copies the layer once per 1/64 of its length).
CAPACITY_GRANULE = 16
GROWTH_MIN_TOKENS = 64
GROWTH_FRACTION = 64


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def grown_capacity(needed: int) -> int:
    """The capacity a growable layer allocates to hold ``needed`` tokens."""
    return round_up(needed + max(GROWTH_MIN_TOKENS, needed // GROWTH_FRACTION), CAPACITY_GRANULE)


# One shared 0..N-1 ramp per device and CUDA stream: the write slots of an update are a view of it, so a decode
# step launches no extra kernel to build them. Per stream because a ramp is built and replaced (when it grows) on the
# current stream: another thread's stream could read it before it is written, or after its memory is reused.
SLOT_RAMPS: dict[tuple[torch.device, int], torch.Tensor] = {}


def slot_range(device: torch.device, start: int, count: int) -> torch.Tensor:
    """Slots ``[start, start + count)`` as an int64 tensor on ``device``: a view of the shared ramp."""
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0)
    ramp = SLOT_RAMPS.get(key)
    if ramp is None or ramp.numel() < start + count:
        ramp = torch.arange(round_up(2 * (start + count), 4096), device=device)
        SLOT_RAMPS[key] = ramp
    return ramp[start : start + count]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` as uint8 where it is float8: index ops on float8 are missing on CPU; the bytes are what moves anyway."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# -- value-code layouts ------------------------------------------------------------------------------------------------

# Slots per row of value codes are padded to this: every row starts 16-byte aligned, so that the kernels' loads along
# the tokens are vectorized.
TOKEN_ROW_ALIGNMENT = 16


def token_row_slots(capacity: int) -> int:
    """Slots a token-minor row of ``capacity`` slots takes in memory."""
    return round_up(capacity, TOKEN_ROW_ALIGNMENT)


def token_minor_zeros(batch: int, heads: int, capacity: int, codes: int, dtype: torch.dtype,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros ``[batch, kv_heads, capacity, codes]`` stored token-minor: a transposed view of ``[batch, kv_heads, codes,
    capacity rounded up to 16]``. How value codes are stored.

    P.V sums over tokens. With codes of consecutive tokens adjacent, the attention kernel hands the 8-bit values to
    the tensor cores as whole words; stored head_dim-minor, they are gathered byte by byte from shared memory (decode
    on an H200: INT8 (8, 32k) 0.77x -> 0.66x SDPA's time, eval/results/kernel_tuning.md)."""
    rows = torch.zeros(batch, heads, codes, token_row_slots(capacity), dtype=dtype, device=device)
    return rows[..., :capacity].transpose(2, 3)


def token_minor(t: torch.Tensor) -> torch.Tensor:
    """``t [batch, kv_heads, tokens, codes]`` as `token_minor_zeros` stores it: ``t`` itself where it already is, a copy
    otherwise."""
    if t.stride(-2) == 1 and t.stride(-1) % TOKEN_ROW_ALIGNMENT == 0:
        return t
    out = token_minor_zeros(*t.shape, dtype=t.dtype, device=t.device)
    as_bytes(out).copy_(as_bytes(t))
    return out


class TokenMinor:
    """Value codes stored token-minor (`token_minor_zeros`): for layers whose window handed to attention starts at
    slot 0, so that every row the kernel reads starts 16-byte aligned."""

    zeros = staticmethod(token_minor_zeros)
    arrange = staticmethod(token_minor)  # the layout back after an op that made a plain tensor
    slots = staticmethod(token_row_slots)  # slots a row of ``capacity`` takes in memory


class HeadDimMinor:
    """Value codes stored ``[batch, kv_heads, capacity, codes]`` contiguous, as the keys: for a layer whose window
    starts at a slot that moves by one per step, where token-minor rows would mostly start off their alignment."""

    @staticmethod
    def zeros(batch: int, heads: int, capacity: int, codes: int, dtype: torch.dtype,
              device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch, heads, capacity, codes, dtype=dtype, device=device)

    @staticmethod
    def arrange(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def slots(capacity: int) -> int:
        return capacity
