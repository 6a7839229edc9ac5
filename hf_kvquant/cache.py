"""`QuantizedPerTokenHeadCache`: a drop-in `transformers.Cache` that stores keys and values as INT8/FP8.

Each layer owns four buffers, ``key/value_data [batch, kv_heads, capacity, head_dim]`` (int8 or
float8_e4m3fn) and ``key/value_scale [batch, kv_heads, capacity]`` (float32), and never keeps a
full-precision copy of the past. Slots ``[0, stored)`` hold the latest ``stored`` tokens in position
order. Three layer classes:

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
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, get_layer_types_and_kwargs

from .modes import KVQuantMode
from .ops import quantize_into
from .quantized_kv import ATTENTION_NAME, QuantizedKV
from .rotation import hadamard_matrix, rotate

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The head dims hf_kvquant's attention kernels are built for.
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)

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


# One shared 0..N-1 ramp per device: the write slots of an update are a view of it, so a decode
# step launches no extra kernel to build them.
_SLOT_RAMPS: dict[torch.device, torch.Tensor] = {}


def _slot_range(device: torch.device, start: int, count: int) -> torch.Tensor:
    ramp = _SLOT_RAMPS.get(device)
    if ramp is None or ramp.numel() < start + count:
        ramp = torch.arange(_round_up(2 * (start + count), 4096), device=device)
        _SLOT_RAMPS[device] = ramp
    return ramp[start : start + count]


def _check_hadamard(hadamard) -> bool:
    if not isinstance(hadamard, bool):
        raise ValueError(f"hadamard must be True or False; got {hadamard!r}")
    return hadamard


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
        """Bytes this layer holds on its device: allocated capacity, scales included (the Hadamard matrix of a
        ``hadamard=True`` layer is shared by all layers and caches and not counted)."""
        return sum(t.nbytes for t in self.buffers)

    @property
    def rotation(self) -> torch.Tensor | None:
        """``R [head_dim, head_dim]`` float32 that keys and values are rotated by before quantizing, or None
        (``hadamard=False``, or nothing stored yet). Looked up, not held: copies of the layer share it."""
        if not self.hadamard or self.key_data is None:
            return None
        return hadamard_matrix(self.key_data.shape[-1], self.device)

    def _initial_capacity(self) -> int:
        return 0  # grown as tokens arrive

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch, heads, _, head_dim = key_states.shape
        self._allocate(batch, heads, head_dim, self._initial_capacity())
        self.is_initialized = True

    def _allocate(self, batch: int, heads: int, head_dim: int, capacity: int, drop: int = 0) -> None:
        """New buffers of ``capacity`` slots holding the stored tokens but the ``drop`` oldest."""
        spec = self.mode.spec
        codes_per_head = head_dim // spec.values_per_byte
        # All four buffers are built before any is replaced: an allocation failure changes nothing.
        try:
            new = (
                torch.zeros(batch, heads, capacity, codes_per_head, dtype=spec.storage_dtype, device=self.device),
                torch.zeros(batch, heads, capacity, dtype=torch.float32, device=self.device),
                torch.zeros(batch, heads, capacity, codes_per_head, dtype=spec.storage_dtype, device=self.device),
                torch.zeros(batch, heads, capacity, dtype=torch.float32, device=self.device),
            )
        except torch.OutOfMemoryError as e:
            asked = 2 * batch * heads * capacity * (codes_per_head * spec.storage_dtype.itemsize + 4)
            raise torch.OutOfMemoryError(
                f"hf_kvquant: out of memory on {self.device} allocating {asked} bytes for {capacity} slots of a layer "
                f"(batch {batch}, kv_heads {heads}, head_dim {head_dim}) that holds {self.nbytes} bytes; the layer keeps "
                "its buffers"
            ) from e
        for old, fresh in zip(self.buffers, new):
            _as_bytes(fresh)[:, :, : self.stored - drop] = _as_bytes(old)[:, :, drop : self.stored]
        self.key_data, self.key_scale, self.value_data, self.value_scale = new
        self.stored -= drop

    def _reallocate(self, capacity: int, drop: int = 0) -> None:
        batch, heads, _, head_dim = self.key_data.shape
        self._allocate(batch, heads, head_dim * self.mode.spec.values_per_byte, capacity, drop)

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
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                "key_states and value_states must both be [batch, kv_heads, tokens, head_dim] of one shape; got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.dtype not in SUPPORTED_DTYPES or value_states.dtype != key_states.dtype:
            raise ValueError(
                f"unsupported key/value dtype {key_states.dtype}/{value_states.dtype}; accepted: one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} for both"
            )
        head_dim = key_states.shape[-1]
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"unsupported head_dim {head_dim}; accepted: {SUPPORTED_HEAD_DIMS}")
        if key_states.device != value_states.device:
            raise ValueError(f"key_states on {key_states.device} but value_states on {value_states.device}")
        if self.is_initialized:
            if key_states.device != self.device:
                raise ValueError(f"key/value states on {key_states.device}, but this layer's cache is on {self.device}")
            batch, heads, _, _ = self.key_data.shape
            cached = (batch, heads, self.key_data.shape[-1] * self.mode.spec.values_per_byte)
            if tuple(key_states.shape[:2]) + (head_dim,) != cached:
                raise ValueError(
                    f"key/value states of (batch, kv_heads, head_dim) = {(*key_states.shape[:2], head_dim)} do not "
                    f"match the cache's {cached}"
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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        past_visible = self._past_visible()
        self._reserve(count)
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
        """Remove the last ``-tokens_to_remove`` tokens (a negative number, as in transformers 5); ``crop(0)`` keeps all."""
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
        if count > self.max_cache_len:
            raise ValueError(f"{count} new tokens exceed this cache's max_cache_len={self.max_cache_len}")
        if not self.is_initialized:
            return
        if self.length.is_cuda or torch.compiler.is_compiling():
            # Reading the count would synchronise (or break the graph): the device checks it before the write.
            torch._assert_async(self.length + count <= self.max_cache_len,
                                f"hf_kvquant: more tokens than this cache's max_cache_len={self.max_cache_len}")
        elif int(self.length) + count > self.max_cache_len:
            needed = int(self.length) + count
            raise ValueError(f"{needed} tokens exceed this cache's max_cache_len={self.max_cache_len}")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        try:
            self.length = torch.zeros((), dtype=torch.int64, device=self.device)
        except torch.OutOfMemoryError:
            QuantizedPerTokenHeadLayer.reset(self)  # all or nothing: no buffers without a length
            raise
        if self.hadamard:
            self._rotation = hadamard_matrix(key_states.shape[-1], self.device)
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
        if max_cache_len is None:
            full_layer = functools.partial(QuantizedPerTokenHeadLayer, self.mode, hadamard=self.hadamard)
            sliding_layer = functools.partial(
                QuantizedPerTokenHeadSlidingWindowLayer, self.mode, hadamard=self.hadamard)
        else:
            full_layer = sliding_layer = functools.partial(
                QuantizedPerTokenHeadStaticLayer, self.mode, max_cache_len, hadamard=self.hadamard)
        if self.config is None:
            super().__init__(layer_class_to_replicate=full_layer)
            return
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(self.config)
        layers = []
        for layer_type, kwargs in zip(layer_types, per_layer_kwargs):
            if layer_type == "full_attention":
                layers.append(full_layer())
            elif layer_type == "sliding_attention":
                layers.append(sliding_layer(sliding_window=kwargs["sliding_window"]))
            elif layer_type == "dummy":  # layers that reuse another layer's KV, or have no attention
                layers.append(DummyLayer())
            else:
                raise ValueError(
                    f"layer type {layer_type!r} is not supported by QuantizedPerTokenHeadCache; "
                    "accepted: 'full_attention', 'sliding_attention'"
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
            if isinstance(layer, QuantizedPerTokenHeadLayer):
                layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    @property
    def hands_over_quantized(self) -> bool:
        """Whether `update` returns `QuantizedKV` buffers (the model runs hf_kvquant's attention) or dequantized tensors."""
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
