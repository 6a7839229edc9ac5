"""The Triton attention kernel over the quantized cache against its reference (dequantize + plain attention).

On CPU the kernel runs under TRITON_INTERPRET=1 with float32 queries (the interpreter's bf16 dot is wrong);
on a GPU the same grid runs natively, and bf16/fp16 queries are added. The Hadamard-rotated cache (`hadamard=True`)
is checked the same way: through the kernel with a rotated query, against the reference over un-rotated K/V."""

import dataclasses
import functools
import warnings

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

from hf_kvquant import KVQuantMode, QuantizedKV, hf_kvquant_attention, ops
from hf_kvquant.cache import token_minor as token_minor_codes
from hf_kvquant.integration import attend_quantized
from hf_kvquant.ops.reference import attention_reference, dequantize, quantize_reference
from hf_kvquant.rotation import hadamard_matrix, rotate, unrotate

pytest.importorskip("triton", reason="the attention kernel's tests need Triton")
from hf_kvquant.ops.attention_kernel import quantized_attention  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
QUERY_DTYPES = [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]
# Kernel vs reference, relative to the largest output value: float32 differs only by summation order; bf16/fp16 by
# the rounding of the probabilities (times the value scales) and of the output. The reference attends over K/V
# dequantized in float32, as the kernel computes them (int8/e4m3 times a float32 scale): dequantized in the query's
# dtype instead, the reference's own rounding of K moves scores in the hundreds (the 20x outlier channel below) by
# whole units, and errors measured on an H100 reached 1.2 % (fp16) and 2.6 % (bf16) of the output maximum where
# rounding P costs 0.02 % and 0.15 %.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def kernel(query, key: QuantizedKV, value: QuantizedKV, padding_mask=None, **options):
    """The kernel over the buffers and window of a `QuantizedKV` pair, as `attend_quantized` hands them over (without
    the rotation)."""
    return quantized_attention(query, key.data, key.scale, value.data, value.scale, padding_mask, start=key.start,
                               end=key.end, length=key.length, ring=key.ring, mask_offset=key.mask_offset, **options)


def _quantized(batch, kv_heads, kv_len, head_dim, mode, start=5, spare=7, dtype=torch.float32, hadamard=False,
               token_minor=False):
    """Random keys/values quantized into buffers with a used prefix and spare slots, as in the cache; with
    ``hadamard``, quantized after the rotation (``x @ R``) and handed over with ``R``, as a ``hadamard=True`` cache
    does; with ``token_minor``, codes stored as the cache stores values (`hf_kvquant.cache.token_minor`)."""
    x = torch.randn(batch, kv_heads, kv_len, head_dim) * torch.rand(batch, kv_heads, kv_len, 1) * 4
    x[..., 3] *= 20  # an outlier channel, as in real keys
    rotation = hadamard_matrix(head_dim) if hadamard else None
    q, scale = quantize_reference(rotate(x, rotation), mode)
    capacity = start + kv_len + spare
    data = torch.full((batch, kv_heads, capacity, head_dim), 99, dtype=torch.uint8).view(mode.storage_dtype)
    scales = torch.full((batch, kv_heads, capacity), 1e3)  # garbage outside [start, start + kv_len)
    data.view(torch.uint8)[:, :, start : start + kv_len] = q.view(torch.uint8)
    scales[:, :, start : start + kv_len] = scale
    if token_minor:
        data = token_minor_codes(data)
    rotation = None if rotation is None else hadamard_matrix(head_dim, DEVICE)
    return QuantizedKV(data.to(DEVICE), scales.to(DEVICE), start, start + kv_len, mode, dtype, rotation)


def _left_padding(batch, kv_len, pads):
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for row, n in enumerate(pads[:batch]):
        mask[row, :n] = False
    return mask.to(DEVICE)


