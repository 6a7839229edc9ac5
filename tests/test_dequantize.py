"""The dequantize kernel against its reference, and the long-prefill route through SDPA over the dequantized window
(`hf_kvquant.ops.attention_through_sdpa`) against the reference attention.

On CPU the kernel runs under TRITON_INTERPRET=1 (float32 and float16 outputs: the interpreter rounds bf16 by
truncation); on a GPU bf16 is added, and the dispatch of `hf_kvquant.ops.attention` is checked."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

from hf_kvquant import KVQuantMode, QuantizedKV, ops
from hf_kvquant.cache import token_minor as token_minor_codes
from hf_kvquant.ops.reference import attention_reference, dequantize, quantize_reference

pytest.importorskip("triton", reason="the dequantize kernel's tests need Triton")
from hf_kvquant.ops.dequantize_kernel import dequantize_window  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]


def _quantized(batch, heads, tokens, head_dim, mode, start, spare=3, seed=0, outlier=True, token_minor=False):
    """Random values quantized by the reference into buffers with ``start`` used slots before them and ``spare`` after
    (garbage bytes there), handed over as the window ``[start, start + tokens)``; with ``token_minor``, stored as the
    cache stores values."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, start + tokens + spare, head_dim, generator=generator) * 3
    if outlier:
        x[..., 1] *= 20  # an outlier channel, as in real keys
    data, scale = quantize_reference(x, mode)
    if token_minor:
        data = token_minor_codes(data)
    kv = QuantizedKV(data.to(DEVICE), scale.to(DEVICE), start, start + tokens, mode, torch.float32)
    return kv, data[:, :, start : start + tokens], scale[:, :, start : start + tokens]


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.short_name)
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "heads", "tokens", "head_dim", "start"),
                         [(1, 1, 1, 64, 0), (2, 3, 37, 80, 5), (1, 2, 300, 128, 17), (2, 1, 9, 256, 2)])
@pytest.mark.parametrize("token_minor", [False, True], ids=["head_dim-minor", "token-minor"])
def test_dequantize_window_equals_reference(mode, dtype, batch, heads, tokens, head_dim, start, token_minor):
    kv, data, scale = _quantized(batch, heads, tokens, head_dim, mode, start, token_minor=token_minor)
    out = dequantize_window(kv.data, kv.scale, dtype, kv.start, kv.end)
    expected = dequantize(data, scale, dtype)
    assert out.shape == (batch, heads, tokens, head_dim) and out.dtype == dtype and out.is_contiguous()
    # One float32 product rounded once to ``dtype`` on both sides: the same bits.
    assert torch.equal(out.cpu(), expected)


def test_dequantize_window_of_nothing():
    kv, _, _ = _quantized(1, 2, 0, 64, KVQuantMode.INT8_PER_TOKEN_HEAD, start=4)
    assert dequantize_window(kv.data, kv.scale, torch.float32, kv.start, kv.end).shape == (1, 2, 0, 64)


def _through_sdpa(query, key: QuantizedKV, value: QuantizedKV) -> torch.Tensor:
    return ops.attention_through_sdpa(query, key.data, key.scale, value.data, value.scale, start=key.start,
                                      end=key.end)


def _attention(query, key: QuantizedKV, value: QuantizedKV) -> torch.Tensor:
    return ops.attention(query, key.data, key.scale, value.data, value.scale, start=key.start, end=key.end,
                         length=key.length)


# Against the reference over the keys and values dequantized in the query's dtype (what the route attends to): the
# fused kernels differ by summation order (float32) and by the rounding of probabilities and output (bf16/fp16),
# relative to the largest output value.
SDPA_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.short_name)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"),
                         [(1, 4, 2, 40, 40, 64), (2, 8, 2, 24, 70, 64), (1, 2, 2, 33, 33, 128)])
