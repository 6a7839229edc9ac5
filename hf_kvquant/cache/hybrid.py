"""Layers of hybrid models that keep convolution/recurrent states beside quantized keys and values: one class per
storage policy of the attention part (growable full, growable sliding, preallocated)."""

from __future__ import annotations

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin, LinearAttentionLayer

from ..modes import KVQuantMode
from .inputs import check_crop_argument
from .layer import QuantizedPerTokenHeadLayer
from .sliding import QuantizedPerTokenHeadSlidingWindowLayer
from .static import QuantizedPerTokenHeadStaticLayer


def states_not_saved(layer) -> str:
    """Why a layer with convolution/recurrent states cannot be saved: a file without them would mislead."""
    return (f"cannot save a cache layer of type {type(layer).__name__}: the convolution and recurrent states of hybrid "
            "models (linear attention, Mamba) are not saved")


def check_states_crop(layer: LinearAttentionCacheLayerMixin, tokens_to_remove: int) -> None:
    """Raise, changing nothing, where `crop` cannot put ``layer``'s convolution/recurrent states back as they were: a
    recurrent state holds no past to roll back to, and a convolution state keeps one only while recording the past.
    (transformers' `LinearAttentionLayer.crop` leaves a recurrent state as it is: silently wrong for a rollback.)"""
    check_crop_argument(tokens_to_remove)
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

    # the quantized layer's refusal, not `LinearAttentionLayer`'s offloading of the states alone
    offload = QuantizedPerTokenHeadLayer.offload
    prefetch = QuantizedPerTokenHeadLayer.prefetch

    def export_state(self):
        raise NotImplementedError(states_not_saved(self))


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