def _check(batch, heads, kv_heads, q_len, kv_len, head_dim, mode, dtype=torch.float32, pads=None,
           sliding_window=None, softcap=None, scaling=None, hadamard=False, attend=kernel, sinks=None,
           value_head_dim=None, tolerance=None):
    """``attend(query, key, value, mask, **options)`` against the reference over the dequantized (with ``hadamard``:
    un-rotated) keys and values. Values have ``value_head_dim`` channels (default: the keys' ``head_dim``)."""
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    torch.manual_seed(hash((batch, heads, q_len, kv_len, head_dim, value_head_dim)) % 2**31)
    # Values token-minor in a window from a 16-aligned slot, as full-attention and preallocated layers hand them over
    # (`hf_kvquant.cache.token_minor_zeros`); other starts and layouts: test_keys_and_values_of_one_head_dim_in_...
    key = _quantized(batch, kv_heads, kv_len, head_dim, mode, start=16, dtype=dtype, hadamard=hadamard)
    value = _quantized(batch, kv_heads, kv_len, value_head_dim, mode, start=16, dtype=dtype, hadamard=hadamard,
                       token_minor=True)
    query = torch.randn(batch, heads, q_len, head_dim).to(device=DEVICE, dtype=dtype)
    mask = _left_padding(batch, kv_len, pads) if pads else None
    options = dict(scaling=scaling, sliding_window=sliding_window, softcap=softcap)
    if sinks is not None:
        options["sinks"] = sinks
    out = attend(query, key, value, mask, **options)
    exact_key, exact_value = (dataclasses.replace(kv, dtype=torch.float32).dequantize() for kv in (key, value))
    expected = attention_reference(query.float(), exact_key, exact_value, mask, **options)
    assert out.shape == (batch, q_len, heads, value_head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    error = (out.float() - expected).abs().max().item()
    allowed = (tolerance or TOLERANCE[dtype]) * expected.abs().max().item()
    if hadamard and dtype != torch.float32:
        # The kernel computes in the query's dtype, so the rotated query is rounded to it: allow twice what that
        # rounding alone costs the reference.
        rounded = unrotate(rotate(query.float(), key.rotation).to(dtype).float(), key.rotation)
        allowed += 2 * (attention_reference(rounded, exact_key, exact_value, mask,
                                            **options) - expected).abs().max().item()
    if hadamard:
        allowed += _rotation_rounding_bound(query, exact_key, exact_value, expected, scaling)
    assert error <= allowed, f"max error {error}"


def _rotation_rounding_bound(query, key, value, out, scaling) -> float:
    """What float32 rounding of the rotations can cost: the rotated path attends with ``q R`` over the rotated K/V and
    un-rotates its output, the reference attends with ``q`` over ``K Rᵀ``, ``V Rᵀ``. Equal in exact arithmetic (``R``
    orthogonal); in float32 they differ by the rounding of these d-term products, whose summation order is the CPU's
    BLAS kernel's (seen for one input: 4.1e-4 on one x86 CPU, 6.4e-4 on an AMD EPYC, above TOLERANCE's 5.0e-4).

    With u = 2^-24, a d-term product with an orthogonal matrix rounds a vector by about u sqrt(d) of its norm (random
    walk), in a direction independent of the other operand, which projects it by 1/sqrt(d): each score moves by about
    u * scaling * |q| * |k| per rotated side, 2 u scaling |q| |k| in all (soft-capping only shrinks it). Through the
    softmax, score shifts ds move the output by sum_j p_j ds_j (v_j - o), at most max|ds| * max|v - o|; the V side (V Rᵀ
    in the reference, o Rᵀ in the path) adds u sqrt(d) max|v| per rounding. Bound:
    2 u (scaling max|q| max|k| (max|v| + max|o|) + sqrt(d) max|v|). Measured errors reached 0.09 of it (112 random
    inputs, all head_dims and modes); it is about 2e-4 of the largest output, far below what a wrong rotation costs."""
    u, head_dim = 2.0**-24, query.shape[-1]
    scaling = head_dim**-0.5 if scaling is None else scaling
    scores = scaling * query.float().norm(dim=-1).max().item() * key.norm(dim=-1).max().item()
    v_max = value.abs().max().item()
    return 2 * u * (scores * (v_max + out.abs().max().item()) + value.shape[-1] ** 0.5 * v_max)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1)])  # GQA ratios 1, 2, 4, 8
def test_decode(mode, dtype, head_dim, heads, kv_heads):
    # One query token; 1100 tokens make the kernel split them across programs (2 splits) and merge.
    _check(2, heads, kv_heads, 1, 1100, head_dim, mode, dtype)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
