"""hf_kvquant: INT8/FP8 per-token-head KV-cache quantization for Hugging Face transformers."""

from .attention import hf_kvquant_attention, register
from .cache import QuantizedPerTokenHeadCache, QuantizedPerTokenHeadLayer, kv_cache_nbytes
from .modes import KVQuantMode
from .quantized_kv import ATTENTION_NAME, QuantizedKV

register()

__all__ = [
    "ATTENTION_NAME",
    "KVQuantMode",
    "QuantizedKV",
    "QuantizedPerTokenHeadCache",
    "QuantizedPerTokenHeadLayer",
    "hf_kvquant_attention",
    "kv_cache_nbytes",
]
