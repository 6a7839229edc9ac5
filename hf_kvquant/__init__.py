"""hf_kvquant: INT8/FP8 per-token-head KV-cache quantization for Hugging Face transformers.

The public API is what this module exports (`__all__`); `hf_kvquant.evaluation` builds perplexity and lm-eval runs on
it. Importing the package registers hf_kvquant's attention and mask functions with transformers under
`ATTENTION_NAME` (`register`) and changes nothing else. Building a preallocated cache (``max_cache_len``) installs one
check into transformers' `generate` (`install_generate_length_check`; `remove_generate_length_check` takes it out).
Triton is needed only for the CUDA kernels, imported on first use; without it everything runs the plain-PyTorch
reference path.
"""

from .cache import (
    QuantizedPerTokenHeadCache,
    QuantizedPerTokenHeadLayer,
    QuantizedPerTokenHeadSlidingWindowLayer,
    QuantizedPerTokenHeadStaticLayer,
    QuantizedPerTokenHeadStaticSlidingWindowLayer,
    kv_cache_nbytes,
)
from .generation import install_generate_length_check, remove_generate_length_check
from .integration import hf_kvquant_attention, register
from .modes import KVQuantMode, ModeSpec
from .quantized_kv import ATTENTION_NAME, QuantizedKV
from .rotation import hadamard_matrix

register()

__all__ = [
    "ATTENTION_NAME",
    "KVQuantMode",
    "ModeSpec",
    "QuantizedKV",
    "QuantizedPerTokenHeadCache",
    "QuantizedPerTokenHeadLayer",
    "QuantizedPerTokenHeadSlidingWindowLayer",
    "QuantizedPerTokenHeadStaticLayer",
    "QuantizedPerTokenHeadStaticSlidingWindowLayer",
    "hadamard_matrix",
    "hf_kvquant_attention",
    "install_generate_length_check",
    "kv_cache_nbytes",
    "register",
    "remove_generate_length_check",
]
