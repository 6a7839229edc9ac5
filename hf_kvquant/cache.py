"""`QuantizedPerTokenHeadCache`: a drop-in `transformers.Cache` that stores keys and values as INT8/FP8.

Each layer owns four buffers, ``key/value_data [batch, kv_heads, capacity, head_dim]`` (int8 or
float8_e4m3fn) and ``key/value_scale [batch, kv_heads, capacity]`` (float32), and never keeps a
full-precision copy of the past. Where the window handed to attention starts at slot 0 (all but the compacting
sliding-window layer), value codes are stored token-minor (`token_minor_zeros`): the attention kernel's P.V then
reads each channel's codes for 4 consecutive tokens as one word. Slots ``[0, stored)`` hold
the latest ``stored`` tokens in position order. Three layer classes:

* `QuantizedPerTokenHeadLayer` (full attention) grows its capacity in steps of a small fraction of the length (never
  per decode step, never by doubling, so the memory held stays close to the memory used);
* `QuantizedPerTokenHeadSlidingWindowLayer` keeps about one window, compacting in place;
* `QuantizedPerTokenHeadStaticLayer` (``max_cache_len``) is preallocated with its length on the device, for compiled
  decoding.

What `update` hands to attention is described in `hf_kvquant.quantized_kv`.

With ``hadamard=True`` the new keys and values are rotated by the orthogonal Hadamard matrix of
`hf_kvquant.rotation` before they are quantized (fewer outliers per token-head, so a finer scale); the
buffers then hold rotated values, and everything handed out un-rotates them or says how to.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import replace

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DummyLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    get_layer_types_and_kwargs,
)

from .modes import KVQuantMode
from .ops import MAX_KERNEL_HEAD_DIM, quantize_into
from .quantized_kv import ATTENTION_NAME, QuantizedKV
from .rotation import KeyValueRotation, layer_rotation, rotate

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Growth policy: capacity = round_up(needed + max(GROWTH_MIN_TOKENS, needed // GROWTH_FRACTION), CAPACITY_GRANULE).
# The held bytes stay within ~1.6 % (+ 80 tokens) of the used bytes, and the amortised copy per new
# token stays bounded (each growth copies the layer once per 1/64 of its length).
CAPACITY_GRANULE = 16
GROWTH_MIN_TOKENS = 64
GROWTH_FRACTION = 64


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _grown_capacity(needed: int) -> int:
    return _round_up(needed + max(GROWTH_MIN_TOKENS, needed // GROWTH_FRACTION), CAPACITY_GRANULE)


# One shared 0..N-1 ramp per device and CUDA stream: the write slots of an update are a view of it, so a decode
# step launches no extra kernel to build them. Per stream because a ramp is built and replaced (when it grows) on the
# current stream: another thread's stream could read it before it is written, or after its memory is reused.
_SLOT_RAMPS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _slot_range(device: torch.device, start: int, count: int) -> torch.Tensor:
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0)
    ramp = _SLOT_RAMPS.get(key)
    if ramp is None or ramp.numel() < start + count:
        ramp = torch.arange(_round_up(2 * (start + count), 4096), device=device)
        _SLOT_RAMPS[key] = ramp
    return ramp[start : start + count]


def _check_hadamard(hadamard) -> bool:
    if not isinstance(hadamard, bool):
        raise ValueError(f"hadamard must be True or False; got {hadamard!r}")
    return hadamard


# Slots per row of value codes are padded to this: every row starts 16-byte aligned, so that the kernels' loads along
# the tokens are vectorized.
_TOKEN_ROW_ALIGNMENT = 16


def _token_row_slots(capacity: int) -> int:
    """Slots a token-minor row of ``capacity`` slots takes in memory."""
    return _round_up(capacity, _TOKEN_ROW_ALIGNMENT)


def token_minor_zeros(batch: int, heads: int, capacity: int, codes: int, dtype: torch.dtype,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Zeros ``[batch, kv_heads, capacity, codes]`` stored token-minor: a transposed view of ``[batch, kv_heads, codes,
    capacity rounded up to 16]``. How value codes are stored.

    P.V sums over tokens. With codes of consecutive tokens adjacent, the attention kernel hands the 8-bit values to
    the tensor cores as whole words; stored head_dim-minor, they are gathered byte by byte from shared memory (decode
    on an H200: INT8 (8, 32k) 0.77x -> 0.66x SDPA's time, eval/results/kernel_tuning.md)."""
    rows = torch.zeros(batch, heads, codes, _token_row_slots(capacity), dtype=dtype, device=device)
    return rows[..., :capacity].transpose(2, 3)


def token_minor(t: torch.Tensor) -> torch.Tensor:
    """``t [batch, kv_heads, tokens, codes]`` as `token_minor_zeros` stores it: ``t`` itself where it already is, a copy
    otherwise."""
    if t.stride(-2) == 1 and t.stride(-1) % _TOKEN_ROW_ALIGNMENT == 0:
        return t
    out = token_minor_zeros(*t.shape, dtype=t.dtype, device=t.device)
    _as_bytes(out).copy_(_as_bytes(t))
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Index ops on float8 are missing on CPU; the bytes are what moves anyway.
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


