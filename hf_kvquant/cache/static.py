"""`QuantizedPerTokenHeadStaticLayer`: a preallocated layer (``max_cache_len``) for compiled decoding."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..modes import KVQuantMode
from ..quantized_kv import QuantizedKV
from ..rotation import layer_rotation
from .layer import QuantizedPerTokenHeadLayer
from .state import state_counter


class QuantizedPerTokenHeadStaticLayer(QuantizedPerTokenHeadLayer):
    """One preallocated layer for compiled decoding (``max_cache_len``), full attention or a sliding window.

    All ``max_cache_len`` slots are allocated at the first update and never move, and the token count lives only on
    the device (``length``, updated in place), so a decode step changes no shape, no address and no host integer:
    ``torch.compile`` captures it once, in one CUDA graph. `update` writes the new tokens at slots ``[length, length +
    tokens)`` and hands attention the whole capacity as `QuantizedKV` with ``length``; transformers' mask for the layer
    (kv length ``max_cache_len``), or hf_kvquant's kernel reading ``length``, hides the slots not yet written. A
    sliding-window layer keeps every token too (its window is applied by the mask or the kernel), so it holds
    ``max_cache_len`` slots where the growable layer holds about one window.

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
        self.length = None  # 0-d int64 on the layer's device: the live slots [0, length)
        self._rotation = None

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

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
            self._release()  # all or nothing: no buffers without a length
            raise
        if self.hadamard:
            self._rotation = layer_rotation(key_states.shape[-1], value_states.shape[-1], self.device)
        if not torch.compiler.is_compiling():
            # Fixed addresses: CUDA graphs replay over these very tensors.
            for t in (*self.buffers, self.length):
                torch._dynamo.mark_static_address(t)

    def _slots(self, count: int, first: bool) -> torch.Tensor:
        return self.length + torch.arange(count, device=self.device)  # room checked by `_check_room`

    def _advance(self, count: int) -> tuple[QuantizedKV, QuantizedKV]:
        self.length.add_(count)
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

    def _forget(self, count: int) -> None:
        self.length.sub_(count)  # the slots are overwritten by the next update

    def reset(self) -> None:
        """Forget every token but keep the buffers and their addresses: the next `generate` reuses the compiled step."""
        if self.is_initialized:
            self.length.zero_()

    # -- state: the length instead of the growable counters -------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {"length": int(self.length)}  # a host read, once per layer: saving is not on the decode path

    def _live_tokens(self, counters: dict[str, int]) -> int:
        return counters["length"]

    def _check_counters(self, metadata: dict, name: str) -> int:
        length = state_counter(metadata, "length", name)
        if length > self.max_cache_len:
            raise ValueError(f"{name} holds {length} tokens, more than max_cache_len={self.max_cache_len}")
        return length

    def _restore_counters(self, metadata: dict, tokens: int) -> None:
        self.length.fill_(tokens)