def test_attention_through_sdpa_equals_reference(mode, batch, heads, kv_heads, q_len, kv_len, head_dim):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    key, _, _ = _quantized(batch, kv_heads, kv_len, head_dim, mode, start=3, seed=1)
    value, _, _ = _quantized(batch, kv_heads, kv_len, head_dim, mode, start=3, seed=2, token_minor=True)
    query = torch.randn(batch, heads, q_len, head_dim, generator=torch.Generator().manual_seed(3))
    query = query.to(DEVICE, dtype)
    out = _through_sdpa(query, key, value)
    k, v = (dequantize(kv.data[:, :, kv.start : kv.end], kv.scale[:, :, kv.start : kv.end], dtype).float()
            for kv in (key, value))
    expected = attention_reference(query.float(), k, v, None)  # causal, the new tokens last
    assert out.shape == (batch, q_len, heads, head_dim) and out.dtype == dtype
    error = (out.float() - expected).abs().max().item()
    assert error <= SDPA_TOLERANCE[dtype] * expected.abs().max().item()


def _prefill(q_len, past, dtype=torch.bfloat16):
    """Without an outlier channel: scores of a few units, whose bf16 rounding of the keys (the route's, not the
    kernel's) moves them by about 2**-9 of that."""
    key, _, _ = _quantized(1, 2, past + q_len, 64, KVQuantMode.INT8_PER_TOKEN_HEAD, start=0, seed=4, outlier=False)
    value, _, _ = _quantized(1, 2, past + q_len, 64, KVQuantMode.INT8_PER_TOKEN_HEAD, start=0, seed=5, outlier=False,
                              token_minor=True)
    query = torch.randn(1, 4, q_len, 64, device=DEVICE, dtype=dtype)
    return query, key, value


def test_which_calls_take_the_sdpa_route():
    """Long half-precision prefills without padding, window, soft-cap or sinks, over a window the host knows; nothing
    else."""
    long, short = ops.SDPA_PREFILL_MIN_QUERIES, ops.SDPA_PREFILL_MIN_QUERIES - 1
    query, key, value = _prefill(long, 0)
    plain = dict(length=None, padding_mask=None, sliding_window=None, softcap=None, sinks=None)

    def route(query, **options):
        return ops._prefills_through_sdpa(query, key.data, value.data, **{**plain, **options})

    assert route(query)
    assert not route(query[:, :, :short])
    assert not route(query.float())
    assert not route(query, sliding_window=16)
    assert not route(query, softcap=30.0)
    assert not route(query, sinks=torch.zeros(4, device=DEVICE))
    assert not route(query, padding_mask=torch.ones(1, key.end - key.start, dtype=torch.bool, device=DEVICE))
    assert not route(query, length=torch.tensor(key.end, device=DEVICE))  # the live length is not on the host


def test_attention_through_sdpa_refuses_a_window_it_cannot_place():
    query, key, value = _prefill(8, 0)
    with pytest.raises(ValueError, match="holding the 9 queries"):
        _through_sdpa(torch.cat([query, query[:, :, :1]], dim=2), key, value)


@requires_cuda
@pytest.mark.parametrize(("q_len", "past"), [(ops.SDPA_PREFILL_MIN_QUERIES, 0), (512, 1000)])
def test_attention_dispatch_of_a_long_prefill(q_len, past):
    """`ops.attention` of a long prefill is the SDPA route's result, and close to the kernel's: the two differ by the
    route's bf16 rounding of each key (relative 2**-9 per element; with these magnitudes, head_dim 64 and scaling 1/8,
    a score moves by about 0.01 in the root mean square) on top of both sides' bf16 rounding of probabilities and
    output, which `SDPA_TOLERANCE` already allows for. (With scores in the
    hundreds, as the outlier channel of the other tests gives, the route's bf16 keys move them by whole units: there
    each is held to the reference over the keys it attends to, in `test_attention_through_sdpa_equals_reference` and
    tests/test_attention.py.)"""
    from hf_kvquant.ops.attention_kernel import quantized_attention

    query, key, value = _prefill(q_len, past)
    out = _attention(query, key, value)
    assert torch.equal(out, _through_sdpa(query, key, value))
    kernel = quantized_attention(query, key.data, key.scale, value.data, value.scale, start=key.start,
                                 end=key.end).float()
    assert (out.float() - kernel).abs().max().item() <= SDPA_TOLERANCE[torch.bfloat16] * kernel.abs().max().item()