@pytest.mark.parametrize(
    "q_len,kv_len",
    [(1, 1), (1, 37), (4, 4), (5, 300), (33, 33), (70, 70), (40, 150)],  # prefill, continued prefill, few-token steps
)
def test_lengths(mode, dtype, q_len, kv_len):
    _check(2, 4, 2, q_len, kv_len, 64, mode, dtype)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,live,capacity,window", [
    (1, 1, 1100, None), (1, 37, 1100, None), (1, 1090, 1100, None),  # decode: splits fixed by the capacity
    (5, 300, 1100, None), (70, 70, 96, None), (1, 900, 1100, 64), (6, 40, 48, 16),  # prefill, window
])
def test_live_length_on_the_device(mode, q_len, live, capacity, window):
    """A preallocated cache (``QuantizedKV.length``): the grid is sized by the capacity, the live length read on the
    device; slots past it hold garbage (from `_quantized`'s spare slots) that no query may see."""
    dtype = QUERY_DTYPES[-1]
    full_key = _quantized(2, 2, capacity, 64, mode, start=0, spare=0, dtype=dtype)
    full_value = _quantized(2, 2, capacity, 64, mode, start=0, spare=0, dtype=dtype)
    length = torch.tensor(live, device=DEVICE)
    key, value = (dataclasses.replace(kv, length=length) for kv in (full_key, full_value))
    query = torch.randn(2, 4, q_len, 64).to(device=DEVICE, dtype=dtype)
    mask = _left_padding(2, capacity, [0, 3])
    out = kernel(query, key, value, mask, sliding_window=window)
    live_key, live_value = (dataclasses.replace(kv, end=live, dtype=torch.float32).dequantize()
                            for kv in (full_key, full_value))
    expected = attention_reference(query.float(), live_key, live_value, mask[:, :live], sliding_window=window)
    error = (out.float() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * expected.abs().max().item(), f"max error {error}"


def _random_quantized(batch, kv_heads, kv_len, head_dim, mode, token_minor=False):
    """Random stored values and scales straight on the GPU (too large to quantize on the host); with ``token_minor``,
    stored as the cache stores values."""
    shape = (batch, kv_heads, head_dim, kv_len) if token_minor else (batch, kv_heads, kv_len, head_dim)
    data = torch.randint(-128, 128, shape, device="cuda", dtype=torch.int8)
    if token_minor:
        data = data.transpose(2, 3)
    if mode is not KVQuantMode.INT8_PER_TOKEN_HEAD:
        data = (data.view(torch.uint8) & 0xBF).view(mode.storage_dtype)  # e4m3 exponents up to 7: no NaN bytes
    scale = torch.rand(batch, kv_heads, kv_len, device="cuda") + 0.1
    return QuantizedKV(data, scale, 0, kv_len, mode, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize(
    "batch,heads,kv_heads,kv_len",
    [(1, 32, 8, 131072), (64, 32, 4, 4096), (17, 8, 8, 131072)],
    ids=["128k", "batch64-gqa8", "past-2**31-elements"],
)
def test_decode_at_scale(mode, batch, heads, kv_heads, kv_len):
    """The issue's bounds: a 128k cache (the most splits), batch 64 at GQA 8, and buffers of more than 2**31 elements
    (offsets past int32). Checked against the reference for the first and last sequence of the batch."""
    torch.manual_seed(0)
    key = _random_quantized(batch, kv_heads, kv_len, 128, mode)
    value = _random_quantized(batch, kv_heads, kv_len, 128, mode, token_minor=True)
    # Scores with a standard deviation of about 3: neither uniform nor one-hot over the 128k tokens.
    key_size = (key.data[0, 0, :4096].float() * key.scale[0, 0, :4096, None]).std().item()
    query = (torch.randn(batch, heads, 1, 128, device="cuda") * (3 / key_size)).to(torch.bfloat16)
    out = kernel(query, key, value)
    for b in (0, batch - 1):
        exact_key, exact_value = (
            dataclasses.replace(kv, data=kv.data[b : b + 1], scale=kv.scale[b : b + 1], dtype=torch.float32)
            .dequantize() for kv in (key, value))
        expected = attention_reference(query[b : b + 1].float(), exact_key, exact_value)
        error = (out[b : b + 1].float() - expected).abs().max().item()
        assert error <= TOLERANCE[torch.bfloat16] * expected.abs().max().item(), (b, error)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len,pads", [(1, 1100, None), (3, 2100, None), (1, 2100, [0, 700])])
def test_split_launches_back_to_back(mode, q_len, kv_len, pads):
    """Long caches split across programs, merged by the last split of each row block, which resets its counter: the
    same counters serve launch after launch, each equal to the reference, and are left at zero."""
    from hf_kvquant.ops import attention_kernel as attention

    for _ in range(3):
        _check(2, 4, 2, q_len, kv_len, 64, mode, pads=pads)
    assert attention._split_counters, "these shapes should take the split path"
    assert all((counters == 0).all() for counters in attention._split_counters.values())


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (6, 40), (48, 48)])
def test_left_padding(mode, q_len, kv_len):
    # Row 0 is padded by more than some of its queries can see: those rows see nothing and come out as zeros.
    _check(3, 4, 2, q_len, kv_len, 64, mode, pads=[0, 9, min(kv_len - 1, 30)])


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len,window", [(1, 300, 16), (40, 40, 8), (10, 90, 32), (3, 600, 512)])
def test_sliding_window(mode, q_len, kv_len, window):
    _check(2, 2, 1, q_len, kv_len, 256, mode, pads=[5], sliding_window=window)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (20, 20)])
def test_softcap_and_scaling(mode, q_len, kv_len):
    _check(1, 4, 2, q_len, kv_len, 128, mode, softcap=5.0, scaling=0.3)


def test_reference_zeros_rows_that_see_nothing():
    query = torch.randn(1, 1, 2, 64)
    key = value = torch.randn(1, 1, 2, 64)
    out = attention_reference(query, key, value, torch.tensor([[False, True]]))
    assert torch.equal(out[0, 0], torch.zeros(1, 64))  # query 0 sees only key 0, which is padding
    assert torch.allclose(out[0, 1, 0], value[0, 0, 1])


# -- the Hadamard-rotated cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96, 256])
@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (20, 20)])
def test_hadamard_kernel_path(mode, dtype, head_dim, q_len, kv_len):
    # What hf_kvquant's attention runs on a GPU: rotated query -> kernel over rotated K/V -> un-rotated output.
    _check(2, 4, 2, q_len, kv_len, head_dim, mode, dtype, hadamard=True, attend=attend_quantized)


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_hadamard_kernel_path_with_padding_window_and_softcap(mode):
    _check(2, 2, 1, 10, 90, 128, mode, pads=[0, 7], sliding_window=32, softcap=5.0, scaling=0.3, hadamard=True,
           attend=attend_quantized)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_hadamard_through_the_registered_function(mode, dtype):
    # The transformers attention function: the kernel on a GPU, dequantize (un-rotates) + reference on CPU.
    def attend(query, key, value, mask, **options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU fallback's warning
            out, weights = hf_kvquant_attention(None, query, key, value, mask, **options)
        assert weights is None
        return out

    _check(2, 4, 2, 3, 150, 64, mode, dtype, pads=[0, 9], hadamard=True, attend=attend)


def test_unrotated_query_on_a_rotated_cache_is_wrong():
    # The rotation must really be undone somewhere: the kernel fed the plain query over rotated K/V misses by far.
    with pytest.raises(AssertionError, match="max error"):
        _check(1, 2, 1, 1, 64, 64, KVQuantMode.INT8_PER_TOKEN_HEAD, hadamard=True, attend=kernel)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len,window,pads", [
    (1, 1100, None, None), (1, 300, 64, [0, 40]), (40, 150, None, [0, 7]), (33, 80, 16, None),  # decode, prefill
])
def test_sinks(mode, q_len, kv_len, window, pads):
    """Attention sinks (one logit per query head, gpt-oss) join the softmax denominator, in the split decode path and
    in prefill, with sliding windows and padding; large sinks take most of the weight, -inf sinks none."""
    heads = 4
    for sinks in (torch.randn(heads) * 3, torch.full((heads,), float("-inf")), torch.tensor([9.0, -2.0, 0.0, 30.0])):
        sinks = sinks.to(DEVICE)
        _check(2, heads, 2, q_len, kv_len, 64, mode, QUERY_DTYPES[-1], pads=pads, sliding_window=window,
               sinks=sinks)


