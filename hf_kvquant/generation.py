"""The one change hf_kvquant makes to transformers' own behaviour, and the public switch for it.

`generate` fills a cache the user passed in without comparing its size with the call's: a preallocated
`QuantizedPerTokenHeadCache` (``max_cache_len``) too small for prompt + new tokens would be found out only by the
cache's own check at the step that overflows, which on a GPU is a device-side assertion (a host check would
synchronise every step) that kills the process, under CUDA graphs too. transformers offers no public hook before the
first step, so `install_generate_length_check` wraps its private ``GenerationMixin._prepare_cache_for_generation``
(called once per `generate`, before the first step) with a call of the cache's ``check_generation_length``: a cache
too small is refused with a `ValueError` that names the ``max_cache_len`` that fits, before anything is generated or
stored. Every other cache, and calls whose arguments do not bind (a transformers that renamed them), pass through
unchanged.

Importing hf_kvquant does not install it. Building a `QuantizedPerTokenHeadCache` with ``max_cache_len`` does (the
one cache it concerns), unless `remove_generate_length_check` was called: that puts transformers' method back and keeps
it so until `install_generate_length_check` is called again.
"""

from __future__ import annotations

import functools
import inspect

from transformers.generation.utils import GenerationMixin

_METHOD = "_prepare_cache_for_generation"
_removed_by_user = False


def _checking_cache_length(prepare_cache):
    """``prepare_cache`` (transformers' ``_prepare_cache_for_generation``) that first hands a cache with
    ``check_generation_length`` (a `QuantizedPerTokenHeadCache`) the length `generate` will fill.

    `generate` calls it once, before its first step, with ``max_cache_length`` (prompt + new tokens - 1, from which it
    sizes its own `StaticCache`); for a cache passed in by the user, transformers only checks conflicting arguments
    there and never compares that length with the cache's."""
    signature = inspect.signature(prepare_cache)

    @functools.wraps(prepare_cache)
    def prepare_cache_checked(*args, **kwargs):
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            arguments = {}
        model_kwargs, length = arguments.get("model_kwargs"), arguments.get("max_cache_length")
        if isinstance(model_kwargs, dict) and isinstance(length, int):
            cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
            cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: the decoder's
            check = getattr(cache, "check_generation_length", None)
            if callable(check):
                max_new_tokens = getattr(arguments.get("generation_config"), "max_new_tokens", None)
                check(length + 1, max_new_tokens)
        return prepare_cache(*args, **kwargs)

    prepare_cache_checked.hf_kvquant_checks_cache_length = True
    return prepare_cache_checked


def generate_length_check_installed() -> bool:
    """Whether `generate` currently checks a preallocated hf_kvquant cache's size before its first step."""
    return getattr(getattr(GenerationMixin, _METHOD), "hf_kvquant_checks_cache_length", False)


def install_generate_length_check(unless_removed: bool = False) -> None:
    """Have transformers' `generate` refuse, before its first step, a preallocated `QuantizedPerTokenHeadCache` too
    small for prompt + new tokens (`QuantizedPerTokenHeadCache.check_generation_length`), instead of failing at the
    step that overflows (a device-side assertion on a GPU). Wraps ``GenerationMixin._prepare_cache_for_generation``
    (private: transformers has no public hook there) for every model; other caches pass through unchanged. Installed
    at most once. Building a cache with ``max_cache_len`` calls this with ``unless_removed=True``: a no-op after
    `remove_generate_length_check`."""
    global _removed_by_user
    if unless_removed and _removed_by_user:
        return
    _removed_by_user = False
    if not generate_length_check_installed():
        setattr(GenerationMixin, _METHOD, _checking_cache_length(getattr(GenerationMixin, _METHOD)))


def remove_generate_length_check() -> None:
    """Put transformers' own ``GenerationMixin._prepare_cache_for_generation`` back, and keep it (building a
    preallocated cache no longer installs the check) until `install_generate_length_check` is called. A too-small
    preallocated cache is then refused only by its own `update`, at the step that overflows."""
    global _removed_by_user
    _removed_by_user = True
    method = getattr(GenerationMixin, _METHOD)
    if getattr(method, "hf_kvquant_checks_cache_length", False):
        setattr(GenerationMixin, _METHOD, method.__wrapped__)
