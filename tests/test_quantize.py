"""Quantize-on-write: the plain-PyTorch reference against hand-computed cases, the dequantization error bound,
and the Triton kernel (under the interpreter on CPU, natively on a GPU) against the reference, byte for byte."""

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON, filled_buffers, requires_cuda, requires_triton

import hf_kvquant.ops as ops
from hf_kvquant import KVQuantMode
from hf_kvquant.cache import token_minor
from hf_kvquant.modes import SCALE_FLOOR
from hf_kvquant.ops import quantize_into
from hf_kvquant.ops.reference import dequantize, quantize_into_reference, quantize_reference

if HAS_TRITON:
    from hf_kvquant.ops.quantize_kernel import quantize_into_triton

INT8 = KVQuantMode.INT8_PER_TOKEN_HEAD
FP8 = KVQuantMode.FP8_PER_TOKEN_HEAD
MODES = [INT8, FP8]
IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _row(values, head_dim=64, fill=0.0):
    """One token-head row of ``head_dim`` holding ``values`` first, ``fill`` after."""
    row = torch.full((head_dim,), fill, dtype=torch.float32)
    row[: len(values)] = torch.tensor(values, dtype=torch.float32)
    return row


# ---------------------------------------------------------------------------------------------------------------
# quantize_reference: hand-computed cases
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_all_zero_token_head_gets_scale_floor(mode, dtype):
    x = torch.zeros(2, 3, 4, 64, dtype=dtype)
    x[1, 2, 3] = torch.linspace(-1, 1, 64).to(dtype)  # one non-zero row beside the zero ones
    q, scale = quantize_reference(x, mode)
    assert q.dtype == mode.storage_dtype and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    floor = torch.tensor(SCALE_FLOOR, dtype=torch.float32)
    zero_rows = torch.ones(2, 3, 4, dtype=torch.bool)
    zero_rows[1, 2, 3] = False
    assert torch.equal(scale[zero_rows], floor.expand(int(zero_rows.sum())))
    assert (scale > 0).all() and not scale.isnan().any()
    # All-zero rows quantize to +0 bytes, and dequantize to exact zeros without NaN.
    assert (_bytes(q)[zero_rows] == 0).all()
    deq = dequantize(q, scale, torch.float32)
    assert not deq.isnan().any()
    assert (deq[zero_rows] == 0).all()
    # The non-zero row did not get the floor.
    assert scale[1, 2, 3].item() == pytest.approx(1.0 / mode.qmax, rel=1e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("absmax", [1.0, 3.7, 0.001, 1e4, 123.456, 5e-4])
def test_absmax_maps_to_plus_minus_qmax(mode, absmax):
    torch.manual_seed(0)
    rest = (torch.rand(62) * 2 - 1) * absmax * 0.9
    x = torch.cat([torch.tensor([absmax, -absmax]), rest]).reshape(1, 1, 1, 64)
    q, scale = quantize_reference(x, mode)
    qf = q.float().flatten()
    assert qf[0].item() == mode.qmax
    assert qf[1].item() == -mode.qmax
    assert qf.abs().max().item() == mode.qmax
    # the scale is absmax / qmax, computed in float32
    expected = torch.tensor(absmax, dtype=torch.float32) / torch.tensor(mode.qmax, dtype=torch.float32)
    assert scale.dtype == torch.float32
    assert scale.item() == expected.item()


@pytest.mark.parametrize("mode", MODES)
def test_tiny_rows_use_the_floor_not_the_full_range(mode):
    # absmax / qmax below SCALE_FLOOR: the floor wins and the row is quantized as x / 1e-6, below qmax.
    x = _row([1e-5, -5e-6, 2.5e-6]).reshape(1, 1, 1, 64)
    q, scale = quantize_reference(x, mode)
    assert scale.item() == torch.tensor(SCALE_FLOOR, dtype=torch.float32).item()
    got = q.float().flatten()[:3].tolist()
    if mode is INT8:
        assert got == [10.0, -5.0, 2.0]  # 2.5 rounds half to even
    else:
        assert got == [10.0, -5.0, 2.5]  # all exactly representable in e4m3
    assert (q.float().flatten()[3:] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_scale_is_float32_absmax_over_qmax(mode, dtype):
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 5, 128) * torch.logspace(-3, 3, 5).reshape(1, 1, 5, 1)).to(dtype)
    _, scale = quantize_reference(x, mode)
    assert scale.dtype == torch.float32
    absmax = x.float().abs().amax(dim=-1)
    expected = absmax / torch.tensor(mode.qmax, dtype=torch.float32)
    assert torch.equal(scale, expected)


