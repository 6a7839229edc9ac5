"""Tests of the INT4 reference math (eval/lib/int4_reference.py). A draft for tests/: move it there as
tests/test_int4_reference.py (and the import to wherever the module lands, e.g. hf_kvquant.ops.reference)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/ on the path: `lib.` imports

from hf_kvquant.modes import SCALE_FLOOR  # noqa: E402
from hf_kvquant.rotation import hadamard_matrix  # noqa: E402
from lib.int4_reference import (  # noqa: E402
    bytes_per_token_head,
    dequantize_int4,
    dequantize_int4_codes,
    fake_quantize,
    fake_quantize_kv,
    pack_int4,
    quantize_int4,
    quantize_int4_codes,
    quantize_int4_codes_clipped,
    unpack_int4,
)


def _x(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("head_dim", [2, 8, 64, 128, 256])
def test_shapes_and_dtypes(head_dim):
    packed, scale, zero = quantize_int4(_x(2, 3, 5, head_dim))
    assert packed.shape == (2, 3, 5, head_dim // 2) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (2, 3, 5)
    assert scale.dtype == zero.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_returns_the_dtype_asked(dtype):
    packed, scale, zero = quantize_int4(_x(4, 64).to(dtype))
    assert dequantize_int4(packed, scale, zero, dtype).dtype == dtype


def test_packing_is_split_halves():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # head_dim 32: channel j = j % 16
    packed = pack_int4(codes)
    assert packed.shape == (16,)
    for j in range(16):
        assert packed[j].item() == codes[j].item() | (codes[j + 16].item() << 4)
    assert torch.equal(packed & 0xF, codes[:16]) and torch.equal(packed >> 4, codes[16:])
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_unpack_round_trip_every_code_pair():
    lo, hi = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    codes = torch.stack([lo.flatten(), hi.flatten()], dim=-1).to(torch.uint8)  # head_dim 2, all 256 pairs
    packed = pack_int4(codes)
    assert torch.equal(packed.squeeze(-1), torch.arange(256, dtype=torch.uint8).view(16, 16).T.flatten())
    assert torch.equal(unpack_int4(packed), codes)


def test_codes_round_trip_exactly():
    """Dequantized values quantize back to the same codes, scale and zero."""
    x = _x(6, 7, 64, seed=1)
    codes, scale, zero = quantize_int4_codes(x)
    codes2, scale2, zero2 = quantize_int4_codes(dequantize_int4_codes(codes, scale, zero))
    assert torch.equal(codes2, codes)
    assert torch.equal(zero2, zero)
    torch.testing.assert_close(scale2, scale, rtol=1e-6, atol=0)


def test_range_ends_are_codes_0_and_15():
    x = _x(50, 64, seed=2)
    codes, scale, zero = quantize_int4_codes(x)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()
    assert torch.equal(zero, x.amin(-1))  # the minimum is stored exactly and reads back exactly
    assert torch.equal(dequantize_int4_codes(codes, scale, zero).amin(-1), x.amin(-1))


def test_ties_round_half_to_even():
    row = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 13.5, 14.5, 15.0, 7.0])  # scale 1, zero 0
    codes, scale, zero = quantize_int4_codes(row)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert codes.tolist() == [0, 0, 2, 2, 4, 4, 14, 14, 15, 7]


@pytest.mark.parametrize("head_dim", [8, 64, 256])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_error_bound_half_a_step(head_dim, magnitude):
    """|x - x_hat| <= scale / 2 per element, up to float32 rounding (a few ulps of the row's largest magnitude)."""
    x = _x(200, head_dim, seed=3, scale=magnitude) + magnitude  # asymmetric rows
    packed, scale, zero = quantize_int4(x)
    err = (x - dequantize_int4(packed, scale, zero)).abs()
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().amax(-1, keepdim=True)
    assert (err <= scale[..., None] / 2 + slack).all()


def test_odd_head_dim_refused():
    with pytest.raises(ValueError, match="even"):
        quantize_int4(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 7, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_confined_to_its_row(bad):
    x = _x(4, 16, seed=4)
    x[2, 5] = bad
    packed, scale, zero = quantize_int4(x)
    back = dequantize_int4(packed, scale, zero)
    assert torch.isnan(scale[2]) and torch.isnan(zero[2]) and (unpack_int4(packed)[2] == 0).all()
    assert torch.isnan(back[2]).all()
    keep = torch.tensor([0, 1, 3])
    assert torch.isfinite(back[keep]).all()
    torch.testing.assert_close(back[keep], dequantize_int4(*quantize_int4(x[keep])), rtol=0, atol=0)


def test_range_overflow_reads_nan():
    x = torch.tensor([[-3e38, 3e38, 0.0, 1.0]])
    assert torch.isnan(dequantize_int4(*quantize_int4(x))).all()


def test_all_equal_rows_read_back_exactly():
    x = torch.tensor([[2.5] * 8, [-1e-8] * 8, [0.0] * 8, [1e30] * 8])
    packed, scale, zero = quantize_int4(x)
    assert (scale == torch.tensor(SCALE_FLOOR)).all()
    assert (unpack_int4(packed) == 0).all()
    assert torch.equal(dequantize_int4(packed, scale, zero), x)


def test_tiny_range_uses_the_floor():
    x = torch.linspace(0, 1e-6, 8)[None]  # range / 15 below SCALE_FLOOR
    packed, scale, zero = quantize_int4(x)
    assert scale.item() == torch.tensor(SCALE_FLOOR).item()
    assert ((x - dequantize_int4(packed, scale, zero)).abs() <= SCALE_FLOOR / 2 + 1e-12).all()


def test_negative_zero_is_stored_as_positive_zero():
    x = torch.full((2, 8), -0.0)
    packed, scale, zero = quantize_int4(x)
    assert not torch.signbit(zero).any()
    back = dequantize_int4(packed, scale, zero)
    assert (back == 0).all() and not torch.signbit(back).any()


def test_rows_are_independent():
    x = _x(5, 32, seed=5)
    whole = quantize_int4(x)
    for i in range(5):
        one = quantize_int4(x[i : i + 1])
        for a, b in zip(whole, one, strict=True):
            assert torch.equal(a[i : i + 1], b)


def test_fake_quantize_with_rotation():
    x = _x(2, 3, 10, 64, seed=6)
    r = hadamard_matrix(64)
    expected = dequantize_int4(*quantize_int4(x @ r)) @ r.T
    torch.testing.assert_close(fake_quantize(x, "int4", r), expected, rtol=0, atol=0)
    k, v = fake_quantize_kv(x, x, "int8", "int4", r)
    torch.testing.assert_close(v, expected, rtol=0, atol=0)
    assert (k - x).abs().max() < (v - x).abs().max()  # INT8 keys are finer than INT4 values
    assert fake_quantize(x, "none") is x
    with pytest.raises(ValueError):
        fake_quantize(x, "int3")


@pytest.mark.parametrize(
    ("head_dim", "int4_budget", "k8v4_budget"), [(64, 0.32, 0.43), (128, 0.29, 0.41)]
)
def test_byte_budget(head_dim, int4_budget, k8v4_budget):
    bf16 = 2 * 2 * head_dim
    assert bytes_per_token_head(head_dim, "int4", "int4") / bf16 <= int4_budget
    assert bytes_per_token_head(head_dim, "int8", "int4") / bf16 <= k8v4_budget


@pytest.mark.parametrize("head_dim", [64, 256])
def test_clipped_range_never_worse_in_squared_error(head_dim):
    x = _x(300, head_dim, seed=7) @ hadamard_matrix(head_dim)
    plain = dequantize_int4_codes(*quantize_int4_codes(x))
    codes, scale, zero = quantize_int4_codes_clipped(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    clipped = dequantize_int4_codes(codes, scale, zero)
    e_plain = (plain - x).square().sum(-1)
    e_clip = (clipped - x).square().sum(-1)
    assert (e_clip <= e_plain * (1 + 1e-5)).all()
    assert e_clip.sum() < e_plain.sum()  # it does clip some rows
    # inside its chosen range every element is within half a step
    inside = (x >= zero[:, None]) & (x <= zero[:, None] + 15 * scale[:, None])
    err = (clipped - x).abs()
    assert (err[inside] <= (scale[:, None] / 2 * (1 + 1e-5) + 1e-6).expand_as(x)[inside]).all()


def test_clipped_is_the_variant_measured():
    from lib.int4_variants import Rounding, round_int4

    x = _x(4, 3, 50, 64, seed=8)
    ours = dequantize_int4_codes(*quantize_int4_codes_clipped(x))
    assert torch.equal(ours, round_int4(x, Rounding(clip="grid")))


def test_clipped_edge_cases():
    x = _x(4, 16, seed=9)
    x[1, 3] = float("nan")
    x[2] = 1.25
    x[3] = -0.0
    packed, scale, zero = quantize_int4(x, clip=True)
    back = dequantize_int4(packed, scale, zero)
    assert torch.isnan(back[1]).all() and torch.isfinite(back[0]).all()
    assert torch.equal(back[2], x[2])
    assert (back[3] == 0).all() and not torch.signbit(zero[3])
    with pytest.raises(ValueError, match="even"):
        quantize_int4(torch.zeros(2, 3), clip=True)
