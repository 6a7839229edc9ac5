"""The cache layer for each layer type of a model's config, picked from tables as transformers'
`DYNAMIC_LAYER_TYPE_MAPPING` / `STATIC_LAYER_TYPE_MAPPING` pick theirs."""

from __future__ import annotations

from transformers.cache_utils import DummyLayer, LinearAttentionLayer

from ..modes import KVQuantMode
from .hybrid import (
    QuantizedHybridLayer,
    QuantizedSlidingWindowHybridLayer,
    QuantizedStaticHybridLayer,
)
from .layer import QuantizedPerTokenHeadLayer
from .ring import QuantizedPerTokenHeadStaticSlidingWindowLayer
from .sliding import QuantizedPerTokenHeadSlidingWindowLayer
from .static import QuantizedPerTokenHeadStaticLayer

# (layer type, preallocated) -> the quantized layer class. Chunked attention (Llama 4) is cached as a sliding window of
# the chunk size, as transformers does: a token sees at most the ``chunk - 1`` tokens before it, and the mask
# (hf_kvquant's mask function gives the chunked one) hides those of earlier chunks. "hybrid" layers keep a
# linear-attention state and attention in one layer.
QUANTIZED_LAYER_TYPE_MAPPING = {
    ("full_attention", False): QuantizedPerTokenHeadLayer,
    ("sliding_attention", False): QuantizedPerTokenHeadSlidingWindowLayer,
    ("chunked_attention", False): QuantizedPerTokenHeadSlidingWindowLayer,
    ("full_attention", True): QuantizedPerTokenHeadStaticLayer,
    ("sliding_attention", True): QuantizedPerTokenHeadStaticSlidingWindowLayer,
    ("chunked_attention", True): QuantizedPerTokenHeadStaticSlidingWindowLayer,
    ("hybrid", False): QuantizedHybridLayer,
    ("hybrid_sliding", False): QuantizedSlidingWindowHybridLayer,
    ("hybrid", True): QuantizedStaticHybridLayer,
    # a hybrid layer's sliding attention keeps every slot: its ring (one window) broke Inkling 2 on transformers 5.24
    ("hybrid_sliding", True): QuantizedStaticHybridLayer,
}
# Layer types whose attention has no sliding window (the config's ``sliding_window`` is for other layers).
_FULL_ATTENTION_TYPES = ("full_attention", "hybrid")
_HYBRID_TYPES = ("hybrid", "hybrid_sliding")
# A windowed layer type without a window is cached as its full-attention counterpart.
_WITHOUT_WINDOW = {"sliding_attention": "full_attention", "chunked_attention": "full_attention",
                   "hybrid_sliding": "hybrid"}

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


def cache_layer(layer_type: str, kwargs: dict, mode: KVQuantMode, hadamard: bool, max_cache_len: int | None):
    """The cache layer for one entry of `transformers.cache_utils.get_layer_types_and_kwargs`: quantized where the
    layer attends, transformers' own `LinearAttentionLayer` / `DummyLayer` where it keeps states or no KV."""
    window = None if layer_type in _FULL_ATTENTION_TYPES else kwargs.get("sliding_window")
    if window is None:
        layer_type = _WITHOUT_WINDOW.get(layer_type, layer_type)
    layer_class = QUANTIZED_LAYER_TYPE_MAPPING.get((layer_type, max_cache_len is not None))
    if layer_class is not None:
        options = {"hadamard": hadamard}
        if max_cache_len is not None:
            options["max_cache_len"] = max_cache_len
        if window is not None:
            options["sliding_window"] = window
        if layer_type in _HYBRID_TYPES:
            options["number_of_states"] = kwargs.get("number_of_states", 1)
        return layer_class(mode, **options)
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
