"""hf_kvquant's attention, registered with transformers under `ATTENTION_NAME` (`register`): the one place that talks
to its registries. (The one change to transformers' own behaviour, a check in `generate`, is `hf_kvquant.generation`.)

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
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops
from .ops.reference import attention_reference
from .quantized_kv import ATTENTION_NAME, QuantizedKV
from .rotation import rotate, unrotate

_warned: set[str] = set()
# Model types whose KV-shared layers slice the mask of a prefill as 4D
# (`Gemma4TextModel._maybe_slice_kv_shared_inputs`).
GEMMA4_KV_SHARING_MODELS = ("gemma4_text", "gemma4", "gemma4_unified_text", "gemma4_unified")
# Arguments through which models change attention in ways hf_kvquant's attention does not compute; a call that passes
# one (not None) is refused rather than answered without it.
UNSUPPORTED_ARGUMENTS = {
    "position_bias": "an additive position bias on the attention scores (relative positions, e.g. Inkling)",
    "block_indices": "block-sparse attention (the blocks each query reads, e.g. MiniMax-M3)",
}
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


# The parts of transformers' mask functions that hf_kvquant's attention computes itself: causality (in-kernel), a
# sliding window (from the layer's ``sliding_window`` argument) and padding (the 2D mask it is given).
_KERNEL_MASK_PARTS = ("causal_mask_function", "sliding_window_overlay.<locals>.inner_mask",
                      "padding_mask_function.<locals>.inner_mask")


def _computed_in_kernel(mask_function) -> bool:
    """Whether ``mask_function`` (a `transformers.masking_utils` mask function) is an intersection of the parts the
    kernel computes. Anything else (chunks, bidirectional blocks, packed sequences, a model's own overlay) is not."""
    if getattr(mask_function, "__module__", None) != "transformers.masking_utils":
        return False
    name = mask_function.__qualname__
    if name == "and_masks.<locals>.and_mask":
        cells = dict(zip(mask_function.__code__.co_freevars, mask_function.__closure__ or ()))
        return all(_computed_in_kernel(part) for part in cells["mask_functions"].cell_contents)
    return name in _KERNEL_MASK_PARTS


def _traced_pattern_in_kernel(config, mask_kwargs: dict) -> bool:
    """`_computed_in_kernel` for a compiled step (dynamo cannot read a closure): from the signs transformers' mask
    builders leave in the call, a chunk (``local_size`` is the config's chunk), bidirectional attention, or a model's
    own overlay (``use_vmap``)."""
    chunk = getattr(config, "attention_chunk_size", None)
    return not (mask_kwargs.get("use_vmap") or "allow_is_bidirectional_skip" in mask_kwargs
                or (chunk is not None and mask_kwargs.get("local_size") == chunk))


def _four_d_mask_reason(q_length: int, mask_kwargs: dict) -> str | None:
    """Why this mask must be transformers' 4D one (``[batch, 1, q_len, kv_len]``, or None where SDPA would skip it)
    rather than the 2D padding mask, or None. hf_kvquant's attention then honours it exactly, through SDPA over
    dequantized keys and values."""
    config, mask_function = mask_kwargs.get("config"), mask_kwargs.get("mask_function")
    if torch.compiler.is_compiling():
        in_kernel = _traced_pattern_in_kernel(config, mask_kwargs)
    else:
        in_kernel = mask_function is None or _computed_in_kernel(mask_function)
    if not in_kernel:
        return ("a mask pattern the kernel does not compute (chunked attention: a token sees the earlier tokens of its "
                "own chunk only; bidirectional or blockwise parts)")
    model_type = getattr(config, "model_type", None)
    if model_type == "doge":
        return "Doge builds its dynamic mask from the 4D mask"
    # Gemma 4's KV-shared layers keep the mask rows of the last tokens of a prefill (mask[:, :, -n:, :]).
    if model_type in GEMMA4_KV_SHARING_MODELS and getattr(config, "num_kv_shared_layers", 0) and q_length > 1:
        return "Gemma 4's KV-shared layers slice the 4D mask of a prefill"
    return None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask hf_kvquant's attention gets: the 2D padding mask over the ``kv_length`` visible tokens, or None.

    The visible tokens are the last ``kv_length`` of the sequence (a sliding-window layer sees a suffix), so the
    slice is taken from the right, as for flash attention. A preallocated layer shows its whole capacity: the mask is
    padded on the right to it (slots not yet written, which causality hides anyway), so its shape never changes.

    Where the 2D mask cannot say it (a pattern other than causal, sliding window and padding: chunked attention as in
    Llama 4, bidirectional or blockwise parts), or the model reads the mask as 4D (Doge, Gemma 4's KV-shared layers),
    it is transformers' SDPA mask instead, and the attention takes its 4D-mask path."""
    reason = _four_d_mask_reason(q_length, kwargs)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _warn_once(f"{reason}: transformers' 4D mask, attention through SDPA over dequantized keys and values")
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                         **kwargs)
    if attention_mask is None:
        if isinstance(q_offset, torch.Tensor):
            # A preallocated layer (whose token count lives on the device) shows slots not written yet: mark the
            # written ones, without reading the count on the host.
            slots = torch.arange(kv_offset, kv_offset + kv_length, device=q_offset.device)
            return (slots < q_offset + q_length)[None].expand(batch_size, -1)
        return None
    if attention_mask.dim() != 2:
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
    out = ops.attention(query, key.data, key.scale, value.data, value.scale, padding_mask, start=key.start,
                        end=key.end, length=key.length, ring=key.ring, mask_offset=key.mask_offset, **options)
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
    for name, what in UNSUPPORTED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"hf_kvquant attention does not compute {what}: the model passed {name!r}. Load it with "
                "attn_implementation='eager' or 'sdpa': the quantized cache works with those"
            )
    sinks = _per_head_sinks(query, kwargs)
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if not is_causal and attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, None, None, :]  # bidirectional: the padding mask is every query's row
    if not is_causal or (attention_mask is not None and attention_mask.dim() == 4):
        # A ready-made 4D mask (chunked attention, custom masks), or bidirectional attention (the kernel is causal):
        # honour it exactly, through SDPA over dequantized tensors.
        _warn_once("a 4D attention mask, or bidirectional attention: using SDPA over dequantized keys and values")
        for feature, given in (("attention sinks", sinks is not None), ("soft-capping", softcap is not None)):
            if given:
                raise NotImplementedError(f"hf_kvquant attention: {feature} with a 4D mask or bidirectional attention "
                                          "are not supported; load the model with attn_implementation='eager'")
        key, value = (t.dequantize() if isinstance(t, QuantizedKV) else t for t in (key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal,
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
    if attention_mask is not None and attention_mask.dim() == 2:
        key, value, attention_mask = _written_slots_last(key, value, attention_mask)
    return attention_reference(query, key, value, attention_mask, **options), None


def _written_slots_last(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor):
    """A preallocated cache that is not ours (transformers' `StaticCache`) hands over every slot, the unwritten ones
    masked (`padding_mask`); the reference places the queries at the last keys. The written slots (up to the last
    column any row sees) are kept, in order, so causality and sliding windows hold; a cache without unwritten slots is
    unchanged. ``key``/``value`` ``[batch, kv_heads, slots, head_dim]``, ``mask`` ``[batch, slots]``.

    Eagerly they are sliced, as `ops.attention` slices a preallocated `QuantizedKV` to its live slots: the same sums
    over the same numbers, so the two paths agree to the bit. Compiled, a host read would break the graph: the slots
    are rotated on the device instead, the last written one last (the unwritten ones, masked, first)."""
    slots = key.shape[2]
    ramp = torch.arange(slots, device=mask.device)
    written = torch.where(mask.bool().any(0), ramp + 1, 0).max()
    if not torch.compiler.is_compiling():
        live = int(written)  # one host read per layer, on this fallback path only
        return key[:, :, :live], value[:, :, :live], mask[:, :live]
    index = (ramp + written) % slots
    return key.index_select(2, index), value.index_select(2, index), mask.index_select(1, index)


def register() -> None:
    """Register the attention function and its mask function under `ATTENTION_NAME` with transformers'
    `AttentionInterface` and `AttentionMaskInterface`, so that ``attn_implementation=ATTENTION_NAME`` picks them.
    Importing hf_kvquant does this; calling it again re-registers the same functions."""
    AttentionInterface.register(ATTENTION_NAME, hf_kvquant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
