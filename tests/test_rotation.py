"""The Hadamard rotation (`hf_kvquant.rotation`) and a cache that quantizes rotated keys and values (``hadamard=True``).

The attention side (rotated query through the kernel, un-rotated output) is in test_attention.py, the Cache contract
with the rotation on in test_cache.py, its effect on a real model in test_accuracy.py.
"""

import math

import pytest
import torch

from hf_kvquant import KVQuantMode, QuantizedPerTokenHeadCache, QuantizedPerTokenHeadLayer
from hf_kvquant.ops.reference import quantize_reference
from hf_kvquant.rotation import hadamard_matrix, rotate, unrotate

MODES = list(KVQuantMode)
MODE_IDS = [m.value for m in MODES]
HEAD_DIMS = [64, 96, 128, 256]
# Output rounding of a dequantized copy, relative to the token-head's norm.
DTYPE_EPS = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_hadamard_matrix_is_orthogonal(head_dim):
    r = hadamard_matrix(head_dim)
    assert r.shape == (head_dim, head_dim) and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    assert torch.allclose(r.T @ r, torch.eye(head_dim), atol=1e-6, rtol=0)
    # Hadamard blocks: every entry of a block is +-1/sqrt(block), everything outside the blocks is zero.
    block = 32 if head_dim == 96 else head_dim
    mask = torch.block_diag(*[torch.ones(block, block, dtype=torch.bool)] * (head_dim // block))
    assert torch.equal(r[~mask], torch.zeros((~mask).sum()))
    assert torch.allclose(r[mask].abs(), torch.full((int(mask.sum()),), 1 / math.sqrt(block)))
    exact = hadamard_matrix(head_dim, dtype=torch.float64)
    assert torch.allclose(exact @ exact.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-12, rtol=0)


def test_hadamard_matrix_built_once_per_head_dim_device_dtype():
    r = hadamard_matrix(128)
    assert hadamard_matrix(128, "cpu") is r and hadamard_matrix(128, torch.device("cpu"), torch.float32) is r
    assert hadamard_matrix(128, dtype=torch.float64) is not r
    assert hadamard_matrix(64) is not r


@pytest.mark.parametrize("bad", [0, -64, 64.0])
def test_hadamard_matrix_rejects_bad_head_dim(bad):
    with pytest.raises(ValueError, match="head_dim"):
        hadamard_matrix(bad)


def test_rotate_and_unrotate_are_inverse():
    x = torch.randn(2, 3, 5, 96, dtype=torch.bfloat16)
    r = hadamard_matrix(96)
    assert rotate(x, None) is x and unrotate(x, None) is x
    back = unrotate(rotate(x, r), r)
    assert back.dtype == torch.float32
    assert torch.allclose(back, x.float(), atol=1e-5)


# -- quantize with the rotation, dequantize without it ----------------------------------------------------------


def _tokens(batch, heads, n, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, n, head_dim, generator=g) * torch.exp(torch.randn(batch, heads, n, 1, generator=g))
    x[..., 1] *= 30  # outlier channels, as in real keys
    x[..., head_dim // 2] -= 10
    return x.to(dtype)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rotated_roundtrip_within_the_mode_tolerance(mode, dtype, head_dim):
    """The cache stores exactly quantize(x @ R); dequantizing gives x back within the mode's error bound, measured
    in the rotated space (where the scale applies) and carried back unchanged by the orthogonal R."""
    x = _tokens(2, 3, 17, head_dim, dtype, seed=head_dim)
    layer = QuantizedPerTokenHeadLayer(mode, hadamard=True)
    k, v = layer.update(x, -x)
    r = hadamard_matrix(head_dim)
    assert layer.rotation is r and k.rotation is r and v.rotation is r
    q, scale = quantize_reference(x.float() @ r, mode)
    assert torch.equal(layer.key_data[:, :, :17].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.key_scale[:, :, :17], scale)

    back = k.dequantize()
    assert back.dtype == dtype and back.shape == x.shape
    error = (back.float() - x.float()).norm(dim=-1)
    norm = x.float().norm(dim=-1)
    if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        bound = 0.5 * scale * math.sqrt(head_dim)  # half a step per channel
    else:
        bound = 2**-4 * norm + scale * 2**-10 * math.sqrt(head_dim)  # 3 mantissa bits; subnormal steps
    bound = bound * 1.0001 + DTYPE_EPS[dtype] * norm + 1e-6
    assert (error <= bound).all(), (error / bound).max()
    assert torch.allclose(v.dequantize().float(), -back.float(), atol=DTYPE_EPS[dtype] * float(norm.max()))


def test_rotation_shrinks_int8_error_on_outlier_channels():
    """Why the option exists: with a few large channels per token-head the plain scale wastes most codes; rotated,
    the same INT8 codes resolve the token-head several times more finely."""
    x = _tokens(1, 4, 64, 128, torch.float32, seed=3)
    errors = {}
    for hadamard in (False, True):
        layer = QuantizedPerTokenHeadLayer(KVQuantMode.INT8_PER_TOKEN_HEAD, hadamard=hadamard)
        k, _ = layer.update(x, x)
        errors[hadamard] = float((k.dequantize() - x).norm() / x.norm())
    assert errors[True] < errors[False] / 3, errors


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_hadamard_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="hadamard"):
        QuantizedPerTokenHeadCache(hadamard=bad)
    with pytest.raises(ValueError, match="hadamard"):
        QuantizedPerTokenHeadLayer("int8_per_token_head", hadamard=bad)


def test_repr_names_the_rotation():
    cache = QuantizedPerTokenHeadCache(mode="fp8_per_token_head", hadamard=True)
    cache.update(*_tokens(1, 1, 2, 64, torch.float32).expand(2, -1, -1, -1, -1), 0)
    assert "hadamard=True" in repr(cache) and "hadamard=True" in repr(cache.layers[0])
    assert "hadamard" not in repr(QuantizedPerTokenHeadCache())
