"""The quantized KV cache, one module per concern:

* ``storage`` — how the buffers sit in memory: value-code layouts (`token_minor_zeros`, `token_minor`), the growth
  policy, the slot ramps;
* ``inputs`` / ``state`` — what a layer accepts from the model, and the checks of a state read back from a file;
* ``layer`` — `QuantizedPerTokenHeadLayer`, growable full attention and the `update` skeleton all layers share;
  ``sliding`` — `QuantizedPerTokenHeadSlidingWindowLayer`; ``static`` — `QuantizedPerTokenHeadStaticLayer`
  (preallocated); ``ring`` — `QuantizedPerTokenHeadStaticSlidingWindowLayer` (preallocated, one window); ``hybrid`` —
  the same beside the convolution/recurrent states of hybrid models;
* ``factory`` — the layer class of each layer type, from a table;
* ``quantized_cache`` — `QuantizedPerTokenHeadCache` and `kv_cache_nbytes`.
"""

from .factory import QUANTIZED_LAYER_TYPE_MAPPING, STATE_LAYER_TYPES, UNSUPPORTED_LAYER_TYPES, cache_layer
from .hybrid import (
    QuantizedHybridLayer,
    QuantizedSlidingWindowHybridLayer,
    QuantizedStaticHybridLayer,
)
from .inputs import SUPPORTED_DTYPES
from .layer import QuantizedPerTokenHeadLayer
from .quantized_cache import QuantizedPerTokenHeadCache, kv_cache_nbytes
from .ring import QuantizedPerTokenHeadStaticSlidingWindowLayer
from .sliding import QuantizedPerTokenHeadSlidingWindowLayer
from .static import QuantizedPerTokenHeadStaticLayer
from .storage import token_minor, token_minor_zeros

__all__ = [
    "QUANTIZED_LAYER_TYPE_MAPPING",
    "STATE_LAYER_TYPES",
    "SUPPORTED_DTYPES",
    "UNSUPPORTED_LAYER_TYPES",
    "QuantizedHybridLayer",
    "QuantizedPerTokenHeadCache",
    "QuantizedPerTokenHeadLayer",
    "QuantizedPerTokenHeadSlidingWindowLayer",
    "QuantizedPerTokenHeadStaticLayer",
    "QuantizedPerTokenHeadStaticSlidingWindowLayer",
    "QuantizedSlidingWindowHybridLayer",
    "QuantizedStaticHybridLayer",
    "cache_layer",
    "kv_cache_nbytes",
    "token_minor",
    "token_minor_zeros",
]