# -- any head size, and keys and values of different head sizes (MLA) ------------------------------------------------

# Tiles padded to a power of two (80, 112, 160, 192, 72: PAD_D), each tile width from 32 to 512 (and 8, under the
# smallest dot tile of 16), the widest head (512: fewer tokens per tile), and keys and values of different head dims:
# MLA as transformers' DeepSeek-V3 caches it (a 512-channel latent as keys, the 64-channel rotary part as values) and as
# its attention sees it after expansion (192-channel keys, 128-channel values).
HEAD_DIM_PAIRS = [(32, 32), (80, 80), (112, 112), (160, 160), (192, 192), (512, 512), (72, 72), (8, 24),
                  (192, 128), (512, 64)]


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("head_dim,value_head_dim", HEAD_DIM_PAIRS)
def test_head_dims(mode, head_dim, value_head_dim):
    # Decode over a left-padded row and a short causal prefill, GQA 2: tiny enough for the interpreter.
    for dtype in QUERY_DTYPES:
        _check(2, 4, 2, 1, 40, head_dim, mode, dtype, pads=[0, 3], value_head_dim=value_head_dim)
        _check(1, 2, 1, 12, 12, head_dim, mode, dtype, value_head_dim=value_head_dim)


# Decode steps of half-precision queries over int8 caches take Q.K^T on the key codes (int8 tensor cores; keys padded
# to 64, 128 or 256), the query as two int8 tiles that resolve 1/64516 of its range: within a hair of the float32
# reference.
# With fp16 queries the output's own rounding (2**-11) stays under this, so a slip of a fraction of a percent fails.
# The interpreter computes int8 dots exactly, so the CPU runs the path too.
CODE_DOTS_TOLERANCE = 1e-3


@pytest.mark.parametrize(
    "head_dim,value_head_dim",
    [(256, 256), (200, 200), (128, 128), (96, 96), (72, 72), (64, 64), (40, 40), (64, 192)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_dots_on_int8_codes(head_dim, value_head_dim, heads, kv_heads):
    mode, dtype = KVQuantMode.INT8_PER_TOKEN_HEAD, torch.float16
    check = functools.partial(_check, mode=mode, dtype=dtype, value_head_dim=value_head_dim,
                              tolerance=CODE_DOTS_TOLERANCE)
    check(2, heads, kv_heads, 1, 1100, head_dim)  # split decode
    check(2, heads, kv_heads, 1, 300, head_dim, pads=[0, 37])
    check(1, heads, kv_heads, 40, 170, head_dim)  # a chunk over a past: the diagonal's masked tiles
    check(2, heads, kv_heads, 9, 90, head_dim, pads=[0, 5], sliding_window=24, softcap=8.0, scaling=0.3,
          sinks=torch.linspace(-1.0, 2.0, heads, device=DEVICE))


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_narrow_heads_decode_four_programs_per_sm(mode):
    # Heads of at most 64 channels with enough (batch, KV head, split) programs run 4 of 2 warps per SM
    # (`_decode_occupancy`): a batch large enough for this device's SMs, checked to take that path.
    from hf_kvquant.ops.attention_kernel import _MAX_SPLITS, _MIN_SPLIT_TOKENS, _decode_occupancy, _num_sms

    sms, kv_heads = _num_sms(torch.device(DEVICE)), 2
    kv_len = min(_MAX_SPLITS * _MIN_SPLIT_TOKENS, 4096 if DEVICE == "cpu" else 16384)
    most_splits = kv_len // _MIN_SPLIT_TOKENS
    batch = -(-4 * sms // (kv_heads * most_splits))
    assert _decode_occupancy(64, 16, 4, batch * kv_heads, most_splits, sms) == (4, 2)
    for dtype in (torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float16,):  # 4 warps: half-precision queries
        _check(batch, 8, kv_heads, 1, kv_len, 64, mode, dtype)
        _check(batch, 8, kv_heads, 1, kv_len + 37, 64, mode, dtype, pads=[5])  # a partial last tile, left padding


def _attend_in_buffers_of_other_strides(mode, heads, q_len, kv_len, head_dim, dtype, token_minor):
    """Keys and values (2 KV heads) in buffers of different capacities, ``token_minor`` ("keys", "values", "neither")
    stored token-minor, both from slot 5: (key, value, the kernel's largest error against the float32 reference as a
    fraction of the largest output)."""
    key = _quantized(2, 2, kv_len, head_dim, mode, spare=7, token_minor=token_minor == "keys")
    value = _quantized(2, 2, kv_len, head_dim, mode, spare=30, token_minor=token_minor == "values")
    query = torch.randn(2, heads, q_len, head_dim).to(device=DEVICE, dtype=dtype)
    out = kernel(query, key, value).float()
    exact_key, exact_value = (dataclasses.replace(kv, dtype=torch.float32).dequantize() for kv in (key, value))
    expected = attention_reference(query.float(), exact_key, exact_value)
    return key, value, (out - expected).abs().max().item() / expected.abs().max().item()


@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (12, 60)])
@pytest.mark.parametrize("token_minor", ["values", "keys", "neither"])
def test_dots_on_int8_codes_in_buffers_of_other_strides(q_len, kv_len, token_minor):
    # From slot 5 (off the 16-slot alignment) and in either layout, as the compacting sliding-window layer's
    # head_dim-minor values come.
    key, value, error = _attend_in_buffers_of_other_strides(KVQuantMode.INT8_PER_TOKEN_HEAD, 8, q_len, kv_len, 128,
                                                            torch.float16, token_minor)
    assert error <= CODE_DOTS_TOLERANCE


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_value_head_dim_differs_split_window_sinks(mode):
    # Split decode (1100 tokens: partials and their merge are value-wide), then a prefill with a window, soft-capping
    # and sinks, and decode with the rotation of each head dim (the query rotated by the keys', the output un-rotated
    # by the values').
    _check(1, 2, 1, 1, 1100, 192, mode, value_head_dim=128)
    _check(2, 4, 2, 10, 50, 192, mode, pads=[0, 6], sliding_window=16, softcap=5.0, scaling=0.2,
           sinks=torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEVICE), value_head_dim=128)
    _check(2, 4, 2, 1, 70, 192, mode, hadamard=True, attend=attend_quantized, value_head_dim=128)