class QuantizedPerTokenHeadLayer(CacheLayerMixin):
    """One full-attention layer's quantized keys and values: every token stays, in slots ``[0, stored)``.

    With ``hadamard=True`` it stores ``quantize(x @ R)`` (`hf_kvquant.rotation`) and hands ``R`` over with the buffers.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    # Value codes stored token-minor (`token_minor_zeros`): the views handed to attention start at slot 0.
    values_token_minor = True

    def __init__(self, mode: KVQuantMode | str, hadamard: bool = False):
        super().__init__()
        self.mode = KVQuantMode.parse(mode)
        self.hadamard = _check_hadamard(hadamard)
        self.cumulative_length = 0  # tokens seen so far: the position of the next token
        self.stored = 0  # tokens in slots [0, stored), the last of them at position cumulative_length - 1
        self.key_data = self.key_scale = self.value_data = self.value_scale = None

    def _describe(self) -> str:
        return self.mode.value + (", hadamard=True" if self.hadamard else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, tokens={self.stored}, capacity={self.capacity})"

    # -- buffers -------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.key_data is None else self.key_data.shape[2]

    @property
    def buffers(self) -> tuple[torch.Tensor, ...]:
        return () if self.key_data is None else (self.key_data, self.key_scale, self.value_data, self.value_scale)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds on its device: allocated capacity, scales included, and the padding of token-minor
        value rows to 16 slots (the Hadamard matrix of a ``hadamard=True`` layer is shared by all layers and caches and
        not counted)."""
        return sum(t.untyped_storage().nbytes() for t in self.buffers)

    @property
    def head_dims(self) -> tuple[int, int]:
        """(key head_dim, value head_dim) of the tokens stored (they differ in MLA models); (0, 0) before any."""
        if self.key_data is None:
            return 0, 0
        values_per_byte = self.mode.spec.values_per_byte
        return self.key_data.shape[-1] * values_per_byte, self.value_data.shape[-1] * values_per_byte

    @property
    def rotation(self) -> torch.Tensor | KeyValueRotation | None:
        """``R [head_dim, head_dim]`` float32 that keys and values are rotated by before quantizing (a
        `KeyValueRotation` of one matrix each where their head dims differ), or None (``hadamard=False``, or nothing
        stored yet). Looked up, not held: copies of the layer share it."""
        if not self.hadamard or self.key_data is None:
            return None
        return layer_rotation(*self.head_dims, self.device)

    def _initial_capacity(self) -> int:
        return 0  # grown as tokens arrive

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch, heads, _, key_head_dim = key_states.shape
        self._allocate(batch, heads, key_head_dim, value_states.shape[-1], self._initial_capacity())
        self.is_initialized = True

    def _allocate(self, batch: int, heads: int, key_head_dim: int, value_head_dim: int, capacity: int,
                  drop: int = 0) -> None:
        """New buffers of ``capacity`` slots holding the stored tokens but the ``drop`` oldest: codes ``[batch, heads,
        capacity, head_dim / values_per_byte]`` of each head_dim, scales ``[batch, heads, capacity]``."""
        spec = self.mode.spec
        key_codes, value_codes = key_head_dim // spec.values_per_byte, value_head_dim // spec.values_per_byte
        # All four buffers are built before any is replaced: an allocation failure changes nothing.
        try:
            new = (
                torch.zeros(batch, heads, capacity, key_codes, dtype=spec.storage_dtype, device=self.device),
                torch.zeros(batch, heads, capacity, dtype=torch.float32, device=self.device),
                token_minor_zeros(batch, heads, capacity, value_codes, spec.storage_dtype, self.device)
                if self.values_token_minor else
                torch.zeros(batch, heads, capacity, value_codes, dtype=spec.storage_dtype, device=self.device),
                torch.zeros(batch, heads, capacity, dtype=torch.float32, device=self.device),
            )
        except torch.OutOfMemoryError as e:
            value_slots = _token_row_slots(capacity) if self.values_token_minor else capacity
            asked = batch * heads * ((capacity * key_codes + value_slots * value_codes) * spec.storage_dtype.itemsize
                                     + capacity * 8)
            head_dims = f"head_dim {key_head_dim}" + (
                "" if key_head_dim == value_head_dim else f" (keys) / {value_head_dim} (values)")
            raise torch.OutOfMemoryError(
                f"hf_kvquant: out of memory on {self.device} allocating {asked} bytes for {capacity} slots of a layer "
                f"(batch {batch}, kv_heads {heads}, {head_dims}) that holds {self.nbytes} bytes; the layer keeps "
                "its buffers"
            ) from e
        for old, fresh in zip(self.buffers, new):
            _as_bytes(fresh)[:, :, : self.stored - drop] = _as_bytes(old)[:, :, drop : self.stored]
        self.key_data, self.key_scale, self.value_data, self.value_scale = new
        self.stored -= drop

    def _reallocate(self, capacity: int, drop: int = 0) -> None:
        batch, heads = self.key_data.shape[:2]
        self._allocate(batch, heads, *self.head_dims, capacity, drop)

    def _tokens_to_keep(self) -> int:
        """How many of the stored tokens a future step (or rollback) can still need."""
        return self.stored

    def _reserve(self, count: int) -> None:
        """Make room for ``count`` more tokens after the stored ones."""
        if self.stored + count <= self.capacity:
            return
        drop = self.stored - self._tokens_to_keep()
        if drop > 0 and self.stored - drop + count <= self.capacity:
            # Move the tokens still needed to the front, in place (all copies made first: a failure changes nothing).
            kept = [_as_bytes(t)[:, :, drop : self.stored].clone() for t in self.buffers]
            for t, k in zip(self.buffers, kept):
                _as_bytes(t)[:, :, : self.stored - drop] = k
            self.stored -= drop
        else:
            self._reallocate(_grown_capacity(self.stored - drop + count), drop)

    # -- the Cache layer contract -------------------------------------------------------------------------

    def _check_input(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Reject what this layer cannot store, before anything changes."""
        if not isinstance(key_states, torch.Tensor) or not isinstance(value_states, torch.Tensor):
            raise TypeError("key_states and value_states must be torch.Tensor")
        if key_states.dim() != 4 or value_states.dim() != 4 or key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                "key_states and value_states must both be [batch, kv_heads, tokens, head_dim] with the same batch, "
                f"kv_heads and tokens (their head dims may differ); got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        if key_states.dtype not in SUPPORTED_DTYPES or value_states.dtype != key_states.dtype:
            raise ValueError(
                f"unsupported key/value dtype {key_states.dtype}/{value_states.dtype}; accepted: one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} for both"
            )
        if key_states.device != value_states.device:
            raise ValueError(f"key_states on {key_states.device} but value_states on {value_states.device}")
        head_dims = (key_states.shape[-1], value_states.shape[-1])
        values_per_byte = self.mode.spec.values_per_byte
        for name, head_dim in zip(("key", "value"), head_dims):
            if head_dim < 1 or head_dim % values_per_byte:
                raise ValueError(f"unsupported {name} head_dim {head_dim}; accepted: any positive head_dim"
                                 + (f" divisible by {values_per_byte}" if values_per_byte > 1 else ""))
            if key_states.is_cuda and head_dim > MAX_KERNEL_HEAD_DIM:
                raise ValueError(
                    f"unsupported {name} head_dim {head_dim} on {key_states.device}; accepted on a CUDA device: 1 to "
                    f"{MAX_KERNEL_HEAD_DIM} (the widest head the Triton kernels take); on the CPU any head_dim"
                )
        if self.is_initialized:
            if key_states.device != self.device:
                raise ValueError(f"key/value states on {key_states.device}, but this layer's cache is on {self.device}")
            cached = (*self.key_data.shape[:2], *self.head_dims)
            given = (*key_states.shape[:2], *head_dims)
            if given != cached:
                raise ValueError(
                    f"key/value states of (batch, kv_heads, key head_dim, value head_dim) = {given} do not match the "
                    f"cache's {cached}"
                )
            if key_states.dtype != self.dtype:
                raise ValueError(f"key/value states are {key_states.dtype}, but this layer was filled with "
                                 f"{self.dtype}")
        self._check_room(key_states.shape[-2])  # last: what is wrong with the input itself is said first

    def _check_room(self, count: int) -> None:
        pass  # the buffers grow

    def _past_visible(self) -> int:
        """How many stored tokens the next forward pass attends to besides its own."""
        return self.stored

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[QuantizedKV, QuantizedKV]:
        """Quantize and store ``[batch, kv_heads, tokens, head_dim]`` keys and values; return what attention sees
        (the stored tokens the mask describes, the new ones included) as `QuantizedKV` views."""
        self._check_input(key_states, value_states)
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        past_visible = self._past_visible()
        try:
            self._reserve(count)
        except torch.OutOfMemoryError:
            if first:  # all or nothing: not initialized either, so the next first update may bring another shape
                self.reset()
            raise
        slots = _slot_range(self.device, self.stored, count)
        rotation = self.rotation
        quantize_into(rotate(key_states, rotation), rotate(value_states, rotation), slots, self.buffers, self.mode)
        self.stored += count
        self.cumulative_length += count
        return self._view(self.stored - past_visible - count, self.stored)

    def _view(self, start: int, end: int) -> tuple[QuantizedKV, QuantizedKV]:
        rotation = self.rotation
        return (
            QuantizedKV(self.key_data, self.key_scale, start, end, self.mode, self.dtype, rotation),
            QuantizedKV(self.value_data, self.value_scale, start, end, self.mode, self.dtype, rotation),
        )

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next forward pass, as transformers' `DynamicLayer`."""
        return self.cumulative_length + query_length, 0

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise, changing nothing, where `crop` with this argument cannot be done (the cache checks every layer
        before it crops any)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove (transformers' convention)"
            )
        if self.is_initialized and -tokens_to_remove > self.cumulative_length:
            held = self.cumulative_length
            raise ValueError(f"cannot remove {-tokens_to_remove} tokens from a layer holding {held}")

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative number, as in transformers 5); ``crop(0)`` keeps
        all."""
        self.check_crop(tokens_to_remove)
        if self.is_initialized:  # a layer no update reached (KV sharing): nothing to remove, as in transformers
            self.stored += tokens_to_remove
            self.cumulative_length += tokens_to_remove

    def reset(self) -> None:
        self.key_data = self.key_scale = self.value_data = self.value_scale = None
        self.stored = self.cumulative_length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place (the buffers keep their storage)."""
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            reordered = [_as_bytes(t).index_select(0, beam_idx) for t in self.buffers]  # all first: all or nothing
            for t, r in zip(self.buffers, reordered):
                _as_bytes(t).copy_(r)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._replace_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.device) if isinstance(indices, torch.Tensor) else indices
            self._replace_buffers(lambda t: t[indices])

    def _replace_buffers(self, fn) -> None:
        new = [fn(_as_bytes(t)).view(t.dtype) for t in self.buffers]
        if self.values_token_minor:
            new[2] = token_minor(new[2])
        self.key_data, self.key_scale, self.value_data, self.value_scale = new

    def offload(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")

    def prefetch(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")


class QuantizedPerTokenHeadSlidingWindowLayer(QuantizedPerTokenHeadLayer):
    """One sliding-window layer's quantized keys and values (hybrid models such as Gemma 3).

    It hands attention the last ``sliding_window - 1`` cached tokens plus the new ones, as transformers'
    `DynamicSlidingWindowLayer` does, and drops older tokens lazily: only when the buffer is full does it move the
    tokens still needed to the front (once per ~64 steps). For assisted decoding (`activate_past_recording`) it keeps
    what a later `crop` may roll back to.
    """

    is_sliding = True
    # The window it hands over starts at a slot that moves by one per step: token-minor value rows would mostly start
    # off their 16-byte alignment, where the kernel's loads along tokens go byte by byte (and head_dim 512 spills).
    values_token_minor = False

    def __init__(self, mode: KVQuantMode | str, sliding_window: int, hadamard: bool = False):
        super().__init__(mode, hadamard=hadamard)
        self.sliding_window = sliding_window
        self.record_past = False  # set by generate for assisted decoding: keep what a later crop may need
        self._rollback_base = 0  # cumulative_length at the last crop while recording the past

    def _describe(self) -> str:
        return f"{super()._describe()}, sliding_window={self.sliding_window}"

    def _initial_capacity(self) -> int:
        return 0

    def _tokens_to_keep(self) -> int:
        pending = self.cumulative_length - self._rollback_base if self.record_past else 0
        return min(self.stored, self.sliding_window - 1 + pending)


    def _past_visible(self) -> int:
        return min(self.cumulative_length, self.sliding_window - 1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[QuantizedKV, QuantizedKV]:
        keys, values = super().update(key_states, value_states)
        # A whole prompt longer than the window: give the memory back (the views keep the old buffers for this step).
        keep = self._tokens_to_keep()
        if self.capacity > 2 * _grown_capacity(max(keep, self.sliding_window)):
            try:
                self._reallocate(_grown_capacity(keep), self.stored - keep)
            except torch.OutOfMemoryError:
                pass  # the tokens are stored; the larger buffer stays until a later step gives it back
        return keys, values

    def get_max_length(self) -> int:
        return self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the next forward pass, as transformers' `DynamicSlidingWindowLayer`."""
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, kv_offset

    def activate_past_recording(self) -> None:
        self.record_past = True
        self._rollback_base = self.cumulative_length

    def check_crop(self, tokens_to_remove: int) -> None:
        super().check_crop(tokens_to_remove)
        count = -tokens_to_remove
        if self.is_initialized and self.stored - count < min(self.cumulative_length - count, self.sliding_window - 1):
            raise RuntimeError(
                f"cannot remove {count} tokens: this sliding-window layer no longer holds the tokens before them; "
                "call activate_past_recording() before generating what you may roll back"
            )

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._rollback_base = self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self._rollback_base = 0


class QuantizedPerTokenHeadStaticLayer(QuantizedPerTokenHeadLayer):
    """One preallocated layer for compiled decoding (``max_cache_len``), full attention or a sliding window.

    All ``max_cache_len`` slots are allocated at the first update and never move, and the token count lives only on
    the device (``length``, updated in place), so a decode step changes no shape, no address and no host integer:
    ``torch.compile`` captures it once, in one CUDA graph. `update` hands attention the whole capacity; transformers'
    mask for the layer (kv length ``max_cache_len``), or hf_kvquant's kernel reading ``length``, hides the slots not
    yet written. A sliding-window layer keeps every token too (its window is applied by the mask or the kernel), so it
    holds ``max_cache_len`` slots where the growable layer holds about one window.

    An update past the capacity is refused before anything is written: with a `ValueError` on the CPU or when the
    update alone is larger than the capacity, otherwise by a device-side assertion (on a GPU a host check would
    synchronise every step).
    """

    is_compileable = True

    def __init__(self, mode: KVQuantMode | str, max_cache_len: int, hadamard: bool = False,
                 sliding_window: int | None = None):
        super().__init__(mode, hadamard=hadamard)
        self.max_cache_len = max_cache_len
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.length = None  # 0-d int64 on the layer's device: the live slots [0, length)
        self._rotation = None

    def __repr__(self) -> str:
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return (f"{type(self).__name__}({self._describe()}{window}, tokens={self.get_seq_length()}, "
                f"capacity={self.max_cache_len})")

    @property
    def rotation(self) -> torch.Tensor | None:
        return self._rotation  # held, not looked up: a compiled step must not call the cached builder

    def _initial_capacity(self) -> int:
        return self.max_cache_len

    def _check_room(self, count: int) -> None:
        # `generate` is refused earlier, before its first step (`QuantizedPerTokenHeadCache.check_generation_length`);
        # this catches direct forward calls and a cache reused without `reset()`.
        if count > self.max_cache_len:
            raise ValueError(f"{count} new tokens exceed this cache's max_cache_len={self.max_cache_len}; build the "
                             f"cache with max_cache_len >= {count}")
        if not self.is_initialized:
            return
        if self.length.is_cuda or torch.compiler.is_compiling():
            # Reading the count would synchronise (or break the graph): the device checks it before the write.
            torch._assert_async(self.length + count <= self.max_cache_len,
                                f"hf_kvquant: more tokens than this cache's max_cache_len={self.max_cache_len}; "
                                "build the cache with a larger max_cache_len, or reset() it before a new prompt")
        elif int(self.length) + count > self.max_cache_len:
            held = int(self.length)
            raise ValueError(
                f"{held + count} tokens exceed this cache's max_cache_len={self.max_cache_len} ({held} held + {count} "
                f"new); build the cache with max_cache_len >= {held + count}, or reset() it before a new prompt"
            )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        try:
            self.length = torch.zeros((), dtype=torch.int64, device=self.device)
        except torch.OutOfMemoryError:
            QuantizedPerTokenHeadLayer.reset(self)  # all or nothing: no buffers without a length
            raise
        if self.hadamard:
            self._rotation = layer_rotation(key_states.shape[-1], value_states.shape[-1], self.device)
        if not torch.compiler.is_compiling():
            # Fixed addresses: CUDA graphs replay over these very tensors.
            for t in (*self.buffers, self.length):
                torch._dynamo.mark_static_address(t)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[QuantizedKV, QuantizedKV]:
        """Quantize and store the new tokens at slots ``[length, length + tokens)``; return the whole capacity as
        `QuantizedKV` with ``length``."""
        self._check_input(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.length + torch.arange(key_states.shape[-2], device=self.device)
        rotation = self.rotation
        quantize_into(rotate(key_states, rotation), rotate(value_states, rotation), slots, self.buffers, self.mode)
        self.length.add_(key_states.shape[-2])
        keys, values = self._view(0, self.max_cache_len)
        return replace(keys, length=self.length), replace(values, length=self.length)

    def get_seq_length(self) -> torch.Tensor | int:
        """The token count as a device tensor (as transformers' `StaticLayer`): positions computed from it stay on the
        device, so a compiled step never depends on a host integer."""
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The whole capacity, always: a fixed mask shape (as transformers' `StaticLayer`)."""
        return self.max_cache_len, 0

    def check_crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove (transformers' convention)"
            )
        if not self.is_initialized or tokens_to_remove == 0:  # a layer no update reached: nothing to remove
            return
        held = int(self.length)  # not on the decode path: assisted decoding's rollback
        if -tokens_to_remove > held:
            raise ValueError(f"cannot remove {-tokens_to_remove} tokens from a layer holding {held}")

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (their slots are overwritten by the next update)."""
        self.check_crop(tokens_to_remove)
        if self.is_initialized:
            self.length.add_(tokens_to_remove)

    def reset(self) -> None:
        """Forget every token but keep the buffers and their addresses: the next `generate` reuses the compiled step."""
        if self.is_initialized:
            self.length.zero_()


class QuantizedPerTokenHeadCache(Cache):
    """A `transformers.Cache` that keeps keys and values as INT8 or FP8 e4m3 with one scale per token per KV head.

    Args:
        config: the model's config. Optional, as for `DynamicCache`; needed for hybrid models (sliding-window
            layers), and it tells the cache whether the model runs hf_kvquant's attention, which then receives
            the quantized buffers instead of dequantized copies (see `hf_kvquant.quantized_kv`).
        mode: ``"int8_per_token_head"`` / ``"int8"``, ``"fp8_per_token_head"`` / ``"fp8"``, or a `KVQuantMode`.
        max_cache_len: preallocate every layer for this many tokens (`QuantizedPerTokenHeadStaticLayer`): no growth,
            more tokens raise a `ValueError`, and the cache is compileable, so `generate` compiles its decode step
            (CUDA graphs) as it does for transformers' `StaticCache`. Without it, buffers grow in small steps as tokens
            arrive and decoding runs eagerly, as with `DynamicCache`.
        hadamard: rotate keys and values by a normalised Hadamard matrix of head_dim before quantizing
            (`hf_kvquant.rotation`). Spreads outlier channels over the whole head, so the per-token-head scale
            resolves the rest more finely: on Gemma-3-270M it cuts INT8's perplexity cost from +0.95 % to +0.13 %
            (FP8, whose error is relative to each value, gains less: +1.02 % to +0.98 %).
            Costs a few small matmuls per layer and step (the new keys/values, and in hf_kvquant's attention the
            queries and the output), no memory per token. Attention results are the same up to quantization; what
            `update` returns is un-rotated (`QuantizedKV.dequantize`, or plain tensors) unless the consumer reads
            the raw buffers (hf_kvquant's attention, which rotates its queries).

    A non-finite key or value (an overflowing model) stays confined to its token-head: one ``inf`` or ``NaN`` element
    makes that (batch row, kv head, token)'s scale ``inf`` or ``NaN``, so all of its values read back as ``NaN``, and
    nothing else changes (every other token, head and row reads the same numbers; with ``hadamard=True`` too, since the
    rotation mixes channels within a token-head only).

    `save` writes the cache to a safetensors file and `load` reads it back (`hf_kvquant.persistence`).

    Example::

        cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8", max_cache_len=4096)  # compiled decode
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)
        print(cache.nbytes)
    """

    def __init__(
        self,
        config=None,
        mode: KVQuantMode | str = KVQuantMode.INT8_PER_TOKEN_HEAD,
        max_cache_len: int | None = None,
        hadamard: bool = False,
    ):
        self.mode = KVQuantMode.parse(mode)
        self.hadamard = _check_hadamard(hadamard)
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len <= 0):
            raise ValueError(f"max_cache_len must be a positive int or None; got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.config = None if config is None else config.get_text_config(decoder=True)
        if self.config is None:  # full-attention layers, added as `update` reaches them
            super().__init__(layer_class_to_replicate=functools.partial(
                _cache_layer, "full_attention", {}, self.mode, self.hadamard, max_cache_len))
            return
        # One layer per entry of the config's layer types, as `DynamicCache(config=...)` / `StaticCache` build them:
        # attention layers quantized, the conv / recurrent states of hybrid models in transformers' own classes.
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(self.config)
        layers = [_cache_layer(layer_type, kwargs, self.mode, self.hadamard, max_cache_len)
                  for layer_type, kwargs in zip(layer_types, per_layer_kwargs)]
        if not any(isinstance(layer, QuantizedPerTokenHeadLayer) for layer in layers):
            raise ValueError(
                f"this model has no attention layer whose keys and values could be quantized (layer types: "
                f"{sorted(set(layer_types))}); its state is not a KV cache: use transformers' DynamicCache"
            )
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        rotation = ", hadamard=True" if self.hadamard else ""
        return (f"{type(self).__name__}(mode={self.mode.value!r}{rotation}, layers={len(self.layers)}, "
                f"nbytes={self.nbytes})")

    def __deepcopy__(self, memo):
        # The config is shared, not copied: it belongs to the model, whose attention choice it reflects.
        memo[id(self.config)] = self.config
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone

    def crop(self, tokens_to_remove: int) -> None:
        """`Cache.crop`, all layers or none: every layer is checked before any is cropped."""
        for layer in self.layers:
            if isinstance(layer, QuantizedPerTokenHeadLayer):  # hybrid layers check their states too
                layer.check_crop(tokens_to_remove)
            elif isinstance(layer, LinearAttentionCacheLayerMixin):
                check_states_crop(layer, tokens_to_remove)
        super().crop(tokens_to_remove)

    # -- the convolution / recurrent states of hybrid models' other layers (transformers' `LinearAttentionLayer`) -----

    def _states_layer(self, layer_idx: int | None) -> None:
        """Refuse, clearly, a state call for a layer that keeps none here (a cache built without the config)."""
        if layer_idx is None:
            found = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in self.layers)
        else:
            found = layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], LinearAttentionCacheLayerMixin)
        if not found:
            which = "a layer" if layer_idx is None else f"layer {layer_idx}"
            raise ValueError(
                f"{which} of this model keeps a convolution or recurrent state (linear attention, Mamba), which this "
                "cache has no layer for: build it with config=model.config"
            )

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        self._states_layer(layer_idx)
        return super().has_previous_state(layer_idx, state_idx)

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._states_layer(layer_idx)
        return super().get_conv_state(layer_idx, state_idx)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        self._states_layer(layer_idx)
        return super().update_conv_state(conv_states, layer_idx, state_idx, **kwargs)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        self._states_layer(layer_idx)
        return super().get_recurrent_state(layer_idx, state_idx)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        self._states_layer(layer_idx)
        return super().update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)

    @property
    def hands_over_quantized(self) -> bool:
        """Whether `update` returns `QuantizedKV` buffers (the model runs hf_kvquant's attention) or dequantized
        tensors."""
        return getattr(self.config, "_attn_implementation", None) == ATTENTION_NAME

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Quantize and store the new keys and values of ``layer_idx``; return what attention reads
        (`QuantizedKV` for hf_kvquant's attention, dequantized tensors for any other)."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        if self.hands_over_quantized:
            return keys, values
        return keys.dequantize(), values.dequantize()

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on its devices: allocated capacity of all layers, scales included."""
        return sum(getattr(layer, "nbytes", 0) for layer in self.layers)

    def check_generation_length(self, max_length: int, max_new_tokens: int | None = None) -> None:
        """Refuse, before anything is written, a generation this preallocated cache cannot hold.

        ``max_length`` is `generate`'s: the prompt (tokens already cached included) plus the new tokens. All but the
        last new token are written to the cache (the last is never fed back), so it needs ``max_length - 1`` slots,
        as transformers sizes its own `StaticCache`. ``max_new_tokens``, where known, splits the numbers in the
        message. Raises a `ValueError` giving the numbers and the smallest ``max_cache_len`` that fits; a growable
        cache (no ``max_cache_len``) always fits. Importing hf_kvquant has `generate` call this before its first step
        (`hf_kvquant.integration`), so no token is generated and nothing is stored.
        """
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int (prompt + new tokens); got {max_length!r}")
        needed = max_length - 1
        if self.max_cache_len is None or needed <= self.max_cache_len:
            return
        if max_new_tokens is None:
            asked = f"max_length {max_length} - 1"
        else:
            asked = f"prompt {max_length - max_new_tokens} + max_new_tokens {max_new_tokens} - 1"
        raise ValueError(
            f"this cache holds max_cache_len={self.max_cache_len} tokens, but generate would write {needed} to it "
            f"({asked}: the last new token is never stored); build it with max_cache_len >= {needed}, or ask for "
            "fewer new tokens"
        )

    def save(self, path) -> None:
        """Write the cache to ``path``: a safetensors file of the live tokens' codes and scales, the counters and what
        the cache was built with (`hf_kvquant.persistence` describes the format). Read it back with `load`."""
        from .persistence import save_cache

        save_cache(self, path)

    @classmethod
    def load(cls, path, config=None, device=None, mode=None) -> QuantizedPerTokenHeadCache:
        """A cache written by `save`, built from the model's ``config`` (as the saved one was) and checked against it:
        layer count and types, sliding windows, kv heads, head_dim, and ``mode`` if given. Layers go to the CPU unless
        ``device`` (one device, or one per layer) says otherwise. Raises a `ValueError` naming the mismatch on any
        disagreement, and on a truncated, corrupted, non-safetensors or newer-format file. Continuing generation from
        the loaded cache gives the same tokens as from the saved one."""
        from .persistence import load_cache

        return load_cache(path, config=config, device=device, mode=mode, cls=cls)


def kv_cache_nbytes(cache: Cache) -> int:
    """Bytes held by any transformers cache (`DynamicCache`, `StaticCache`, ours), for side-by-side comparisons."""
    if isinstance(cache, QuantizedPerTokenHeadCache):
        return cache.nbytes
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


# -- hybrid models: layers that are not (only) attention ---------------------------------------------------------------

# Layer types whose cache is not keys and values: transformers' own `LinearAttentionLayer` keeps their convolution and
# recurrent (linear attention, Mamba) states, exactly as in `DynamicCache(config=...)` and `StaticCache`.
STATE_LAYER_TYPES = ("linear_attention", "conv")
# Layer types hf_kvquant cannot serve, with the reason its refusal gives.
_COMPRESSED_ATTENTION = ("compressed attention (DeepSeek-V4: keys and values compressed over blocks of tokens, with "
                         "their own cache layout) is not supported")
UNSUPPORTED_LAYER_TYPES = {
    "indexed_attention": (
        "indexed attention (DeepSeek sparse attention, e.g. deepseek_v32, glm_moe_dsa: an indexer with its own cache "
        "of indexer keys picks the tokens each query attends to) is not supported"
    ),
    "compressed_sparse_attention": _COMPRESSED_ATTENTION,
    "heavily_compressed_attention": _COMPRESSED_ATTENTION,
}


def _cache_layer(layer_type: str, kwargs: dict, mode: KVQuantMode, hadamard: bool, max_cache_len: int | None):
    """The cache layer for one entry of `get_layer_types_and_kwargs`, as transformers' `DYNAMIC_LAYER_TYPE_MAPPING` /
    `STATIC_LAYER_TYPE_MAPPING` pick theirs. Chunked attention (Llama 4) is cached as a sliding window of the chunk
    size, as transformers does: a token sees at most the ``chunk - 1`` tokens before it, and the mask (hf_kvquant's
    mask function gives the chunked one) hides those of earlier chunks."""
    window = kwargs.get("sliding_window")
    if layer_type in ("full_attention", "sliding_attention", "chunked_attention"):
        window = None if layer_type == "full_attention" else window
        if max_cache_len is not None:
            return QuantizedPerTokenHeadStaticLayer(mode, max_cache_len, hadamard=hadamard, sliding_window=window)
        if window is None:
            return QuantizedPerTokenHeadLayer(mode, hadamard=hadamard)
        return QuantizedPerTokenHeadSlidingWindowLayer(mode, window, hadamard=hadamard)
    if layer_type in ("hybrid", "hybrid_sliding"):  # a linear-attention state and attention in one layer
        window = window if layer_type == "hybrid_sliding" else None
        states = kwargs.get("number_of_states", 1)
        if max_cache_len is not None:
            return QuantizedStaticHybridLayer(mode, max_cache_len, hadamard=hadamard, sliding_window=window,
                                              number_of_states=states)
        if window is None:
            return QuantizedHybridLayer(mode, hadamard=hadamard, number_of_states=states)
        return QuantizedSlidingWindowHybridLayer(mode, window, hadamard=hadamard, number_of_states=states)
    if layer_type in STATE_LAYER_TYPES:
        return LinearAttentionLayer(**kwargs)
    if layer_type == "dummy":  # layers that reuse another layer's KV, or have no attention
        return DummyLayer()
    reason = UNSUPPORTED_LAYER_TYPES.get(layer_type, "is not supported")
    raise ValueError(
        f"layer type {layer_type!r}: {reason} by QuantizedPerTokenHeadCache; accepted: 'full_attention', "
        f"'sliding_attention', 'chunked_attention', 'hybrid', 'hybrid_sliding', "
        f"{', '.join(map(repr, STATE_LAYER_TYPES))} (kept in transformers' LinearAttentionLayer) and 'dummy'. Use "
        "transformers' DynamicCache for this model"
    )


def check_states_crop(layer: LinearAttentionCacheLayerMixin, tokens_to_remove: int) -> None:
    """Raise, changing nothing, where `crop` cannot put ``layer``'s convolution/recurrent states back as they were: a
    recurrent state holds no past to roll back to, and a convolution state keeps one only while recording the past.
    (transformers' `LinearAttentionLayer.crop` leaves a recurrent state as it is: silently wrong for a rollback.)"""
    if tokens_to_remove > 0:
        raise ValueError(
            f"crop({tokens_to_remove}): pass a negative number of tokens to remove (transformers' convention)"
        )
    if any(layer.is_recurrent_states_initialized.values()):
        raise RuntimeError("cannot crop a layer with a recurrent state (linear attention / Mamba): it keeps no past "
                           "to roll back to")
    if not layer.record_past and any(layer.is_conv_states_initialized.values()):
        raise RuntimeError("cannot crop a layer's convolution state without its past: call activate_past_recording() "
                           "before generating what you may roll back")


class _StatesAndQuantizedAttention(LinearAttentionLayer):
    """A hybrid layer (Falcon-H1, Zamba, ...: a linear-attention or Mamba block beside attention in the same layer):
    transformers' `LinearAttentionLayer` keeps the convolution/recurrent states, the quantized attention layer class
    that follows this one among the bases (``_attention``) keeps the keys and values, as transformers'
    `LinearAttentionAndFullAttentionLayer` combines its own two. `nbytes` counts the keys and values only (what
    `kv_cache_nbytes` counts for any cache); the states are the same size in every cache."""

    _attention: type[QuantizedPerTokenHeadLayer]

    def _init_states(self, number_of_states: int) -> None:
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._describe()}, states={self.number_of_states}, "
                f"tokens={self.get_seq_length()})")

    def lazy_initialization(self, *args, **kwargs) -> None:
        if args:  # from `update`: the keys and values
            self._attention.lazy_initialization(self, *args, **kwargs)
        else:  # from `update_conv_state` / `update_recurrent_state`
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def get_max_length(self) -> int:
        return self._attention.get_max_length(self)

    def get_seq_length(self):
        # The tokens the attention part holds (transformers 5.25's `LinearAttentionCacheLayerMixin` counts the
        # convolution's updates instead, which a model need not make once per token: Inkling's positions drifted).
        return self._attention.get_seq_length(self)

    def activate_past_recording(self, **kwargs) -> None:
        LinearAttentionLayer.activate_past_recording(self, **kwargs)  # 5.25: recurrent_states_to_keep=...
        if hasattr(self._attention, "activate_past_recording"):
            self._attention.activate_past_recording(self)

    def check_crop(self, tokens_to_remove: int) -> None:
        self._attention.check_crop(self, tokens_to_remove)
        check_states_crop(self, tokens_to_remove)

    def crop(self, tokens_to_remove: int) -> None:
        self.check_crop(tokens_to_remove)
        if any(self.is_conv_states_initialized.values()):
            LinearAttentionLayer.crop(self, tokens_to_remove)
        self._attention.crop(self, tokens_to_remove)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        self._attention.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        self._attention.reorder_cache(self, beam_idx)

    def _states_map(self, fn) -> None:
        for states, initialized in ((self.conv_states, self.is_conv_states_initialized),
                                    (self.recurrent_states, self.is_recurrent_states_initialized)):
            for i in states:
                if initialized[i]:
                    states[i] = fn(states[i])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._attention.batch_repeat_interleave(self, repeats)
        self._states_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._attention.batch_select_indices(self, indices)
        self._states_map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")

    def prefetch(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")


class QuantizedHybridLayer(_StatesAndQuantizedAttention, QuantizedPerTokenHeadLayer):
    """Layer type ``"hybrid"``: linear-attention states (transformers' classes) and full attention, quantized."""

    _attention = QuantizedPerTokenHeadLayer
    is_compileable = False  # the attention part grows

    def __init__(self, mode: KVQuantMode | str, hadamard: bool = False, number_of_states: int = 1):
        QuantizedPerTokenHeadLayer.__init__(self, mode, hadamard=hadamard)
        self._init_states(number_of_states)


class QuantizedSlidingWindowHybridLayer(_StatesAndQuantizedAttention, QuantizedPerTokenHeadSlidingWindowLayer):
    """Layer type ``"hybrid_sliding"``: linear-attention states and sliding-window attention, quantized."""

    _attention = QuantizedPerTokenHeadSlidingWindowLayer
    is_compileable = False

    def __init__(self, mode: KVQuantMode | str, sliding_window: int, hadamard: bool = False,
                 number_of_states: int = 1):
        QuantizedPerTokenHeadSlidingWindowLayer.__init__(self, mode, sliding_window, hadamard=hadamard)
        self._init_states(number_of_states)


class QuantizedStaticHybridLayer(_StatesAndQuantizedAttention, QuantizedPerTokenHeadStaticLayer):
    """Layer types ``"hybrid"`` / ``"hybrid_sliding"`` with ``max_cache_len``: linear-attention states and a
    preallocated quantized attention layer. Compileable unless recording the past (the states then grow)."""

    _attention = QuantizedPerTokenHeadStaticLayer

    def __init__(self, mode: KVQuantMode | str, max_cache_len: int, hadamard: bool = False,
                 sliding_window: int | None = None, number_of_states: int = 1):
        QuantizedPerTokenHeadStaticLayer.__init__(self, mode, max_cache_len, hadamard=hadamard,
                                                  sliding_window=sliding_window)
        self._init_states(number_of_states)