def test_int8_rounds_half_to_even():
    # absmax 127 makes the scale exactly 1.0, so x / scale == x: the ties are exact.
    values = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -126.5, 0.0, -0.0]
    expected = [127, 0, 2, 2, 0, -2, -2, 4, -4, 126, -126, 0, 0]
    x = _row(values).reshape(1, 1, 1, 64)
    q, scale = quantize_reference(x, INT8)
    assert scale.item() == 1.0
    assert q.dtype == torch.int8
    assert q.flatten()[: len(values)].tolist() == expected
    assert (q.flatten()[len(values):] == 0).all()


def test_int8_rounds_to_nearest_not_truncates():
    values = [127.0, 1.7, -1.7, 0.6, -0.6, 0.4, -0.4, 126.51, -126.51, 2.49, -2.49, 5.9, -5.9]
    expected = [127, 2, -2, 1, -1, 0, 0, 127, -127, 2, -2, 6, -6]
    x = _row(values).reshape(1, 1, 1, 64)
    q, scale = quantize_reference(x, INT8)
    assert scale.item() == 1.0
    assert q.flatten()[: len(values)].tolist() == expected


def test_int8_never_uses_minus_128():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 9, 64) * 50
    x[..., 5] = -x.abs().amax(-1) * 1.0000001  # the most negative element is the absmax
    q, _ = quantize_reference(x, INT8)
    assert q.min().item() == -127
    assert q.max().item() <= 127


def _all_finite_e4m3() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    return values[~values.isnan()]


def test_fp8_representable_values_round_trip_exactly():
    values = _all_finite_e4m3()
    assert values.abs().max().item() == 448.0 and values.numel() == 254
    # Rows of 64: the first element is 448 so that the scale is exactly 1.0.
    per_row = 63
    rows = []
    for i in range(0, values.numel(), per_row):
        chunk = values[i : i + per_row]
        row = torch.zeros(64)
        row[0] = 448.0
        row[1 : 1 + chunk.numel()] = chunk
        rows.append(row)
    x = torch.stack(rows).reshape(1, 1, len(rows), 64)
    q, scale = quantize_reference(x, FP8)
    assert (scale == 1.0).all()
    assert q.dtype == torch.float8_e4m3fn
    # bytes equal to the e4m3 encoding of each value (this includes -0.0 -> 0x80)
    assert torch.equal(q.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(q.float(), x)
    assert torch.equal(torch.signbit(q.float()), torch.signbit(x))


@pytest.mark.parametrize(
    "value, expected",
    [
        (100.0, 96.0),  # tie between 96 (even mantissa) and 104 (odd): spacing 8 in [64, 128)
        (108.0, 112.0),  # tie between 104 (odd) and 112 (even)
        (-100.0, -96.0),
        (101.0, 104.0),  # above the tie: nearest
        (99.9, 96.0),
        (17.0, 16.0),  # spacing 2 in [16, 32): tie between 16 (even) and 18 (odd)
        (19.0, 20.0),  # tie between 18 (odd) and 20 (even)
        (432.0, 448.0),  # spacing 32 in [256, 512): tie between 416 (odd) and 448 (even)
        (400.0, 384.0),  # tie between 384 (even) and 416 (odd)
        (447.0, 448.0),
        (2.0**-10, 0.0),  # subnormal tie between 0 and 2**-9
        (3 * 2.0**-10, 2 * 2.0**-9),  # subnormal tie between 1 (odd) and 2 (even) multiples of 2**-9
        (5 * 2.0**-10, 2 * 2.0**-9),  # subnormal tie between 2 (even) and 3 (odd)
        (15 * 2.0**-10, 2.0**-6),  # tie between the largest subnormal 7*2**-9 and the smallest normal 2**-6
        (0.3, 0.3125),  # nearest of 0.28125 / 0.3125
    ],
)
def test_fp8_rounds_to_nearest_even(value, expected):
    x = _row([448.0, value]).reshape(1, 1, 1, 64)
    q, scale = quantize_reference(x, FP8)
    assert scale.item() == 1.0
    got = q.float().flatten()
    assert got[0].item() == 448.0
    assert got[1].item() == expected


@pytest.mark.parametrize("magnitude", [1e-8, 1e-3, 1.0, 1e4, 3e38])
def test_fp8_saturates_and_stays_finite(magnitude):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 64) * magnitude
    x = x.clamp(-3.3e38, 3.3e38)
    q, scale = quantize_reference(x, FP8)
    qf = q.float()
    assert not qf.isnan().any() and not qf.isinf().any()
    assert qf.abs().max().item() <= 448.0
    assert torch.isfinite(scale).all() and (scale >= torch.tensor(SCALE_FLOOR)).all()
    floored = scale == torch.tensor(SCALE_FLOOR)
    # every row whose scale is not the floor reaches the top of the range; floored rows stay below it
    assert torch.equal(qf.abs().amax(-1)[~floored], torch.full((int((~floored).sum()),), 448.0))
    assert (qf.abs().amax(-1)[floored] < 448.0).all()
    assert floored.all() == (magnitude == 1e-8)


