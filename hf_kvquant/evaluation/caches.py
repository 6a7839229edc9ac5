"""The caches an evaluation compares, named in the one vocabulary every entry point accepts (API, CLIs, lm-eval):
``"unquantized"`` (transformers' `DynamicCache`, the reference) and the names of `KVQuantMode`, canonical or short
(``"int8_per_token_head"`` / ``"int8"``, ``"fp8_per_token_head"`` / ``"fp8"``). The Hadamard rotation is turned on one
way, everywhere: a separate ``hadamard`` switch."""

from __future__ import annotations

from typing import NamedTuple

from transformers import DynamicCache

from ..cache import QuantizedPerTokenHeadCache
from ..modes import KVQuantMode, mode_names

UNQUANTIZED = "unquantized"
# The caches compared by default: the unquantized reference, then each quantization mode.
ALL_MODES = (UNQUANTIZED, *(m.value for m in KVQuantMode))
# Every name accepted.
ACCEPTED_MODES = (UNQUANTIZED, *mode_names())


class CacheMode(NamedTuple):
    """A cache to evaluate: ``quantization`` None is transformers' unquantized `DynamicCache`."""

    quantization: KVQuantMode | None
    hadamard: bool = False

    @property
    def name(self) -> str:
        """A label for tables: ``"unquantized"``, ``"int8_per_token_head"``, ``"int8_per_token_head+hadamard"``."""
        base = UNQUANTIZED if self.quantization is None else self.quantization.value
        return base + "+hadamard" if self.hadamard else base


def parse_mode(mode: CacheMode | KVQuantMode | str | None, hadamard: bool = False) -> CacheMode:
    """A name from `ACCEPTED_MODES`, a `KVQuantMode`, a `CacheMode` or None (unquantized), with the rotation switched
    on by ``hadamard=True``. Anything else raises a `ValueError` naming the bad value and the accepted ones."""
    if not isinstance(hadamard, bool):
        raise ValueError(f"hadamard must be True or False; got {hadamard!r}")
    if isinstance(mode, CacheMode):
        parsed = mode
    elif mode is None or mode == UNQUANTIZED:
        parsed = CacheMode(None)
    else:
        try:
            parsed = CacheMode(KVQuantMode.parse(mode))
        except ValueError:
            raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(map(repr, ACCEPTED_MODES))}") from None
    if hadamard and parsed.quantization is None:
        raise ValueError("hadamard=True needs a quantized mode; the unquantized cache has nothing to rotate")
    return parsed._replace(hadamard=parsed.hadamard or hadamard)


def make_cache(model, mode: CacheMode | KVQuantMode | str | None, hadamard: bool = False,
               max_cache_len: int | None = None):
    """A fresh cache for ``model``: `DynamicCache` when unquantized, else `QuantizedPerTokenHeadCache`."""
    mode = parse_mode(mode, hadamard)
    if mode.quantization is None:
        return DynamicCache(config=model.config)
    return QuantizedPerTokenHeadCache(config=model.config, mode=mode.quantization, hadamard=mode.hadamard,
                                      max_cache_len=max_cache_len)
