"""`QuantizedPerTokenHeadLayer`: one full-attention layer's quantized keys and values, growing as tokens arrive; the
base of every quantized layer.

It holds the skeleton all of them share: `update` checks the input, makes room for the new tokens (`_slots`), quantizes
them into the buffers (one kernel launch, `hf_kvquant.ops.quantize_into`) and advances the counters (`_advance`), which
returns what attention reads. The subclasses change the storage policy through these hooks only:
`QuantizedPerTokenHeadSlidingWindowLayer` (``sliding.py``) keeps about one window, `QuantizedPerTokenHeadStaticLayer`
(``static.py``) is preallocated with its length on the device.

Each layer also exports and restores its own state (`export_state`, `check_state`, `restore_state`), which
`hf_kvquant.persistence` writes to and reads from a file.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..modes import KVQuantMode
from ..ops import quantize_into
from ..quantized_kv import QuantizedKV
from ..rotation import KeyValueRotation, layer_rotation, rotate
from .inputs import DTYPE_NAMES, check_crop_argument, check_hadamard, check_new_states
from .state import BUFFER_NAMES, check_state_tensors, state_counter
from .storage import TokenMinor, as_bytes, grown_capacity, slot_range


class QuantizedPerTokenHeadLayer(CacheLayerMixin):
    """One full-attention layer's quantized keys and values: every token stays, in slots ``[0, stored)``; the capacity
    grows in steps of a small fraction of the length (`hf_kvquant.cache.storage.grown_capacity`), never per decode
    step and never by doubling, so the memory held stays close to the memory used.

    With ``hadamard=True`` it stores ``quantize(x @ R)`` (`hf_kvquant.rotation`) and hands ``R`` over with the buffers.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    sliding_window: int | None = None
    # How value codes sit in memory (`hf_kvquant.cache.storage`): token-minor where the views handed to attention
    # start at slot 0.
    value_layout = TokenMinor

    def __init__(self, mode: KVQuantMode | str, hadamard: bool = False):
        super().__init__()
        self.mode = KVQuantMode.parse(mode)
        self.hadamard = check_hadamard(hadamard)
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
                self.value_layout.zeros(batch, heads, capacity, value_codes, spec.storage_dtype, self.device),
                torch.zeros(batch, heads, capacity, dtype=torch.float32, device=self.device),
            )
        except torch.OutOfMemoryError as e:
            value_slots = self.value_layout.slots(capacity)
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
            as_bytes(fresh)[:, :, : self.stored - drop] = as_bytes(old)[:, :, drop : self.stored]
        self.key_data, self.key_scale, self.value_data, self.value_scale = new
        self.stored -= drop

    def _reallocate(self, capacity: int, drop: int = 0) -> None:
        batch, heads = self.key_data.shape[:2]
        self._allocate(batch, heads, *self.head_dims, capacity, drop)

    def _release(self) -> None:
        """Drop the buffers and every token: the next update starts afresh."""
        self.key_data = self.key_scale = self.value_data = self.value_scale = None
        self.stored = self.cumulative_length = 0
        self.is_initialized = False

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
            kept = [as_bytes(t)[:, :, drop : self.stored].clone() for t in self.buffers]
            for t, k in zip(self.buffers, kept):
                as_bytes(t)[:, :, : self.stored - drop] = k
            self.stored -= drop
        else:
            self._reallocate(grown_capacity(self.stored - drop + count), drop)

    # -- update: one skeleton, the storage policy in hooks ----------------------------------------------------

    def _check_input(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Reject what this layer cannot store, before anything changes."""
        head_dims = check_new_states(key_states, value_states, self.mode.spec.values_per_byte)
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

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[QuantizedKV, QuantizedKV]:
        """Quantize and store ``[batch, kv_heads, tokens, head_dim]`` keys and values; return what attention sees
        (the stored tokens the mask describes, the new ones included) as `QuantizedKV` views."""
        self._check_input(key_states, value_states)
        return self._write(key_states, value_states)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[QuantizedKV, QuantizedKV]:
        """`update` past its checks: store the new tokens, return the views."""
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[-2]
        slots = self._slots(count, first)
        rotation = self.rotation
        quantize_into(rotate(key_states, rotation), rotate(value_states, rotation), slots, self.buffers, self.mode)
        return self._advance(count)

    def _slots(self, count: int, first: bool) -> torch.Tensor:
        """Make room for ``count`` new tokens; return the slots they go to (a device tensor)."""
        try:
            self._reserve(count)
        except torch.OutOfMemoryError:
            if first:  # all or nothing: not initialized either, so the next first update may bring another shape
                self._release()
            raise
        return slot_range(self.device, self.stored, count)

    def _advance(self, count: int) -> tuple[QuantizedKV, QuantizedKV]:
        """Count the ``count`` tokens just written; return the views attention reads."""
        past_visible = self._past_visible()
        self.stored += count
        self.cumulative_length += count
        return self._view(self.stored - past_visible - count, self.stored)

    def _past_visible(self) -> int:
        """How many stored tokens the next forward pass attends to besides its own."""
        return self.stored

    def _view(self, start: int, end: int) -> tuple[QuantizedKV, QuantizedKV]:
        rotation = self.rotation
        return (
            QuantizedKV(self.key_data, self.key_scale, start, end, self.mode, self.dtype, rotation),
            QuantizedKV(self.value_data, self.value_scale, start, end, self.mode, self.dtype, rotation),
        )

    # -- the rest of the Cache layer contract -----------------------------------------------------------------

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
        check_crop_argument(tokens_to_remove)
        if self.is_initialized and tokens_to_remove:
            held = int(self.get_seq_length())  # a host read on a preallocated layer: assisted decoding's rollback
            if -tokens_to_remove > held:
                raise ValueError(f"cannot remove {-tokens_to_remove} tokens from a layer holding {held}")

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative number, as in transformers 5); ``crop(0)`` keeps
        all."""
        self.check_crop(tokens_to_remove)
        if self.is_initialized:  # a layer no update reached (KV sharing): nothing to remove, as in transformers
            self._forget(-tokens_to_remove)

    def _forget(self, count: int) -> None:
        """Forget the last ``count`` tokens (checked by `check_crop`)."""
        self.stored -= count
        self.cumulative_length -= count

    def reset(self) -> None:
        self._release()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place (the buffers keep their storage)."""
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            reordered = [as_bytes(t).index_select(0, beam_idx) for t in self.buffers]  # all first: all or nothing
            for t, r in zip(self.buffers, reordered):
                as_bytes(t).copy_(r)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._replace_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self.device) if isinstance(indices, torch.Tensor) else indices
            self._replace_buffers(lambda t: t[indices])

    def _replace_buffers(self, fn) -> None:
        new = [fn(as_bytes(t)).view(t.dtype) for t in self.buffers]
        new[2] = self.value_layout.arrange(new[2])
        self.key_data, self.key_scale, self.value_data, self.value_scale = new

    def offload(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")

    def prefetch(self):
        raise NotImplementedError("QuantizedPerTokenHeadCache does not offload layers to the CPU")

    # -- state: what `hf_kvquant.persistence` writes to a file and reads back ------------------------------------

    @property
    def layer_type(self) -> str:
        """The config's layer type this layer caches, as its state names it."""
        return "sliding_attention" if self.is_sliding else "full_attention"

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(metadata, tensors) for `restore_state`: JSON-able fields (``type``, ``sliding_window``, ``initialized``,
        and for an initialized layer ``dtype`` and its counters) and the live slots of its four buffers
        ``[batch, kv_heads, tokens, codes]`` / ``[batch, kv_heads, tokens]`` (`BUFFER_NAMES`), copied to the CPU. A
        host read: not for the decode path."""
        metadata = {"type": self.layer_type, "sliding_window": self.sliding_window, "initialized": self.is_initialized,
                    **self._extra_state()}
        if not self.is_initialized:
            return metadata, {}
        metadata["dtype"] = str(self.dtype).removeprefix("torch.")
        counters = self._counters()
        metadata.update(counters)
        tokens = self._live_tokens(counters)
        return metadata, {name: t[:, :, :tokens].cpu().contiguous() for name, t in zip(BUFFER_NAMES, self.buffers)}

    def _extra_state(self) -> dict:
        """Fields a layer keeps even before its first token."""
        return {}

    def _counters(self) -> dict[str, int]:
        return {"stored": self.stored, "cumulative_length": self.cumulative_length}

    def _live_tokens(self, counters: dict[str, int]) -> int:
        return counters["stored"]

    def check_state(self, metadata: dict, name: str = "layer") -> int:
        """Check ``metadata`` (of `export_state`, read back from a file) against this layer, changing nothing: type,
        sliding window, counters. Return the live tokens. Raises a `ValueError` saying what disagrees, the layer called
        ``name``."""
        if metadata.get("type") != self.layer_type:
            raise ValueError(f"{name} type mismatch: expected {self.layer_type}, found {metadata.get('type')}")
        if metadata.get("sliding_window") != self.sliding_window:
            raise ValueError(f"{name} sliding_window mismatch: expected {self.sliding_window}, found "
                             f"{metadata.get('sliding_window')}")
        if not isinstance(metadata.get("initialized"), bool):
            raise ValueError(f"malformed cache metadata: {name} 'initialized' is {metadata.get('initialized')!r}")
        self._check_extra_state(metadata, name)
        if not metadata["initialized"]:
            return 0
        if metadata.get("dtype") not in DTYPE_NAMES:
            raise ValueError(f"{name} dtype {metadata.get('dtype')!r} is not one of {sorted(DTYPE_NAMES)}")
        return self._check_counters(metadata, name)

    def _check_extra_state(self, metadata: dict, name: str) -> None:
        pass

    def _check_counters(self, metadata: dict, name: str) -> int:
        stored, seen = state_counter(metadata, "stored", name), state_counter(metadata, "cumulative_length", name)
        if stored != seen:
            raise ValueError(f"{name} token count (stored vs cumulative_length) mismatch: expected {seen}, found "
                             f"{stored}")
        return stored

    def restore_state(self, metadata: dict, tensors: dict[str, torch.Tensor], device=None, name: str = "layer"):
        """Fill this new, empty layer with what `export_state` gave, on ``device`` (the CPU by default). Everything is
        checked first (`check_state`, then the tensors' dtypes and shapes against the mode and the counters, then what
        an update would refuse); a `ValueError` names the mismatch, the layer called ``name``."""
        if self.is_initialized:
            raise RuntimeError(f"restore_state fills a new layer; {name} already holds tokens")
        tokens = self.check_state(metadata, name)
        if metadata["initialized"]:
            batch, heads, head_dims = check_state_tensors(tensors, tokens, self.mode.spec, name)
            dtype, device = DTYPE_NAMES[metadata["dtype"]], torch.device("cpu" if device is None else device)
            keys, values = (torch.zeros((batch, heads, 0, d), dtype=dtype, device=device) for d in head_dims)
            self._check_input(keys, values)  # what the layer would refuse from the model (a head too wide for CUDA)
        elif tensors:
            raise ValueError(f"{name} holds no tokens, but tensors were given for it: {sorted(tensors)}")
        self._restore_extra_state(metadata)
        if metadata["initialized"]:
            self.lazy_initialization(keys, values)  # buffers, dtype, device (and what a subclass keeps beside them)
            self._restore_counters(metadata, tokens)
            for buffer, name_ in zip(self.buffers, BUFFER_NAMES):
                as_bytes(buffer)[:, :, :tokens].copy_(as_bytes(tensors[name_]))

    def _restore_extra_state(self, metadata: dict) -> None:
        pass

    def _restore_counters(self, metadata: dict, tokens: int) -> None:
        if tokens:  # the capacity the growth policy gives these tokens
            self._reallocate(grown_capacity(tokens))
        self.stored, self.cumulative_length = tokens, metadata["cumulative_length"]