def test_wrong_head_dims_are_refused_by_the_kernel():
    mode = KVQuantMode.INT8_PER_TOKEN_HEAD
    key = _quantized(1, 1, 4, 64, mode)
    value = _quantized(1, 1, 4, 64, mode)
    with pytest.raises(ValueError, match="query head_dim 32, key head_dim 64.*query and key of one head_dim"):
        kernel(torch.zeros(1, 1, 1, 32, device=DEVICE), key, value)
    wide = _quantized(1, 1, 4, 640, mode)
    with pytest.raises(ValueError, match="value head_dim 640.*each head_dim from 1 to 512"):
        kernel(torch.zeros(1, 1, 1, 64, device=DEVICE), key, wide)


def test_reference_takes_value_head_dim_and_refuses_a_key_of_another():
    query, key, value = torch.randn(1, 2, 3, 48), torch.randn(1, 1, 3, 48), torch.randn(1, 1, 3, 20)
    out = attention_reference(query, key, value)
    assert out.shape == (1, 3, 2, 20)
    assert torch.allclose(out[:, 0], value[:, :, 0].expand(1, 2, 20))  # the first query sees only the first key
    with pytest.raises(ValueError, match="keys need the query's head_dim"):
        attention_reference(query, torch.randn(1, 1, 3, 40), value)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("head_dim", list(range(32, 513, 16)))
