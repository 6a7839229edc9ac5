"""hf_kvquant's attention, registered with transformers under `ATTENTION_NAME`: the one place that talks to its
registries.

    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=hf_kvquant.ATTENTION_NAME)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head")

With the cache built from the model's config, `update` hands this function the quantized buffers
(`QuantizedKV`) and the Triton kernel reads them directly. The mask function registered under the
same name gives it the 2D padding mask of the visible tokens (``[batch, kv_len]``, or None): causality
and sliding windows are computed inside the kernel, so no ``q_len x kv_len`` mask is ever built.

Where the kernel cannot run, a correct plain-PyTorch path takes over, with one warning naming why:
no CUDA or no Triton (dequantize, then the reference attention), or keys and values that are not
`QuantizedKV` (a cache that is not ours, a cache built without ``config``, or no cache at all).

A cache built with ``hadamard=True`` hands over buffers of rotated keys and values (``QuantizedKV.rotation`` is
``R``): the kernel then attends with the rotated query ``q @ R`` and its output is un-rotated (``@ R.T``), which is
exact since ``R`` is orthogonal (`hf_kvquant.rotation`). The plain-PyTorch paths dequantize, which un-rotates.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from . import ops
from .ops.reference import attention_reference
from .quantized_kv import ATTENTION_NAME, QuantizedKV
from .rotation import rotate, unrotate

_warned: set[str] = set()
# The names under which transformers' models pass attention-sink logits to an attention function.
_SINK_ARGUMENTS = ("s_aux", "sinks")


def _per_head_sinks(query: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The attention-sink logits of the call, one per query head (gpt-oss's ``s_aux``), or None. Sinks of any other
    shape (per token, as some models compute them) are refused: dropping them would give silently wrong outputs."""
    given = [(name, kwargs[name]) for name in _SINK_ARGUMENTS if kwargs.get(name) is not None]
    if not given:
        return None
    (name, sinks), heads = given[0], query.shape[1]
    if len(given) > 1 or not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.numel() != heads:
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise NotImplementedError(
            f"hf_kvquant attention supports one attention-sink logit per query head ({heads}); the model passed "
            f"{name!r} of shape {shape}. Load it with attn_implementation='eager' or 'sdpa': the quantized cache "
            "works with those"
        )
    return sinks.reshape(heads)


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hf_kvquant attention: {reason}", stacklevel=3)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask hf_kvquant's attention gets: the 2D padding mask over the ``kv_length`` visible tokens, or None.

    The visible tokens are the last ``kv_length`` of the sequence (a sliding-window layer sees a suffix), so the
    slice is taken from the right, as for flash attention. A preallocated layer shows its whole capacity: the mask is
    padded on the right to it (slots not yet written, which causality hides anyway), so its shape never changes."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    if attention_mask.shape[-1] < kv_length:
        return torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
    return attention_mask[:, -kv_length:]


def attend_quantized(
    query: torch.Tensor,
    key: QuantizedKV,
    value: QuantizedKV,
    padding_mask: torch.Tensor | None,
    **options,
) -> torch.Tensor:
    """Attention over the cache buffers (`hf_kvquant.ops.attention`), ``[batch, q_len, heads, head_dim]`` in the
    query's dtype.

    With a rotated cache the query is rotated by the keys' rotation and the output un-rotated by the values', both
    in float32 and rounded once to the query's dtype (the kernel computes in the query's dtype).
    """
    if key.rotation is not None:
        query = rotate(query, key.rotation).to(query.dtype)
    out = ops.attention(query, key, value, padding_mask, **options)
    return out if value.rotation is None else unrotate(out, value.rotation).to(out.dtype)


def hf_kvquant_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: QuantizedKV | torch.Tensor,
    value: QuantizedKV | torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query [batch, heads, q_len, head_dim]`` in, ``([batch, q_len,
    heads, head_dim], None)`` out. ``key``/``value`` are `QuantizedKV` from `QuantizedPerTokenHeadCache`."""
    if dropout > 0.0:
        raise NotImplementedError(f"hf_kvquant attention is for inference: dropout={dropout} is not supported")
    sinks = _per_head_sinks(query, kwargs)
    if attention_mask is not None and attention_mask.dim() == 4:
        # A ready-made 4D mask (custom masks): honour it exactly, through SDPA over dequantized tensors.
        _warn_once("a 4D attention mask was given; using SDPA over dequantized keys and values")
        key, value = (t.dequantize() if isinstance(t, QuantizedKV) else t for t in (key, value))
        if sinks is not None:
            raise NotImplementedError("hf_kvquant attention: attention sinks with a ready-made 4D mask are not "
                                      "supported; load the model with attn_implementation='eager'")
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                                      sliding_window=sliding_window, **kwargs)
    options = dict(scaling=scaling, sliding_window=sliding_window, softcap=softcap, sinks=sinks)
    if isinstance(key, QuantizedKV) and isinstance(value, QuantizedKV):
        if not torch.compiler.is_compiling() and (not query.is_cuda or ops.cuda_kernels() is None):
            _warn_once("no CUDA device or no Triton: attending to dequantized keys and values in plain PyTorch (slow, "
                       "same results)")
        return attend_quantized(query, key, value, attention_mask, **options), None
    _warn_once(
        "keys and values are not QuantizedKV (the cache is not a QuantizedPerTokenHeadCache built with "
        "config=model.config, or there is no cache): using plain-PyTorch attention"
    )
    return attention_reference(query, key, value, attention_mask, **options), None


def register() -> None:
    """Register the attention function and its mask function under `ATTENTION_NAME` (done on import)."""
    AttentionInterface.register(ATTENTION_NAME, hf_kvquant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
