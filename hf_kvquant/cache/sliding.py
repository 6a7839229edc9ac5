"""`QuantizedPerTokenHeadSlidingWindowLayer`: a growable sliding-window layer that keeps about one window."""

from __future__ import annotations

import torch

from ..modes import KVQuantMode
from ..quantized_kv import QuantizedKV
from .layer import QuantizedPerTokenHeadLayer
from .state import state_counter
from .storage import HeadDimMinor, grown_capacity


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
    value_layout = HeadDimMinor

    def __init__(self, mode: KVQuantMode | str, sliding_window: int, hadamard: bool = False):
        super().__init__(mode, hadamard=hadamard)
        self.sliding_window = sliding_window
        self.record_past = False  # set by generate for assisted decoding: keep what a later crop may need
        self._rollback_base = 0  # cumulative_length at the last crop while recording the past

    def _describe(self) -> str:
        return f"{super()._describe()}, sliding_window={self.sliding_window}"

    def _tokens_to_keep(self) -> int:
        pending = self.cumulative_length - self._rollback_base if self.record_past else 0
        return min(self.stored, self.sliding_window - 1 + pending)

    def _past_visible(self) -> int:
        return min(self.cumulative_length, self.sliding_window - 1)

    def _advance(self, count: int) -> tuple[QuantizedKV, QuantizedKV]:
        keys, values = super()._advance(count)
        # A whole prompt longer than the window: give the memory back (the views keep the old buffers for this step).
        keep = self._tokens_to_keep()
        if self.capacity > 2 * grown_capacity(max(keep, self.sliding_window)):
            try:
                self._reallocate(grown_capacity(keep), self.stored - keep)
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

    # -- state: assisted decoding's, kept even before the first token --------------------------------------------

    def _extra_state(self) -> dict:
        return {"record_past": self.record_past, "rollback_base": self._rollback_base}

    def _check_extra_state(self, metadata: dict, name: str) -> None:
        """The rollback base is a position already seen."""
        seen = metadata.get("cumulative_length") if metadata["initialized"] else 0
        record, base = metadata.get("record_past"), metadata.get("rollback_base")
        if type(record) is not bool or type(base) is not int or type(seen) is not int or not 0 <= base <= seen:
            raise ValueError(f"malformed cache metadata: {name} record_past/rollback_base is {record!r}/{base!r} "
                             f"with {seen!r} tokens seen")

    def _check_counters(self, metadata: dict, name: str) -> int:
        stored, seen = state_counter(metadata, "stored", name), state_counter(metadata, "cumulative_length", name)
        needed = min(seen, self.sliding_window - 1)
        if not needed <= stored <= seen:
            raise ValueError(f"{name} (sliding window {self.sliding_window}) has {seen} tokens seen and {stored} "
                             f"stored; expected between {needed} and {seen} stored")
        return stored

    def _restore_extra_state(self, metadata: dict) -> None:
        self.record_past, self._rollback_base = metadata["record_past"], metadata["rollback_base"]