def test_every_head_dim_on_the_gpu(mode, head_dim):
    """Every multiple of 16 from 32 to 512 (the issue's range), bf16, in a split decode and a prefill longer than one
    tile: each compiles (registers and shared memory of the head_dim 256 tiles at most) and matches the reference."""
    _check(2, 8, 2, 1, 1100, head_dim, mode, torch.bfloat16, pads=[0, 5])
    _check(1, 4, 2, 70, 150, head_dim, mode, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
@pytest.mark.parametrize("head_dim,value_head_dim", HEAD_DIM_PAIRS)
def test_head_dims_at_gpu_sizes(mode, dtype, head_dim, value_head_dim):
    # Decode split across programs, GQA 4, and a prefill with bulk (unmasked) tiles.
    _check(2, 8, 2, 1, 3000, head_dim, mode, dtype, pads=[0, 40], value_head_dim=value_head_dim)
    _check(2, 4, 1, 200, 300, head_dim, mode, dtype, value_head_dim=value_head_dim)


@requires_cuda
def test_widest_heads_compile_without_spills():
    """head_dim 512 takes half the tokens (and rows) per tile that 256 takes, so that its tiles need no more registers
    or shared memory: compiled for this GPU, no variant of the attention kernel spills registers (a spill is reserved
    as local memory for every thread the GPU can hold: eval/results/kernel_tuning.md)."""
    from hf_kvquant.ops import attention_kernel

    for cache in getattr(attention_kernel._attention_kernel, "device_caches", {}).values():
        cache[0].clear()  # only the variants compiled here are inspected
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim, value_head_dim in ((512, 512), (512, 64), (64, 512)):
            _check(2, 8, 2, 1, 1100, head_dim, KVQuantMode.INT8_PER_TOKEN_HEAD, dtype, value_head_dim=value_head_dim)
            _check(1, 8, 1, 150, 150, head_dim, KVQuantMode.FP8_PER_TOKEN_HEAD, dtype, value_head_dim=value_head_dim)
    caches = getattr(attention_kernel._attention_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no per-device kernel cache to inspect")
    compiled = [kernel for cache in caches.values() for kernel in cache[0].values()]
    assert compiled
    names = attention_kernel._attention_kernel.arg_names
    shown = ("q_len", "GROUP", "HEAD_DIM_K", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "SPLIT", "DOT_PRECISION")
    spilling = [({names[index[0]]: value for index, value in constants.items() if names[index[0]] in shown},
                 k.n_spills)
                for k in compiled if getattr(k, "n_spills", 0)
                for constants in [getattr(getattr(k, "src", None), "constants", None) or {}]]
    assert not spilling, str(spilling)  # a string: pytest would shorten the constants


@pytest.mark.parametrize("value_head_dim", [16, 32, 48])
def test_compiled_operator_output_has_the_values_head_dim(value_head_dim):
    """The custom operator dynamo keeps in a compiled graph: its fake (shape-only) implementation gives the values'
    head_dim, as the real one does (the reference on the CPU, the kernel on a GPU)."""
    mode = KVQuantMode.INT8_PER_TOKEN_HEAD
    key = _quantized(1, 1, 6, 32, mode, start=0, spare=2)
    value = _quantized(1, 1, 6, value_head_dim, mode, start=0, spare=2)
    query = torch.randn(1, 2, 3, 32, device=DEVICE)
    args = (query, key.data, key.scale, value.data, value.scale, torch.tensor(6, device=DEVICE), None, 0, 8, False, 0,
            None, None, None, None)
    assert torch.ops.hf_kvquant.attention(*args).shape == (1, 3, 2, value_head_dim)
    checks = torch.library.opcheck(torch.ops.hf_kvquant.attention.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,kv_len", [(1, 60), (20, 20)])
@pytest.mark.parametrize("token_minor", ["values", "keys", "neither"])
def test_keys_and_values_of_one_head_dim_in_buffers_of_other_strides(mode, q_len, kv_len, token_minor):
    # Same head_dim, different buffer capacities and layouts (the cache stores values token-minor; the kernel takes
    # either for either): the kernel reads each with its own strides.
    key, value, error = _attend_in_buffers_of_other_strides(mode, 4, q_len, kv_len, 80, torch.float32, token_minor)
    assert key.data.stride() != value.data.stride()
    assert error <= TOLERANCE[torch.float32]


# -- ring buffers: a preallocated sliding-window layer that holds one window -----------------------------------------


def _float32_bound(query, key, value, out) -> float:
    """How far two float32 computations of the same attention may differ when only their order of operations differs
    (the kernel sums tiles, splits and the online softmax's rescalings in its order, the reference in BLAS's), from
    first-order rounding error analysis with u = 2^-24, over the visible keys ``key`` and values ``value``:

    * a score is a d-term dot product, scaled and moved to base 2: each side is off by at most (d + 8) u S, S the
      largest ``scaling * sum_i |q_i k_i|``; both sides: ds <= (2d + 16) u S;
    * score shifts move a softmax-weighted mean by sum_j p_j (ds_j - mean ds)(v_j - o): at most 2 ds max|v - o|;
    * the n-term sum P.V, its normalisation, the value scale folded into P and the merge of splits: (n + 8) u max|v|.

    A worst case (rounding errors add up in practice as a random walk): measured errors stay far below it, while a
    token read from the wrong slot or a mask column off by one costs far more (checked in `test_ring_buffer`)."""
    u, head_dim, n = 2.0**-24, query.shape[-1], key.shape[2]
    group = query.shape[1] // key.shape[1]
    k = key.float().abs().repeat_interleave(group, dim=1)
    score_bound = (query.float().abs() @ k.transpose(-1, -2)).max().item() * head_dim**-0.5
    v_max = value.abs().max().item()
    ds = (2 * head_dim + 16) * u * score_bound
    return 2 * ds * (v_max + out.abs().max().item()) + (n + 8) * u * v_max


def _ring(batch, kv_heads, capacity, total, head_dim, mode, seed, token_minor=False):
    """A ring buffer of ``capacity`` slots after ``total`` tokens were written (token ``p`` in slot ``p % capacity``;
    slots never written hold garbage: byte 99, scale 1000): ``(data, scale)`` on the device, and the tokens it holds,
    dequantized in float32 in position order, built from the positions (not through `ring_slots`)."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(batch, kv_heads, total, 1, generator=generator) * 3 + 0.5
    x = torch.randn(batch, kv_heads, total, head_dim, generator=generator) * magnitude
    codes, scales = quantize_reference(x, mode)
    data = torch.full((batch, kv_heads, capacity, head_dim), 99, dtype=torch.uint8).view(mode.storage_dtype)
    scale = torch.full((batch, kv_heads, capacity), 1e3)
    positions = torch.arange(max(total - capacity, 0), total)
    data.view(torch.uint8)[:, :, positions % capacity] = codes.view(torch.uint8)[:, :, positions]
    scale[:, :, positions % capacity] = scales[:, :, positions]
    if token_minor:
        data = token_minor_codes(data)
    held = dequantize(codes[:, :, positions], scales[:, :, positions], torch.float32)
    return data.to(DEVICE), scale.to(DEVICE), held.to(DEVICE)


def _check_ring(mode, capacity, total, q_len, heads, kv_heads, head_dim, padded, window, token_minor,
                dtype=torch.float32, seed=0):
    """The kernel and `ops.attention` over a ring against the reference over the tokens it holds, in position order,
    with a padding mask over absolute positions (row 1 left-padded into the held tokens). Returns (largest error,
    `_float32_bound`, the kernel's distance from two wrong answers: the reference with the mask one column off, and
    over the ring's slots in slot order once it wrapped, largest output)."""
    batch = 2
    kd, ks, held_k = _ring(batch, kv_heads, capacity, total, head_dim, mode, seed)
    vd, vs, held_v = _ring(batch, kv_heads, capacity, total, head_dim, mode, seed + 1, token_minor)
    n = held_k.shape[2]
    query = torch.randn(batch, heads, q_len, head_dim, generator=torch.Generator().manual_seed(seed + 2))
    query = query.to(device=DEVICE, dtype=dtype)
    mask = None
    if padded:  # columns are positions, as many as a cache of total + 5 tokens would show
        mask = torch.ones(batch, total + 5, dtype=torch.bool, device=DEVICE)
        mask[1, : total - n + 3] = False
    length = torch.tensor(total, device=DEVICE)
    options = dict(sliding_window=window)

    def reference(k, v, columns):
        return attention_reference(query.float(), k, v, None if mask is None else mask[:, columns], **options)

    expected = reference(held_k, held_v, slice(total - n, total))
    outs = [quantized_attention(query, kd, ks, vd, vs, mask, length=length, ring=True, **options),
            ops.attention(query, kd, ks, vd, vs, mask, length=length, ring=True, **options)]
    error = max((out.float() - expected).abs().max().item() for out in outs)
    bound = _float32_bound(query, held_k, held_v, expected)
    controls = {}
    if mask is not None:
        controls["mask_column_off_by_one"] = reference(held_k, held_v, slice(total - n + 1, total + 1))
    if total > capacity and (q_len > 1 or mask is not None):  # (a decode step without a mask sees keys as a set)
        slot_order = (torch.arange(n, device=DEVICE) - total) % capacity  # the logical index held in each slot
        controls["slot_order"] = reference(held_k[:, :, slot_order], held_v[:, :, slot_order], slice(total - n, total))
    control_errors = {name: (outs[0].float() - c).abs().max().item() for name, c in controls.items()}
    return error, bound, control_errors, expected.abs().max().item()


RING_CASES = [  # (q_len, heads, kv_heads, head_dim, padded, sliding_window ("W": the capacity), values token-minor)
    (1, 2, 2, 64, False, None, True),
    (1, 8, 2, 80, True, "W", True),
    (3, 8, 2, 64, True, "W", False),
    (3, 4, 1, 80, False, None, True),
]
# Tokens written, by the ring's capacity: before it wraps, when it is just full, after, and after several turns.
RING_TOTALS = {"before_wrap": lambda w: w - 5, "full": lambda w: w, "wrapped": lambda w: w + 7,
               "turns": lambda w: 3 * w + 3}


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("capacity", [16, 37, 48])
@pytest.mark.parametrize("when", list(RING_TOTALS))
def test_ring_buffer(mode, capacity, when):
    """A preallocated sliding-window layer that holds one window: the kernel (float32 queries: it and the reference
    differ only in the order of operations) within `_float32_bound` of the reference, decode steps and a short chunk
    that fits in the ring, GQA 1 and 4, head_dim 64 and 80, with and without a padding mask over absolute positions and
    a sliding window of the capacity. The bound is a worst case, about 1000 x the errors measured, and still tells
    the ring read in slot order (measured 80 x the bound and more) and, in the chunk of 3 queries, the mask one column
    off (4 x and more; in a decode step one column moves one token's share of the output, which it can hide)."""
    total = RING_TOTALS[when](capacity)
    for seed, (q_len, heads, kv_heads, head_dim, padded, window, token_minor) in enumerate(RING_CASES):
        window = capacity if window == "W" else window
        error, bound, controls, largest = _check_ring(mode, capacity, total, q_len, heads, kv_heads, head_dim,
                                                      padded, window, token_minor, seed=seed)
        assert error <= bound, (q_len, heads, kv_heads, head_dim, padded, window, error, bound)
        assert controls.get("slot_order", bound + 1) > bound, (q_len, padded, controls, bound)
        if q_len > 1:
            assert controls.get("mask_column_off_by_one", bound + 1) > bound, (q_len, padded, controls, bound)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("total", [900, 2500])
def test_ring_buffer_split_decode(mode, total):
    """A ring long enough to be split across programs (1100 slots: 2 splits, merged) and to take whole unmasked
    tiles (every row sees every token), before and after it wrapped, with and without a mask and a window."""
    for padded, window in ((False, None), (True, 1100)):
        error, bound, _, _ = _check_ring(mode, 1100, total, 1, 4, 2, 64, padded, window, True)
        assert error <= bound, (padded, error, bound)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("capacity", [16, 48, 1100, 4096])
@pytest.mark.parametrize("when", list(RING_TOTALS))
def test_ring_buffer_on_the_gpu(mode, dtype, capacity, when):
    """Half-precision queries over a ring on the GPU, within `TOLERANCE` of the largest output (the rounding of the
    probabilities and the output to the query's dtype, as in the other tests here)."""
    total = RING_TOTALS[when](capacity)
    for seed, (q_len, heads, kv_heads, head_dim, padded, window, token_minor) in enumerate(RING_CASES):
        window = capacity if window == "W" else window
        error, _, _, largest = _check_ring(mode, capacity, total, q_len, heads, kv_heads, head_dim, padded, window,
                                           token_minor, dtype=dtype, seed=seed)
        assert error <= TOLERANCE[dtype] * largest, (q_len, heads, head_dim, padded, window, error, largest)


def test_ring_needs_its_length_on_the_device():
    kd, ks, _ = _ring(1, 1, 16, 20, 64, KVQuantMode.INT8_PER_TOKEN_HEAD, 0)
    query = torch.zeros(1, 1, 1, 64, device=DEVICE)
    for attend in (quantized_attention, ops.attention):
        with pytest.raises(ValueError, match="ring buffer needs its token count on the device"):
            attend(query, kd, ks, kd, ks, ring=True)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("q_len,on_device", [(1, False), (3, False), (1, True), (4, True)])
def test_mask_offset(mode, q_len, on_device):
    """A window whose padding mask starts at column ``mask_offset`` (a prefill window built from a ring, whose mask
    covers positions): the columns before it (all masked here) and after the window are never read."""
    kv_len, offset = 40, 13
    key = _quantized(2, 2, kv_len, 64, mode, start=5)
    value = _quantized(2, 2, kv_len, 64, mode, start=5, token_minor=True)
    if on_device:  # a preallocated window: the live tokens counted on the device, slots past them unread
        key, value = (dataclasses.replace(kv, length=torch.tensor(kv_len - 6, device=DEVICE)) for kv in (key, value))
    live = kv_len - 6 if on_device else kv_len
    query = torch.randn(2, 4, q_len, 64, device=DEVICE)
    mask = torch.zeros(2, offset + kv_len + 9, dtype=torch.bool, device=DEVICE)
    mask[:, offset + kv_len :] = True
    mask[:, offset : offset + kv_len] = _left_padding(2, kv_len, [0, 7])
    exact_key, exact_value = (dataclasses.replace(kv, end=kv.start + live, dtype=torch.float32).dequantize()
                              for kv in (key, value))
    expected = attention_reference(query, exact_key, exact_value, mask[:, offset : offset + live], sliding_window=24)
    bound = _float32_bound(query, exact_key, exact_value, expected)
    key, value = (dataclasses.replace(kv, mask_offset=offset) for kv in (key, value))
    for out in (kernel(query, key, value, mask, sliding_window=24),
                attend_quantized(query, key, value, mask, sliding_window=24)):
        assert (out - expected).abs().max().item() <= bound


def test_compiled_ring_decode_in_one_graph():
    """The custom operator takes the ring (and a mask offset): a decode step through a ring compiles with
    ``fullgraph=True`` (no host read of the length) and equals the eager call; its fake gives the output's shape."""
    mode, capacity, total = KVQuantMode.INT8_PER_TOKEN_HEAD, 16, 23  # (opcheck's schema mode fails on float8 on CPU)
    kd, ks, _ = _ring(2, 2, capacity, total, 64, mode, 0)
    vd, vs, _ = _ring(2, 2, capacity, total, 48, mode, 1, token_minor=True)
    query = torch.randn(2, 4, 1, 64, device=DEVICE)
    length = torch.tensor(total, device=DEVICE)
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1, :12] = False

    def step(query, length, mask):
        return ops.attention(query, kd, ks, vd, vs, mask, length=length, ring=True, sliding_window=capacity)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):  # the second call after a token more: the same graph
        assert torch.equal(compiled(query, length, mask), step(query, length, mask))
        length += 1
    args = (query, kd, ks, vd, vs, length, mask, 0, capacity, True, 0, None, capacity, None, None)
    assert torch.ops.hf_kvquant.attention(*args).shape == (2, 1, 4, 48)
    checks = torch.library.opcheck(torch.ops.hf_kvquant.attention.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert set(checks.values()) == {"SUCCESS"}, checks


def test_dequantize_ring_gives_position_order():
    """`ops.dequantize_ring`: the held tokens in position order, then the slots not written yet; the same shape at
    every step, computed on the device (compiles without a graph break)."""
    mode, capacity = KVQuantMode.INT8_PER_TOKEN_HEAD, 16
    for total in (5, 16, 23, 51):
        data, scale, held = _ring(1, 2, capacity, total, 64, mode, total)
        length = torch.tensor(total, device=DEVICE)
        out = ops.dequantize_ring(data, scale, length, torch.float32)
        assert out.shape == (1, 2, capacity, 64)
        assert torch.equal(out[:, :, : held.shape[2]], held)
        compiled = torch.compile(ops.dequantize_ring, fullgraph=True)
        assert torch.equal(compiled(data, scale, length, torch.float32), out)
        ring_kv = QuantizedKV(data, scale, 0, capacity, mode, torch.float32, length=length, ring=True)
        assert torch.equal(ring_kv.dequantize(), out)