# ---------------------------------------------------------------------------------------------------------------
# dequantize: round-trip error bounds
# ---------------------------------------------------------------------------------------------------------------


def _test_input(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    x = torch.randn(shape, generator=g)
    mags = torch.logspace(-8, 4, t).reshape(1, 1, t, 1)
    x = x * mags
    x[0, 0, 0] = 0.0  # an all-zero token-head
    x[-1, -1, -1, 0] = 1e4  # one huge element beside ordinary ones
    return x.to(dtype)


@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_roundtrip_error_at_most_half_scale(dtype, head_dim):
    x = _test_input((2, 3, 9, head_dim), seed=4, dtype=dtype)
    q, scale = quantize_reference(x, INT8)
    deq = dequantize(q, scale, torch.float32)
    err = (deq - x.float()).abs()
    bound = scale.unsqueeze(-1) / 2 * (1 + 1e-6) + x.float().abs() * 2**-22
    assert (err <= bound).all(), (err - bound).max()
    # the bound is not vacuous: the error is a sizeable fraction of it somewhere
    assert (err / bound).max() > 0.5
    # dequantize returns the requested dtype
    assert dequantize(q, scale, dtype).dtype == dtype


@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_roundtrip_relative_error(dtype, head_dim):
    x = _test_input((2, 3, 9, head_dim), seed=5, dtype=dtype)
    q, scale = quantize_reference(x, FP8)
    deq = dequantize(q, scale, torch.float32)
    xf = x.float()
    err = (deq - xf).abs()
    bound = xf.abs() * 2**-4 + scale.unsqueeze(-1) * 2**-10 + xf.abs() * 2**-20
    assert (err <= bound).all(), (err - bound).max()
    assert (err / bound).max() > 0.25


@pytest.mark.parametrize("mode", MODES)
def test_dequantize_is_q_times_scale(mode):
    x = _test_input((1, 2, 5, 64), seed=6)
    q, scale = quantize_reference(x, mode)
    for dtype in IN_DTYPES:
        deq = dequantize(q, scale, dtype)
        assert deq.dtype == dtype and deq.shape == x.shape
        assert torch.equal(deq, (q.float() * scale[..., None]).to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernel (under TRITON_INTERPRET=1) against the reference, byte for byte
# ---------------------------------------------------------------------------------------------------------------

SENTINEL_SCALE = -123.25


def _sentinel_buffers(batch, heads, capacity, head_dim, mode, seed):
    """Buffers of random bytes and sentinel scales; the value codes token-minor, as the cache stores them."""
    g = torch.Generator().manual_seed(seed)
    bufs = []
    for which in range(2):
        data = torch.randint(0, 256, (batch, heads, capacity, head_dim), generator=g, dtype=torch.uint8)
        if which == 1:
            data = token_minor(data)
            assert data.stride(-2) == 1
        bufs.append(data.view(mode.storage_dtype))
        bufs.append(torch.full((batch, heads, capacity), SENTINEL_SCALE, dtype=torch.float32))
    return bufs  # key_data, key_scale, value_data, value_scale


def _special_kv(batch, tokens, heads, head_dim, dtype, mode, seed):
    """Key/value made as [B, T, H, D] then transposed (as transformers does), with special rows mixed in."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for which in range(2):
        x = torch.randn(batch, tokens, heads, head_dim, generator=g)
        x[0, 0, 0] = 0.0  # all-zero token-head
        x[0, 1, 0] *= 1e4  # large magnitude
        x[-1, 1, -1] *= 1e-8  # tiny magnitude
        x[-1, 2 % tokens, 0] = 0.0
        x[-1, 2 % tokens, 0, 0] = 1e4  # one huge element: the rest lands in FP8 subnormals / int8 zeros
        x[-1, 2 % tokens, 0, 1:8] = torch.tensor([1.0, -1.0, 0.3, -2.5, 1e-2, -0.0, 7.0])
        # exact ties once scaled (scale exactly 1.0)
        if mode is INT8:
            ties = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 1.7, -1.7, 126.5, -0.0]
        else:
            ties = [448.0, 100.0, 108.0, -100.0, 17.0, 19.0, 432.0, 400.0, 2.0**-10, 3 * 2.0**-10, 15 * 2.0**-10, -0.0]
        x[0, -1, -1] = 0.0
        x[0, -1, -1, : len(ties)] = torch.tensor(ties)
        if which == 1:
            x = x * 3.0  # values differ from keys
        x = x.clamp(-6e4, 6e4)  # finite in float16 too
        out.append(x.to(dtype).transpose(1, 2))
    return out


def _run_kernel(key, value, slots, buffers, mode):
    """The Triton kernel over these CPU tensors: under the interpreter on a CPU machine, natively on a GPU (copied
    there and back), so that the same cases hold the kernel to the reference on both."""
    if not HAS_CUDA:
        quantize_into_triton(key, value, slots, buffers, mode)
        return
    on_gpu = [b.cuda() for b in buffers]
    quantize_into_triton(key.cuda(), value.cuda(), slots.cuda(), on_gpu, mode)
    for b, g in zip(buffers, on_gpu):
        b.copy_(g.cpu())


@requires_triton
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("dtype", IN_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 112, 128, 160, 192, 256, 512])
def test_triton_kernel_matches_reference_bytes(mode, dtype, head_dim):
    batch, heads, tokens, capacity = 2, 3, 9, 16
    key, value = _special_kv(batch, tokens, heads, head_dim, dtype, mode, seed=head_dim)
    assert not key.is_contiguous() and key.stride(-1) == 1
    if head_dim in (96, 256):
        value = value.contiguous()  # keys and values with different strides
    slots = torch.tensor([3, 0, 15, 7, 8, 2, 11, 12, 5])  # non-consecutive, out of order
    ref = _sentinel_buffers(batch, heads, capacity, head_dim, mode, seed=7)
    tri = [b.clone() for b in ref]
    original = [b.clone() for b in ref]

    quantize_into_reference(key, value, slots, ref, mode)
    _run_kernel(key, value, slots, tri, mode)

    for r, t in zip(ref, tri):
        assert r.dtype == t.dtype
        assert torch.equal(_bytes(r), _bytes(t))
    # Slots not written keep their previous contents, in both.
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[slots] = False
    for t, o in zip(tri, original):
        assert torch.equal(_bytes(t)[:, :, untouched], _bytes(o)[:, :, untouched])
    # The written slots hold the quantization of token i at slot slots[i].
    for x, data, scale in ((key, tri[0], tri[1]), (value, tri[2], tri[3])):
        q, s = quantize_reference(x, mode)
        assert torch.equal(_bytes(data[:, :, slots]), _bytes(q))
        assert torch.equal(scale[:, :, slots], s)
        assert (scale[:, :, slots] != SENTINEL_SCALE).all()


@requires_triton
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_kernel_head_dim_not_contiguous(mode, dtype):
    # head_dim is not the innermost dimension of the input: the kernel must fall back to a contiguous copy.
    batch, heads, tokens, head_dim, capacity = 1, 2, 5, 64, 8
    g = torch.Generator().manual_seed(11)
    key = torch.randn(batch, heads, head_dim, tokens, generator=g).to(dtype).transpose(-1, -2)
    value = (torch.randn(batch, heads, head_dim, tokens, generator=g) * 1e3).to(dtype).transpose(-1, -2)
    assert key.stride(-1) != 1
    slots = torch.tensor([6, 1, 4, 2, 7])
    ref = _sentinel_buffers(batch, heads, capacity, head_dim, mode, seed=12)
    tri = [b.clone() for b in ref]
    quantize_into_reference(key, value, slots, ref, mode)
    _run_kernel(key, value, slots, tri, mode)
    for r, t in zip(ref, tri):
        assert torch.equal(_bytes(r), _bytes(t))


@requires_triton
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_triton_kernel_decode_sized_writes(mode, tokens):
    # Decode (1 token) and small appends at the end of a buffer, as the cache does.
    batch, heads, head_dim, capacity = 2, 2, 128, 12
    g = torch.Generator().manual_seed(tokens)
    key = torch.randn(batch, heads, tokens, head_dim, generator=g, dtype=torch.float32) * 5
    value = torch.randn(batch, heads, tokens, head_dim, generator=g, dtype=torch.float32) / 5
    slots = torch.arange(capacity - tokens, capacity)
    ref = _sentinel_buffers(batch, heads, capacity, head_dim, mode, seed=13)
    tri = [b.clone() for b in ref]
    quantize_into_reference(key, value, slots, ref, mode)
    _run_kernel(key, value, slots, tri, mode)
    for r, t in zip(ref, tri):
        assert torch.equal(_bytes(r), _bytes(t))
    assert (tri[1][:, :, : capacity - tokens] == SENTINEL_SCALE).all()


@requires_triton
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_triton_kernel_zero_tokens_writes_nothing(mode):
    bufs = _sentinel_buffers(1, 2, 4, 64, mode, seed=14)
    before = [b.clone() for b in bufs]
    empty = torch.zeros(1, 2, 0, 64)
    _run_kernel(empty, empty, torch.zeros(0, dtype=torch.long), bufs, mode)
    for b, o in zip(bufs, before):
        assert torch.equal(_bytes(b), _bytes(o))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_quantize_into_uses_reference_on_cpu(mode, monkeypatch):
    def boom():
        raise AssertionError("the Triton kernels must not be looked up for CPU tensors")

    monkeypatch.setattr(ops, "cuda_kernels", boom)
    key, value = _special_kv(1, 4, 2, 64, torch.float32, mode, seed=15)
    slots = torch.tensor([1, 3, 0, 5])
    got = _sentinel_buffers(1, 2, 6, 64, mode, seed=16)
    expected = [b.clone() for b in got]
    quantize_into(key, value, slots, got, mode)
    quantize_into_reference(key, value, slots, expected, mode)
    for g_, e in zip(got, expected):
        assert torch.equal(_bytes(g_), _bytes(e))
    assert (got[1][:, :, slots] != SENTINEL_SCALE).all()


# ---------------------------------------------------------------------------------------------------------------
# On a CUDA GPU: the kernel natively, bf16/fp16 inputs and FP8 bit patterns included
# ---------------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("tokens", [1, 37, 1000])
def test_kernel_bytes_equal_reference(mode, dtype, head_dim, tokens):
    torch.manual_seed(tokens + head_dim)
    batch, heads, capacity = 3, 4, tokens + 16
    # [batch, tokens, heads, head_dim] viewed transposed, as transformers hands them over; a wide range of magnitudes.
    magnitudes = torch.logspace(-3, 3, tokens)[None, :, None, None]
    key = (torch.randn(batch, tokens, heads, head_dim) * magnitudes).transpose(1, 2)
    value = torch.randn(batch, heads, tokens, head_dim)
    key[0, 1, 0] = 0.0  # an all-zero token-head
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(capacity)[:tokens]
    expected = filled_buffers(batch, heads, capacity, head_dim, mode, "cpu")
    quantize_into_reference(key, value, slots, expected, mode)
    got = filled_buffers(batch, heads, capacity, head_dim, mode, "cuda")
    quantize_into_triton(key.cuda(), value.cuda(), slots.cuda(), got, mode)
    for e, g in zip(expected, got):
        g = g.cpu()
        if e.dtype == torch.float32:
            assert torch.equal(e, g)
        else:
            assert torch.equal(e.view(torch.uint8), g.view(torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Any head size, and keys and values of different head sizes (MLA)
# ---------------------------------------------------------------------------------------------------------------


def _mixed_tokens(batch, tokens, heads, head_dim, dtype, seed):
    """[batch, heads, tokens, head_dim] viewed transposed from [batch, tokens, heads, head_dim] (as transformers hands
    them over), magnitudes from 1e-3 to 1e3 across tokens, one all-zero token-head."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, heads, head_dim, generator=g) * torch.logspace(-3, 3, tokens)[None, :, None, None]
    x[0, 0, 0] = 0.0
    return x.to(dtype).transpose(1, 2)


# MLA as transformers caches it (latent 512 / rotary 64), after expansion (192 / 128), wider values than keys, and
# head dims that are not multiples of 16 (1, 3, 8, 24, 72, 100: tiles padded to a power of two).
KEY_VALUE_HEAD_DIMS = [(192, 128), (512, 64), (64, 512), (8, 24), (1, 3), (72, 100)]


def _check_key_value_head_dims(mode, dtype, key_head_dim, value_head_dim, tokens, device):
    batch, heads, capacity = 2, 3, tokens + 5
    key = _mixed_tokens(batch, tokens, heads, key_head_dim, dtype, seed=key_head_dim)
    value = _mixed_tokens(batch, tokens, heads, value_head_dim, dtype, seed=1000 + value_head_dim) * 7
    slots = torch.randperm(capacity, generator=torch.Generator().manual_seed(tokens))[:tokens]
    key_buffers = _sentinel_buffers(batch, heads, capacity, key_head_dim, mode, seed=17)
    value_buffers = _sentinel_buffers(batch, heads, capacity, value_head_dim, mode, seed=18)
    expected = [*key_buffers[:2], *value_buffers[2:]]
    got = [b.clone().to(device) for b in expected]
    quantize_into_reference(key, value, slots, expected, mode)
    quantize_into_triton(key.to(device), value.to(device), slots.to(device), got, mode)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert torch.equal(_bytes(e), _bytes(g.cpu()))
    # Each of keys and values got its own per-token-head scale, over its own channels.
    assert torch.equal(expected[1][:, :, slots], quantize_reference(key, mode)[1])
    assert torch.equal(expected[3][:, :, slots], quantize_reference(value, mode)[1])


@requires_triton
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("key_head_dim,value_head_dim", KEY_VALUE_HEAD_DIMS)
def test_triton_kernel_key_value_head_dims_differ(mode, key_head_dim, value_head_dim):
    _check_key_value_head_dims(mode, torch.float32, key_head_dim, value_head_dim, 6, "cuda" if HAS_CUDA else "cpu")


@requires_triton
def test_triton_kernel_refuses_a_head_wider_than_its_tiles():
    mode = INT8
    buffers = _sentinel_buffers(1, 1, 2, 640, mode, seed=19)
    device = "cuda" if HAS_CUDA else "cpu"
    with pytest.raises(ValueError, match="key head_dim 640, value head_dim 640; accepted: 1 to 512"):
        quantize_into_triton(torch.ones(1, 1, 1, 640, device=device), torch.ones(1, 1, 1, 640, device=device),
                             torch.zeros(1, dtype=torch.long, device=device), [b.to(device) for b in buffers], mode)
    assert (buffers[1] == SENTINEL_SCALE).all()


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("head_dim", list(range(32, 513, 16)))
def test_every_head_dim_bytes_equal_reference_on_the_gpu(mode, head_dim):
    """Every multiple of 16 from 32 to 512, bf16, a prefill-sized write and a decode-sized one."""
    for tokens in (1, 300):
        _check_key_value_head_dims(mode, torch.bfloat16, head_dim, head_dim, tokens, "cuda")


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("key_head_dim,value_head_dim", KEY_VALUE_HEAD_DIMS)
def test_key_value_head_dims_differ_on_the_gpu(mode, dtype, key_head_dim, value_head_dim):
    for tokens in (1, 1000):
        _check_key_value_head_dims(mode, dtype, key_head_dim, value_head_dim, tokens, "cuda")
