"""`QuantizedPerTokenHeadStaticSlidingWindowLayer`: a preallocated sliding-window layer that holds one window.

A sliding-window layer attends to the last ``sliding_window`` tokens (the new one included), so, like transformers'
`StaticSlidingWindowLayer`, it keeps ``min(sliding_window, max_cache_len)`` slots, a ring buffer: the token at position
``p`` lives in slot ``p % capacity``. A decode step writes one slot (``length % capacity``, on the device) and hands
attention the ring with ``length`` (`QuantizedKV` with ``ring=True``), which hf_kvquant's kernel reads in slot order,
each token placed by its position (`hf_kvquant.ops.attention`). Nothing moves and no host integer changes from step to
step, so a decode step compiles into one CUDA graph, as over a full preallocated layer.

A step of several tokens whose writes would overwrite tokens its own queries still see (a prompt longer than the
window, or a chunk past it) is eager only (it reads the length on the host): its queries attend to a window built for
the call, the ``sliding_window - 1`` tokens before the chunk gathered from the ring plus the chunk itself, and the last
``capacity`` tokens then go into the ring, as transformers' layer returns the concatenated states for such a step.

For other attention implementations every view is dequantized into the mask's columns (``max_cache_len``, one per
position, `get_mask_sizes` as a full preallocated layer), the tokens no longer held as zeros that the window masks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..modes import KVQuantMode
from ..ops import quantize_into
from ..quantized_kv import QuantizedKV
from ..rotation import rotate
from .static import QuantizedPerTokenHeadStaticLayer
from .storage import as_bytes


class QuantizedPerTokenHeadStaticSlidingWindowLayer(QuantizedPerTokenHeadStaticLayer):
    """A preallocated sliding-window layer (``max_cache_len``): a ring of ``min(sliding_window, max_cache_len)``
    slots, compileable like `QuantizedPerTokenHeadStaticLayer`, holding one window where that one holds
    ``max_cache_len`` slots."""

    def __init__(self, mode: KVQuantMode | str, max_cache_len: int, sliding_window: int, hadamard: bool = False):
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int; got {sliding_window!r}")
        super().__init__(mode, max_cache_len, hadamard=hadamard, sliding_window=sliding_window)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self._describe()}, sliding_window={self.sliding_window}, "
                f"tokens={self.get_seq_length()}, capacity={self._initial_capacity()})")

    def _initial_capacity(self) -> int:
        return min(self.sliding_window, self.max_cache_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._check_input(key_states, value_states)
        count = key_states.shape[-2]
        if count == 1 or not self.is_initialized and count <= self._initial_capacity():
            return self._write(key_states, value_states)  # no query of this step needs a slot it overwrites
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                f"a compiled step of {count} tokens over a preallocated sliding-window layer: its writes could "
                "overwrite tokens its own queries see; compile single-token decode steps (as generate does), or run "
                "this step eagerly")
        held = int(self.length) if self.is_initialized else 0  # a host read: a multi-token step, not the decode path
        if held + count <= self._initial_capacity():
            return self._write(key_states, value_states)
        return self._update_past_the_ring(key_states, value_states, held)

    def _slots(self, count: int, first: bool) -> torch.Tensor:
        return (self.length + torch.arange(count, device=self.device)) % self.capacity

    def _advance(self, count: int) -> tuple[QuantizedKV, QuantizedKV]:
        self.length.add_(count)
        keys, values = self._view(0, self.capacity)
        ring = dict(length=self.length, ring=True, columns=self.max_cache_len)
        return replace(keys, **ring), replace(values, **ring)

    def _update_past_the_ring(self, key_states: torch.Tensor, value_states: torch.Tensor, held: int):
        """A step whose tokens wrap the ring: attention over a window built for it (the tokens before the step that
        its first query sees, then the step's own), and the last ``capacity`` tokens into the ring."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count, capacity = key_states.shape[-2], self.capacity
        past = min(held, self.sliding_window - 1)
        window = [torch.empty((*t.shape[:2], past + count, *t.shape[3:]), dtype=t.dtype, device=self.device)
                  for t in self.buffers]  # the step's own memory: all of it before the ring changes
        positions = torch.arange(held - past, held + count, device=self.device)
        for t, w in zip(self.buffers, window):
            as_bytes(w)[:, :, :past] = as_bytes(t).index_select(2, positions[:past] % capacity)
        rotation = self.rotation
        quantize_into(rotate(key_states, rotation), rotate(value_states, rotation),
                      torch.arange(past, past + count, device=self.device), window, self.mode)
        kept = positions[-capacity:]  # the ring's tokens after the step
        for t, w in zip(self.buffers, window):
            as_bytes(t).index_copy_(2, kept % capacity, as_bytes(w)[:, :, -len(kept):])
        self.length.add_(count)
        first = held - past
        return tuple(QuantizedKV(data, scale, 0, past + count, self.mode, self.dtype, rotation, mask_offset=first,
                                 columns=self.max_cache_len)
                     for data, scale in ((window[0], window[1]), (window[2], window[3])))

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can go back: only where the ring never overwrites a token (``max_cache_len`` at most the
        window), as transformers' `StaticSlidingWindowLayer` decides; past the window the slots hold only the last
        tokens written, whatever was cropped since."""
        return self.max_cache_len <= self.sliding_window

    def check_crop(self, tokens_to_remove: int) -> None:
        super().check_crop(tokens_to_remove)
        if tokens_to_remove and self.is_initialized and not self.is_croppable:
            raise RuntimeError(
                f"cannot remove {-tokens_to_remove} tokens: this preallocated sliding-window layer keeps one window "
                f"({self.sliding_window} slots of max_cache_len={self.max_cache_len}) and overwrites older tokens; for "
                "rollbacks (assisted decoding) use a growable cache (no max_cache_len), or max_cache_len <= "
                f"{self.sliding_window}")

    # -- state: the window's tokens in position order ---------------------------------------------------------------

    def export_state(self):
        metadata, tensors = super().export_state()
        if self.is_initialized:
            held = metadata["length"]
            live = min(held, self.capacity)
            slots = torch.arange(held - live, held, device=self.device) % self.capacity
            tensors = {name: as_bytes(t).index_select(2, slots).view(t.dtype).cpu()
                       for name, t in zip(tensors, self.buffers)}
        return metadata, tensors

    def _live_tokens(self, counters: dict[str, int]) -> int:
        return min(counters["length"], self._initial_capacity())

    def _check_counters(self, metadata: dict, name: str) -> int:
        return min(super()._check_counters(metadata, name), self._initial_capacity())

    def _restore_counters(self, metadata: dict, tokens: int) -> None:
        self.length.fill_(metadata["length"])

    def restore_state(self, metadata: dict, tensors: dict[str, torch.Tensor], device=None, name: str = "layer"):
        """`QuantizedPerTokenHeadStaticLayer.restore_state` for the window: a state of any version holds the last
        ``min(length, capacity)`` tokens, or (format version 1, a layer that kept every token) all ``length`` of them,
        of which the last ``capacity`` are kept."""
        length = metadata.get("length") if metadata.get("initialized") else None
        if type(length) is int and tensors and tensors.get("key_scale") is not None:
            stored = tensors["key_scale"].shape[-1]
            if stored == length and stored > self._initial_capacity():  # every token, as version 1 kept them
                tensors = {key: t[:, :, stored - self._initial_capacity():] for key, t in tensors.items()}
        super().restore_state(metadata, tensors, device, name)
        if metadata.get("initialized") and self.length is not None:
            held = int(self.length)
            live = min(held, self.capacity)
            if held > self.capacity:  # the tokens were copied to slots [0, live) in position order: into the ring
                slots = torch.arange(held - live, held, device=self.device) % self.capacity
                for t in self.buffers:
                    as_bytes(t).index_copy_(2, slots, as_bytes(t)[:, :, :live].clone())
