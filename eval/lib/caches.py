"""The caches eval/bench_generate.py compares (and eval/soak.py, eval/bench_tensor_parallel.py reuse), each with the
attention it is meant for; how many bytes each holds; a check that hf_kvquant's attention is what attends.

- ``dynamic``: transformers' `DynamicCache` + ``sdpa`` (the default);
- ``dynamic_no_cudnn``: the same with PyTorch's cuDNN SDPA backend switched off (on torch 2.11 + H100 the
  default picks cuDNN, whose host time per call dominates small decode steps; the targets compare with ``dynamic``);
- ``hf_fp8``: transformers' `QuantizedCache(backend="fp8")` + ``sdpa`` (one frozen per-tensor scale);
- ``hf_quanto_int4``: `QuantizedCache(backend="quanto", nbits=4)` + ``sdpa`` (needs optimum-quanto; see `lib.quanto`);
- ``int8`` / ``fp8``: `QuantizedPerTokenHeadCache` + hf_kvquant's attention (`hf_kvquant.ATTENTION_NAME`), built by
  `hf_kvquant.evaluation.make_cache`; on the command line any name of the mode vocabulary selects them
  (``int8_per_token_head``, ...; ``unquantized`` is ``dynamic``);
- compiled decoding over a preallocated (compileable) cache: ``static_compiled`` (transformers' bf16 `StaticCache` +
  ``sdpa``, the anchor), ``static_compiled_no_cudnn`` (the same with cuDNN SDPA off, opt-in: on an H200 with torch
  2.11 it was slower than cuDNN; the compiled targets use the faster of the two where both ran), ``int8_compiled`` /
  ``fp8_compiled`` (`QuantizedPerTokenHeadCache` with ``max_cache_len`` + hf_kvquant's attention). How they are
  compiled and timed: `lib.generate_row`.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, QuantizedCache, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedKV, kv_cache_nbytes
from hf_kvquant.evaluation import ACCEPTED_MODES, UNQUANTIZED, make_cache, parse_mode

# key: (label, attention implementation). Transformers' caches, the baselines:
BASELINES = {
    "dynamic": ("DynamicCache", "sdpa"),
    # The same with PyTorch's cuDNN SDPA backend off (flash / memory-efficient kernels): on torch 2.11 + H100 the
    # default picks cuDNN, whose host time per call grows with every new key length; this shows it without that cost.
    "dynamic_no_cudnn": ("DynamicCache (no cuDNN SDPA)", "sdpa"),
    "hf_fp8": ("QuantizedCache fp8", "sdpa"),
    "hf_quanto_int4": ("QuantizedCache quanto int4", "sdpa"),
}
# ... and ours, one per quantization mode, keyed by the mode's short name.
EAGER_CACHES = {**BASELINES, **{m.short_name: (f"hf_kvquant {m.short_name.upper()}", ATTENTION_NAME)
                                for m in KVQuantMode}}
# Compiled decoding over preallocated caches (opt-in: --caches or --compiled): StaticCache, the anchor, then ours.
# StaticCache under compile also without cuDNN SDPA (opt-in; measured slower on an H200 with torch 2.11: efficient
# attention over the masked capacity); the compiled targets take the faster StaticCache of a row.
COMPILED = {"static_compiled": ("StaticCache + compile", "sdpa"),
            "static_compiled_no_cudnn": ("StaticCache + compile (no cuDNN SDPA)", "sdpa"),
            **{f"{m.short_name}_compiled": (f"hf_kvquant {m.short_name.upper()} + compile", ATTENTION_NAME)
               for m in KVQuantMode}}
CACHES = {**EAGER_CACHES, **COMPILED}


def _cache_key(name: str) -> str | None:
    if name in BASELINES or name in COMPILED:
        return name
    try:
        mode = parse_mode(name)
    except ValueError:
        return None
    return "dynamic" if mode.quantization is None else mode.quantization.short_name


def cache_keys(text: str, offered: dict = CACHES) -> list[str]:
    """Comma-separated cache names ('none': no cache) -> keys of ``offered``, each once, in the order given. A name
    is a baseline's key or any name of the mode vocabulary (`ACCEPTED_MODES`: ``"unquantized"`` is ``dynamic``,
    ``"int8_per_token_head"`` and ``"int8"`` are ``int8``, ...); any other raises a `ValueError` saying what is."""
    names = [name.strip() for name in text.split(",") if name.strip() not in ("", "none")]
    keys = [_cache_key(name) for name in names]
    for name, key in zip(names, keys):
        if key not in offered:
            raise ValueError(f"unknown cache {name!r}; accepted: {', '.join(offered)}, or by mode name: "
                             f"{', '.join(ACCEPTED_MODES)}")
    return list(dict.fromkeys(keys))


def build_cache(key: str, model, max_cache_len: int | None = None):
    """A fresh cache of kind ``key``, the model switched to the attention it goes with first: hf_kvquant's cache reads
    ``config._attn_implementation`` when built to decide whether it hands attention its quantized buffers. The
    compiled kinds are preallocated for ``max_cache_len`` tokens."""
    attention = CACHES[key][1]
    model.set_attn_implementation(attention)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"could not switch the model to {attention!r} attention")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(not key.endswith("_no_cudnn"))
    if key == "hf_fp8":
        return QuantizedCache(backend="fp8", config=model.config)
    if key == "hf_quanto_int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    if key in BASELINES:  # the two DynamicCache rows
        return make_cache(model, UNQUANTIZED)
    if key in COMPILED and max_cache_len is None:
        raise ValueError(f"{key} is preallocated: give max_cache_len")
    if key.startswith("static_compiled"):
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache = make_cache(model, key.removesuffix("_compiled"), max_cache_len=max_cache_len if key in COMPILED else None)
    if not cache.hands_over_quantized:
        raise RuntimeError("QuantizedPerTokenHeadCache would hand dequantized tensors to attention")
    return cache


@contextlib.contextmanager
def count_hf_kvquant_calls():
    """Count calls of hf_kvquant's attention, and how many received `QuantizedKV` keys and values: a silent fallback
    (dequantized tensors, another attention) must not pass as a measurement of the kernel."""
    counts = {"calls": 0, "quantized": 0}
    original = ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]

    def counting(module, query, key, value, *args, **kwargs):
        counts["calls"] += 1
        counts["quantized"] += isinstance(key, QuantizedKV) and isinstance(value, QuantizedKV)
        return original(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, counting)
    try:
        yield counts
    finally:
        AttentionInterface.register(ATTENTION_NAME, original)


def _tensor_bytes(obj) -> int:
    """Bytes of a tensor, of the inner tensors of a tensor subclass (quanto's packed INT4 + scale + shift), or of a
    tuple of them (the fp8 backend's (data, scale))."""
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(t) for t in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(obj, name)) for name in names)
    return obj.nbytes


def kv_bytes(cache) -> int:
    """Bytes the cache holds. `hf_kvquant.kv_cache_nbytes` covers `DynamicCache` and ours; for `QuantizedCache` it
    would only see the full-precision residual, so the quantized storage is counted here as well."""
    if not isinstance(cache, QuantizedCache):
        return kv_cache_nbytes(cache)
    fields = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_tensor_bytes(getattr(layer, name, None)) for layer in cache.layers for name in fields)
