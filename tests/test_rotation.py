"""The Hadamard rotation (`hf_kvquant.rotation`) and a cache that quantizes rotated keys and values (``hadamard=True``).

The attention side (rotated query through the kernel, un-rotated output) is in test_attention.py, the Cache contract
with the rotation on in test_cache.py, its effect on a real model in test_accuracy.py.
"""

import math

import pytest
import torch

from hf_kvquant import KVQuantMode, QuantizedPerTokenHeadCache, QuantizedPerTokenHeadLayer
from hf_kvquant.ops.reference import quantize_reference
from hf_kvquant.rotation import KeyValueRotation, hadamard_matrix, layer_rotation, rotate, unrotate

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


# -- any head size; keys and values of different head sizes (MLA) --------------------------------------------------


@pytest.mark.parametrize("head_dim", [1, 3, 32, 72, 80, 112, 160, 192, 512])
def test_hadamard_matrix_of_any_head_dim_is_orthogonal_blocks(head_dim):
    r = hadamard_matrix(head_dim)
    block = head_dim & -head_dim  # the largest power of two dividing head_dim: 80 -> 16, 192 -> 64, odd -> 1
    assert torch.allclose(r @ r.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    mask = torch.block_diag(*[torch.ones(block, block, dtype=torch.bool)] * (head_dim // block))
    assert torch.equal(r[~mask], torch.zeros((~mask).sum()))
    assert torch.allclose(r[mask].abs(), torch.full((int(mask.sum()),), 1 / math.sqrt(block)))


def test_layer_rotation_is_one_matrix_or_one_per_head_dim():
    assert layer_rotation(80, 80) is hadamard_matrix(80)
    pair = layer_rotation(192, 128)
    assert isinstance(pair, KeyValueRotation) and layer_rotation(192, 128, "cpu") is pair  # built once
    assert pair.key is hadamard_matrix(192) and pair.value is hadamard_matrix(128)
    x, y = torch.randn(2, 5, 192), torch.randn(2, 5, 128)
    assert torch.equal(rotate(x, pair), x @ hadamard_matrix(192))
    assert torch.equal(rotate(y, pair), y @ hadamard_matrix(128))
    assert torch.allclose(unrotate(rotate(y, pair), pair), y, atol=1e-5)
    with pytest.raises(ValueError, match="no rotation for head_dim 64: this layer's keys have 192 channels"):
        rotate(torch.randn(3, 64), pair)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("max_cache_len", [None, 32])
def test_keys_and_values_of_different_head_dims_each_get_their_rotation(mode, max_cache_len):
    """An MLA layer (DeepSeek-V3 caches a 512-channel latent as keys and a 64-channel rotary part as values) stores
    quantize(k @ R_512) and quantize(v @ R_64), each with its own scale; what it hands over carries each tensor's own
    matrix and dequantizes back to the un-rotated tokens."""
    cache = QuantizedPerTokenHeadCache(mode=mode, hadamard=True, max_cache_len=max_cache_len)
    k, v = _tokens(2, 1, 9, 512, torch.float32, seed=5), _tokens(2, 1, 9, 64, torch.float32, seed=6)
    cache.update(k[:, :, :6], v[:, :, :6], 0)
    qk, qv = cache.layers[0].update(k[:, :, 6:], v[:, :, 6:])
    rk, rv = hadamard_matrix(512), hadamard_matrix(64)
    assert isinstance(cache.layers[0].rotation, KeyValueRotation)
    assert qk.rotation is rk and qv.rotation is rv
    for x, got, data, scale, r in ((k, qk, cache.layers[0].key_data, cache.layers[0].key_scale, rk),
                                   (v, qv, cache.layers[0].value_data, cache.layers[0].value_scale, rv)):
        for part in (slice(0, 6), slice(6, 9)):  # rotated per update, as the cache does
            q, s = quantize_reference(x[:, :, part].float() @ r, mode)
            assert torch.equal(data[:, :, part].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(scale[:, :, part], s)
        back = got.dequantize()[:, :, :9]
        assert back.shape == x.shape
        step = (scale[:, :, :9, None] * (0.5 if mode is KVQuantMode.INT8_PER_TOKEN_HEAD else 32.0)) * 1.001
        assert ((back - x).norm(dim=-1, keepdim=True) <= step * math.sqrt(x.shape[-1])).all()


def test_key_value_rotation_compiles_in_one_graph():
    """A preallocated MLA layer with the rotation, as a compiled decode step runs it: the update and hf_kvquant's
    attention (rotated query, output un-rotated by the values' matrix) trace as one graph, and give the eager
    numbers."""
    from hf_kvquant.cache import QuantizedPerTokenHeadStaticLayer
    from hf_kvquant.integration import attend_quantized

    layers = [QuantizedPerTokenHeadStaticLayer("int8", 16, hadamard=True) for _ in range(2)]
    for layer in layers:
        layer.update(_tokens(1, 1, 3, 32, torch.float32, seed=1), _tokens(1, 1, 3, 8, torch.float32, seed=2))

    def step(layer, k, v, q):
        qk, qv = layer.update(k, v)
        return attend_quantized(q, qk, qv, None)

    k, v, q = (_tokens(1, 1, 1, 32, torch.float32, 3), _tokens(1, 1, 1, 8, torch.float32, 4),
               _tokens(1, 2, 1, 32, torch.float32, 5))
    compiled = torch.compile(step, backend="eager", fullgraph=True)(layers[0], k, v, q)
    assert compiled.shape == (1, 1, 2, 8)
    assert torch.allclose(compiled, step(layers[1], k, v, q), atol=1e-6, rtol=1e-6)
