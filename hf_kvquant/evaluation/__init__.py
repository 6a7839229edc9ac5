"""Evaluation with the quantized cache in the loop, built on the public API only: the caches compared and their names
(`caches`), perplexity over sliding windows (`perplexity`), evaluation text (`data`), the packaged real models
(`models`), and lm-evaluation-harness's model type ``hf_kvquant`` (`lm_eval_model`, imported only by its users: it
needs lm-eval)."""

from .caches import ACCEPTED_MODES, ALL_MODES, UNQUANTIZED, CacheMode, make_cache, parse_mode
from .data import WIKITEXT, load_text, wikitext_documents
from .models import DEFAULT_MODEL, PACKAGED_MODELS, load_model, resolve_model
from .perplexity import PerplexityResult, encode_text, perplexity, prefix_token_id

__all__ = [
    "ACCEPTED_MODES",
    "ALL_MODES",
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "UNQUANTIZED",
    "WIKITEXT",
    "CacheMode",
    "PerplexityResult",
    "encode_text",
    "load_model",
    "load_text",
    "make_cache",
    "parse_mode",
    "perplexity",
    "prefix_token_id",
    "resolve_model",
    "wikitext_documents",
]
