"""`QuantizedPerTokenHeadCache`: a drop-in `transformers.Cache` that stores keys and values as INT8/FP8.

Each attention layer owns four buffers, ``key/value_data [batch, kv_heads, capacity, head_dim]`` (int8 or
float8_e4m3fn) and ``key/value_scale [batch, kv_heads, capacity]`` (float32) (`hf_kvquant.cache.storage`), and never
keeps a full-precision copy of the past. The layer class of each layer type is picked from a table
(`hf_kvquant.cache.factory`): growable full attention (`QuantizedPerTokenHeadLayer`), growable sliding window
(`QuantizedPerTokenHeadSlidingWindowLayer`), preallocated (`QuantizedPerTokenHeadStaticLayer`, ``max_cache_len``, for
compiled decoding), their hybrid-model combinations, and transformers' own classes for state and dummy layers.

What `update` hands to attention is described in `hf_kvquant.quantized_kv`.

With ``hadamard=True`` the new keys and values are rotated by the orthogonal Hadamard matrix of
`hf_kvquant.rotation` before they are quantized (fewer outliers per token-head, so a finer scale); the
buffers then hold rotated values, and everything handed out un-rotates them or says how to.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers.cache_utils import Cache, DummyLayer, LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

from ..generation import install_generate_length_check
from ..modes import KVQuantMode
from ..persistence import load_cache, save_cache
from ..quantized_kv import ATTENTION_NAME
from .factory import cache_layer
from .hybrid import check_states_crop, states_not_saved
from .inputs import check_hadamard
from .layer import QuantizedPerTokenHeadLayer


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
        self.hadamard = check_hadamard(hadamard)
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len <= 0):
            raise ValueError(f"max_cache_len must be a positive int or None; got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.config = None if config is None else config.get_text_config(decoder=True)
        if max_cache_len is not None:
            install_generate_length_check(unless_removed=True)  # a too-small cache: refused before step one
        if self.config is None:  # full-attention layers, added as `update` reaches them
            super().__init__(layer_class_to_replicate=functools.partial(
                cache_layer, "full_attention", {}, self.mode, self.hadamard, max_cache_len))
            return
        # One layer per entry of the config's layer types, as `DynamicCache(config=...)` / `StaticCache` build them:
        # attention layers quantized, the conv / recurrent states of hybrid models in transformers' own classes.
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(self.config)
        layers = [cache_layer(layer_type, kwargs, self.mode, self.hadamard, max_cache_len)
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
        cache (no ``max_cache_len``) always fits. Building a cache with ``max_cache_len`` has `generate` call this
        before its first step (`hf_kvquant.install_generate_length_check`), so no token is generated and nothing is
        stored.
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
        save_cache(self.export_state(), path)

    @classmethod
    def load(cls, path, config=None, device=None, mode=None) -> QuantizedPerTokenHeadCache:
        """A cache written by `save`, built from the model's ``config`` (as the saved one was) and checked against it:
        layer count and types, sliding windows, kv heads, head_dim, and ``mode`` if given. Layers go to the CPU unless
        ``device`` (one device, or one per layer) says otherwise. Raises a `ValueError` naming the mismatch on any
        disagreement, and on a truncated, corrupted, non-safetensors or newer-format file. Continuing generation from
        the loaded cache gives the same tokens as from the saved one."""
        return load_cache(path, cls, config=config, device=device, mode=mode)

    # -- state: what `save` writes (`hf_kvquant.persistence` keeps the file format) -------------------------------

    def export_state(self) -> tuple[dict, list[dict[str, torch.Tensor]]]:
        """(fields, tensors): ``mode``, ``hadamard``, ``max_cache_len`` and ``layers`` (each layer's metadata, from its
        `export_state`), and each layer's tensors. A host copy of the live tokens: not for the decode path."""
        states = [_layer_state(layer) for layer in self.layers]
        fields = dict(mode=self.mode.value, hadamard=self.hadamard, max_cache_len=self.max_cache_len,
                      layers=[metadata for metadata, _ in states])
        return fields, [tensors for _, tensors in states]

    def check_state(self, layers: list[dict]) -> list[int]:
        """Check the layer descriptions of a saved cache (``layers`` of `export_state`) against this new cache, built
        as the saved one was; return each layer's live tokens. A cache built without a config first gets one
        full-attention layer per description (it makes them as `update` reaches them). Raises a `ValueError` naming
        the first disagreement."""
        if self.layer_class_to_replicate is not None:
            for index, entry in enumerate(layers):
                if entry.get("type") != "full_attention":
                    raise ValueError(f"layer {index} is {entry.get('type')!r}; a cache built without a config has only "
                                     "full-attention layers: pass the model's config to load this file")
            while len(self.layers) < len(layers):
                self.layers.append(self.layer_class_to_replicate())
        if len(self.layers) != len(layers):
            raise ValueError(f"number of layers mismatch: expected {len(self.layers)} (the config's), found "
                             f"{len(layers)}")
        return [_check_layer_state(layer, entry, f"layer {index}")
                for index, (layer, entry) in enumerate(zip(self.layers, layers))]

    def restore_layer_state(self, index: int, metadata: dict, tensors: dict[str, torch.Tensor], device=None) -> None:
        """Fill layer ``index`` of this new cache with its saved state (`QuantizedPerTokenHeadLayer.restore_state`, on
        ``device``), checked, and check that the layers filled so far agree on the batch size."""
        layer = self.layers[index]
        _check_layer_state(layer, metadata, f"layer {index}")
        if isinstance(layer, QuantizedPerTokenHeadLayer):
            layer.restore_state(metadata, tensors, device, name=f"layer {index}")
        batches = {layer.key_data.shape[0] for layer in self.layers
                   if isinstance(layer, QuantizedPerTokenHeadLayer) and layer.is_initialized}
        if len(batches) > 1:
            raise ValueError(f"the layers disagree on the batch size: {sorted(batches)}")


def _layer_state(layer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of any layer of the cache: transformers' `DummyLayer` holds nothing; a layer with
    convolution/recurrent states (hybrid models) refuses, as a file without them would mislead."""
    if isinstance(layer, QuantizedPerTokenHeadLayer):
        return layer.export_state()
    if isinstance(layer, DummyLayer):
        return {"type": "dummy", "sliding_window": None, "initialized": False}, {}
    if isinstance(layer, LinearAttentionCacheLayerMixin):
        raise NotImplementedError(states_not_saved(layer))
    raise TypeError(f"cannot save a cache layer of type {type(layer).__name__}")


def _check_layer_state(layer, metadata: dict, name: str) -> int:
    """`QuantizedPerTokenHeadLayer.check_state`, for any layer of the cache."""
    if isinstance(layer, QuantizedPerTokenHeadLayer):
        return layer.check_state(metadata, name)
    expected, _ = _layer_state(layer)  # a dummy layer (the others refuse)
    for key in ("type", "sliding_window"):
        if metadata.get(key) != expected[key]:
            raise ValueError(f"{name} {key} mismatch: expected {expected[key]}, found {metadata.get(key)}")
    if not isinstance(metadata.get("initialized"), bool):
        raise ValueError(f"malformed cache metadata: {name} 'initialized' is {metadata.get('initialized')!r}")
    if metadata["initialized"]:
        raise ValueError(f"{name} is a dummy layer (no KV), but the file says it holds tokens")
    return 0


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
