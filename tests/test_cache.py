"""QuantizedPerTokenHeadCache / QuantizedPerTokenHeadLayer on synthetic tensors (CPU, reference quantization path).

The model of what the cache should hold is transformers' own DynamicLayer / DynamicSlidingWindowLayer fed the very
same updates: what `update` returns must be, exactly, the quantize -> dequantize of what those return. With
``hadamard=True`` the cache quantizes ``x @ R`` and un-rotates what it hands back; the tests that run both feed the
transformers twin the rotated tokens and un-rotate the expectation the same way (see `store` and `readback`).
"""

import copy

import pytest
import torch
from conftest import as_bytes, assert_same_state, gemma_config, llama_config, requires_cuda, state
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import hf_kvquant.cache as cache_mod
from hf_kvquant import (
    ATTENTION_NAME,
    KVQuantMode,
    QuantizedKV,
    QuantizedPerTokenHeadCache,
    QuantizedPerTokenHeadLayer,
    QuantizedPerTokenHeadSlidingWindowLayer,
    kv_cache_nbytes,
)
from hf_kvquant.ops.reference import dequantize, quantize_reference
from hf_kvquant.rotation import hadamard_matrix, rotate, unrotate

MODES = list(KVQuantMode)
MODE_IDS = [m.value for m in MODES]
hadamard_options = pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def deq(x: torch.Tensor, mode: KVQuantMode) -> torch.Tensor:
    """What the cache should hand back for full-precision tokens ``x``: their quantize -> dequantize."""
    q, s = quantize_reference(x, mode)
    return dequantize(q, s, x.dtype)


def store(x: torch.Tensor, hadamard: bool) -> torch.Tensor:
    """The tokens ``x`` of one update as a cache with or without ``hadamard`` quantizes them: ``x @ R`` (float32) or
    ``x``. Rotate per update, as the cache does: a matmul's rows can differ in the last bit with the number of rows."""
    return rotate(x, hadamard_matrix(x.shape[-1])) if hadamard else x


def readback(stored: torch.Tensor, mode: KVQuantMode, dtype: torch.dtype, hadamard: bool) -> torch.Tensor:
    """What the cache hands back (dequantized, un-rotated, in ``dtype``) for tokens it quantized as ``stored``."""
    if not hadamard:
        return deq(stored, mode)
    q, s = quantize_reference(stored, mode)
    return unrotate(dequantize(q, s, torch.float32), hadamard_matrix(stored.shape[-1])).to(dtype)


class Tokens:
    """Deterministic random key/value tokens of mixed magnitudes."""

    def __init__(self, batch=2, heads=3, head_dim=64, dtype=torch.float32, seed=0):
        self.shape = (batch, heads, head_dim)
        self.dtype = dtype
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, n, batch=None):
        b, h, d = self.shape
        b = b if batch is None else batch
        mags = torch.exp(torch.randn(b, h, n, 1, generator=self.g) * 2)
        k = torch.randn(b, h, n, d, generator=self.g) * mags
        v = torch.randn(b, h, n, d, generator=self.g) * mags.flip(2) + 0.5
        return k.to(self.dtype), v.to(self.dtype)


def as_tensors(kv):
    k, v = kv
    if isinstance(k, QuantizedKV):
        return k.dequantize(), v.dequantize()
    return k, v


class TwinLayer:
    """Our layer beside transformers' dynamic layer of the same kind; every operation goes to both and is checked."""

    def __init__(self, mode, sliding_window=None, hadamard=False):
        self.mode = KVQuantMode.parse(mode)
        self.hadamard = hadamard
        if sliding_window is None:
            self.ours = QuantizedPerTokenHeadLayer(mode, hadamard=hadamard)
        else:
            self.ours = QuantizedPerTokenHeadSlidingWindowLayer(mode, sliding_window, hadamard=hadamard)
        self.hf = DynamicLayer() if sliding_window is None else DynamicSlidingWindowLayer(sliding_window)

    def check_mask_sizes(self, *query_lengths):
        for q in query_lengths:
            assert self.ours.get_mask_sizes(q) == self.hf.get_mask_sizes(q), q

    def update(self, k, v):
        n = k.shape[-2]
        self.check_mask_sizes(1, n, n + 3)
        kv_length, _ = self.ours.get_mask_sizes(n)
        hk, hv = self.hf.update(store(k, self.hadamard), store(v, self.hadamard))
        qk, qv = self.ours.update(k, v)
        assert isinstance(qk, QuantizedKV) and isinstance(qv, QuantizedKV)
        assert qk.shape == qv.shape == (k.shape[0], k.shape[1], kv_length, k.shape[3])
        rotation = hadamard_matrix(k.shape[-1]) if self.hadamard else None
        assert qk.rotation is rotation and qv.rotation is rotation
        ok, ov = qk.dequantize(), qv.dequantize()
        assert ok.dtype == k.dtype
        assert ok.shape[-2] == kv_length == hk.shape[-2]
        assert torch.equal(ok, readback(hk, self.mode, k.dtype, self.hadamard))
        assert torch.equal(ov, readback(hv, self.mode, v.dtype, self.hadamard))
        assert self.ours.get_seq_length() == self.hf.get_seq_length()
        self.check_layout()
        return ok, ov

    def apply(self, name, *args):
        getattr(self.ours, name)(*args)
        getattr(self.hf, name)(*args)
        assert self.ours.get_seq_length() == self.hf.get_seq_length()
        self.check_layout()

    def check_layout(self):
        """Value codes token-minor with 16-byte aligned rows (what the attention kernel reads fastest) where the window
        starts at slot 0, head_dim-minor in the sliding layer (whose window start moves); key codes head_dim-minor;
        whatever the operation (growth, compaction, reorder, batch selection) that made the buffers."""
        if self.ours.is_initialized and self.ours.capacity > 1:
            values = self.ours.value_data
            if self.ours.is_sliding:
                assert values.stride(-1) == 1
            else:
                assert values.stride(2) == 1 and values.stride(3) % 16 == 0
            assert self.ours.key_data.stride(-1) == 1


# ---------------------------------------------------------------------------------------------------------------
# what update returns
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@hadamard_options
def test_update_without_config_returns_dequantized_tensors(mode, dtype, head_dim, hadamard):
    tokens = Tokens(batch=2, heads=3, head_dim=head_dim, dtype=dtype, seed=1)
    cache = QuantizedPerTokenHeadCache(mode=mode.value, hadamard=hadamard)
    assert not cache.hands_over_quantized
    written_k, written_v, stored_k, stored_v = [[], []], [[], []], [[], []], [[], []]
    for n in (5, 1, 1, 3, 1):
        for layer_idx in (0, 1):
            k, v = tokens(n)
            written_k[layer_idx].append(k)
            written_v[layer_idx].append(v)
            stored_k[layer_idx].append(store(k, hadamard))
            stored_v[layer_idx].append(store(v, hadamard))
            ok, ov = cache.update(k, v, layer_idx)
            assert type(ok) is torch.Tensor and type(ov) is torch.Tensor
            total = sum(x.shape[-2] for x in written_k[layer_idx])
            assert ok.shape == ov.shape == (2, 3, total, head_dim)
            assert ok.dtype == ov.dtype == dtype
            assert torch.equal(ok, readback(torch.cat(stored_k[layer_idx], dim=-2), mode, dtype, hadamard))
            assert torch.equal(ov, readback(torch.cat(stored_v[layer_idx], dim=-2), mode, dtype, hadamard))
            assert cache.get_seq_length(layer_idx) == total
    assert len(cache.layers) == 2
    assert all(isinstance(layer, QuantizedPerTokenHeadLayer) for layer in cache.layers)
    # quantization actually happened: the tokens are not handed back verbatim
    assert not torch.equal(ok, torch.cat(written_k[1], dim=-2))
    if hadamard:
        # the plain tensors are un-rotated: close to what was written, as without rotation (tolerances of the modes)
        k = torch.cat(written_k[1], dim=-2).float()
        limit = 0.02 if mode is KVQuantMode.INT8_PER_TOKEN_HEAD else 0.1
        assert (ok.float() - k).norm() <= limit * k.norm()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@hadamard_options
def test_update_with_hf_kvquant_attention_returns_quantized_views(mode, hadamard):
    config = llama_config(layers=2, attn=ATTENTION_NAME)
    quantized = QuantizedPerTokenHeadCache(config=config, mode=mode, hadamard=hadamard)
    plain = QuantizedPerTokenHeadCache(mode=mode, hadamard=hadamard)
    assert quantized.hands_over_quantized and not plain.hands_over_quantized
    assert quantized.config is config
    tokens = Tokens(batch=2, heads=1, head_dim=64, seed=2)
    total = 0
    for n in (6, 1, 2, 1):
        total += n
        for layer_idx in range(2):
            k, v = tokens(n)
            qk, qv = quantized.update(k, v, layer_idx)
            pk, pv = plain.update(k, v, layer_idx)
            assert isinstance(qk, QuantizedKV) and isinstance(qv, QuantizedKV)
            layer = quantized.layers[layer_idx]
            # the cache's own buffers, not copies
            assert qk.data is layer.key_data and qk.scale is layer.key_scale
            assert qv.data is layer.value_data and qv.scale is layer.value_scale
            assert qk.mode is mode and qk.dtype == torch.float32
            assert qk.data.dtype == mode.storage_dtype and qk.scale.dtype == torch.float32
            assert qk.shape == qv.shape == torch.Size((2, 1, total, 64))
            assert qk.end - qk.start == total
            assert qk.device == k.device
            assert qk.rotation is qv.rotation is (hadamard_matrix(64) if hadamard else None)
            assert torch.equal(qk.dequantize(), pk)
            assert torch.equal(qv.dequantize(), pv)


def test_other_attention_implementations_get_tensors():
    for attn in ("sdpa", "eager"):
        cache = QuantizedPerTokenHeadCache(config=llama_config(layers=1, attn=attn))
        assert not cache.hands_over_quantized
        k, v = Tokens(batch=1, heads=1)(3)
        ok, ov = cache.update(k, v, 0)
        assert type(ok) is torch.Tensor and torch.equal(ok, deq(k, cache.mode))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_update_accepts_transposed_inputs(mode):
    # transformers hands over [B, T, H, D] projections transposed to [B, H, T, D]: not contiguous.
    g = torch.Generator().manual_seed(27)
    contiguous = QuantizedPerTokenHeadCache(mode=mode)
    transposed = QuantizedPerTokenHeadCache(mode=mode)
    for n in (4, 1, 2):
        k = torch.randn(2, n, 3, 64, generator=g)
        v = torch.randn(2, n, 3, 64, generator=g) * 10
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        a = contiguous.update(kt.contiguous(), vt.contiguous(), 0)
        b = transposed.update(kt, vt, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for t, u in zip(contiguous.layers[0].buffers, transposed.layers[0].buffers):
        assert torch.equal(as_bytes(t), as_bytes(u))


def test_quantized_kv_shape_and_dequantize_window():
    data = torch.randint(-127, 128, (2, 3, 10, 64), dtype=torch.int8)
    scale = torch.rand(2, 3, 10)
    kv = QuantizedKV(data, scale, 3, 8, KVQuantMode.INT8_PER_TOKEN_HEAD, torch.bfloat16)
    assert kv.shape == torch.Size((2, 3, 5, 64))
    out = kv.dequantize()
    assert out.dtype == torch.bfloat16 and out.shape == kv.shape
    assert torch.equal(out, (data[:, :, 3:8].float() * scale[:, :, 3:8, None]).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# sequence length and mask sizes, against transformers' dynamic layers
# ---------------------------------------------------------------------------------------------------------------

UPDATE_PLANS = {
    "prefill_then_decode": [5] + [1] * 12,
    "long_prefill": [11] + [1] * 9 + [2, 1],
    "chunked_prefill": [3, 3, 3, 7, 1, 1, 4, 1, 1, 1],
    "decode_from_one": [1] * 15,
}


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("sliding_window", [None, 2, 4, 7])
@pytest.mark.parametrize("plan", list(UPDATE_PLANS))
@hadamard_options
def test_layer_matches_transformers_dynamic_layers(mode, sliding_window, plan, hadamard):
    twin = TwinLayer(mode, sliding_window=sliding_window, hadamard=hadamard)
    tokens = Tokens(batch=2, heads=2, seed=3)
    assert twin.ours.get_seq_length() == 0
    twin.check_mask_sizes(1, 5)
    for n in UPDATE_PLANS[plan]:
        twin.update(*tokens(n))
    assert twin.ours.is_sliding == (sliding_window is not None)
    assert twin.ours.get_max_length() == twin.hf.get_max_length()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@hadamard_options
def test_cache_matches_dynamic_cache_on_hybrid_config(mode, hadamard):
    config = gemma_config(["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4)
    ours = QuantizedPerTokenHeadCache(config=config, mode=mode, hadamard=hadamard)
    hf = DynamicCache(config=config)
    assert ours.is_sliding == hf.is_sliding == [True, False, True]
    tokens = Tokens(batch=1, heads=1, seed=4)
    for n in (9, 1, 1, 1, 3, 1, 1, 1, 1, 1):
        for layer_idx in range(3):
            for q in (1, n):
                assert ours.get_mask_sizes(q, layer_idx) == hf.get_mask_sizes(q, layer_idx)
            kv_length, _ = ours.get_mask_sizes(n, layer_idx)
            k, v = tokens(n)
            ok, ov = ours.update(k, v, layer_idx)
            hk, hv = hf.update(store(k, hadamard), store(v, hadamard), layer_idx)
            assert ok.shape[-2] == kv_length
            assert torch.equal(ok, readback(hk, ours.mode, k.dtype, hadamard))
            assert torch.equal(ov, readback(hv, ours.mode, v.dtype, hadamard))
            assert ours.get_seq_length(layer_idx) == hf.get_seq_length(layer_idx)
    assert ours.get_max_length() == hf.get_max_length()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_sliding_layer_returns_last_kv_length_tokens_written(mode):
    window = 5
    layer = QuantizedPerTokenHeadSlidingWindowLayer(mode, window)
    tokens = Tokens(batch=1, heads=2, seed=5)
    all_k, all_v = [], []
    for n in [12, 1, 1, 2, 1, 6] + [1] * 150:
        kv_length, kv_offset = layer.get_mask_sizes(n)
        k, v = tokens(n)
        all_k.append(k)
        all_v.append(v)
        ok, ov = as_tensors(layer.update(k, v))
        seen_k, seen_v = torch.cat(all_k, -2), torch.cat(all_v, -2)
        assert kv_length == min(seen_k.shape[-2], window - 1 + n)
        assert kv_offset == max(seen_k.shape[-2] - n - window + 1, 0)
        assert torch.equal(ok, deq(seen_k[:, :, -kv_length:], layer.mode))
        assert torch.equal(ov, deq(seen_v[:, :, -kv_length:], layer.mode))
        # a sliding layer keeps only what the window needs, plus a bounded slack
        assert layer.stored <= window - 1 + n + 128
        assert layer.capacity <= 256


def test_long_prefill_on_sliding_layer_gives_memory_back():
    layer = QuantizedPerTokenHeadSlidingWindowLayer("int8_per_token_head", 8)
    k, v = Tokens(batch=1, heads=1, seed=6)(1000)
    ok, ov = as_tensors(layer.update(k, v))
    assert ok.shape[-2] == 1000  # the whole prompt attends
    assert torch.equal(ok, deq(k, layer.mode))
    assert layer.capacity < 200  # but only the window is kept
    assert layer.stored == 7
    k2, v2 = Tokens(batch=1, heads=1, seed=7)(1)
    ok, _ = as_tensors(layer.update(k2, v2))
    assert torch.equal(ok, deq(torch.cat([k[:, :, -7:], k2], -2), layer.mode))


# ---------------------------------------------------------------------------------------------------------------
# growth and preallocation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, batch, heads, prefill", [(MODES[0], 1, 1, 5), (MODES[1], 2, 2, 37)], ids=["int8", "fp8"]
)
def test_growth_keeps_contents_and_reallocates_rarely(mode, batch, heads, prefill):
    steps = 2000
    layer = QuantizedPerTokenHeadLayer(mode)
    tokens = Tokens(batch=batch, heads=heads, seed=8)
    expected_k = torch.empty(batch, heads, prefill + steps, 64)
    expected_v = torch.empty_like(expected_k)
    k, v = tokens(prefill)
    expected_k[:, :, :prefill], expected_v[:, :, :prefill] = deq(k, mode), deq(v, mode)
    qk, qv = layer.update(k, v)
    ptrs = [layer.key_data.data_ptr()]
    grow_steps = []
    for step in range(steps):
        k, v = tokens(1)
        n = prefill + step + 1
        expected_k[:, :, n - 1 : n], expected_v[:, :, n - 1 : n] = deq(k, mode), deq(v, mode)
        qk, qv = layer.update(k, v)
        if layer.key_data.data_ptr() != ptrs[-1]:
            ptrs.append(layer.key_data.data_ptr())
            grow_steps.append(step)
        assert layer.capacity >= n
        # held memory stays close to the used memory
        assert layer.capacity - n <= max(64, n // 64) + 16
        if step % 7 == 0 or step in grow_steps[-1:] or step == steps - 1:
            assert torch.equal(qk.dequantize(), expected_k[:, :, :n])
            assert torch.equal(qv.dequantize(), expected_v[:, :, :n])
    assert layer.get_seq_length() == prefill + steps
    assert 1 <= len(grow_steps) < 60
    assert len(set(ptrs)) < 60
    # never a reallocation at consecutive steps: growth is in steps of >= 64 tokens
    assert min(b - a for a, b in zip(grow_steps, grow_steps[1:])) >= 48


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@hadamard_options
def test_sliding_layer_decode_reuses_its_buffer(mode, hadamard):
    twin = TwinLayer(mode, sliding_window=8, hadamard=hadamard)
    tokens = Tokens(batch=1, heads=2, seed=9)
    twin.update(*tokens(3))
    ptrs = {twin.ours.key_data.data_ptr()}
    for _ in range(600):
        twin.update(*tokens(1))
        ptrs.add(twin.ours.key_data.data_ptr())
    assert len(ptrs) <= 2
    assert twin.ours.capacity <= 128


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_max_cache_len_preallocates_and_never_grows(mode):
    max_len = 40
    cache = QuantizedPerTokenHeadCache(mode=mode, max_cache_len=max_len)
    tokens = Tokens(batch=2, heads=2, seed=10)
    written_k, written_v = [], []
    k, v = tokens(7)
    written_k.append(k)
    written_v.append(v)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.capacity == max_len
    assert layer.get_max_length() == max_len
    ptrs = [t.data_ptr() for t in layer.buffers]
    nbytes = cache.nbytes
    value_slots = -(-max_len // 16) * 16  # token-minor value rows padded to 16 slots
    # batch 2 x 2 heads: key codes, value codes (1 byte each, 64 per slot), two float32 scales per slot
    assert nbytes == 2 * 2 * (max_len * 64 + value_slots * 64 + 2 * max_len * 4)
    for n in [1] * 21 + [5, 7]:  # exactly max_len tokens in all
        k, v = tokens(n)
        written_k.append(k)
        written_v.append(v)
        ok, ov = cache.update(k, v, 0)
        assert [t.data_ptr() for t in layer.buffers] == ptrs
        assert layer.capacity == max_len and cache.nbytes == nbytes
    assert cache.get_seq_length() == max_len
    assert torch.equal(ok, deq(torch.cat(written_k, -2), cache.mode))
    assert torch.equal(ov, deq(torch.cat(written_v, -2), cache.mode))
    before = state(cache)
    for n in (1, 3):
        with pytest.raises(ValueError, match="max_cache_len"):
            cache.update(*tokens(n), 0)
        assert_same_state(before, state(cache))
    # still usable after a crop makes room
    cache.crop(-2)
    k, v = tokens(2)
    ok, _ = cache.update(k, v, 0)
    expected = torch.cat([torch.cat(written_k, -2)[:, :, :38], k], -2)
    assert torch.equal(ok, deq(expected, cache.mode))
    assert [t.data_ptr() for t in layer.buffers] == ptrs


def test_max_cache_len_larger_than_first_update_too_big_raises_without_allocating():
    cache = QuantizedPerTokenHeadCache(max_cache_len=4)
    with pytest.raises(ValueError, match="max_cache_len"):
        cache.update(*Tokens(batch=1, heads=1)(5), 0)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, "16"])
def test_invalid_max_cache_len(bad):
    with pytest.raises(ValueError, match="max_cache_len"):
        QuantizedPerTokenHeadCache(max_cache_len=bad)


# ---------------------------------------------------------------------------------------------------------------
# crop
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@hadamard_options
def test_crop_full_layer(mode, hadamard):
    twin = TwinLayer(mode, hadamard=hadamard)
    tokens = Tokens(batch=2, heads=2, seed=11)
    twin.update(*tokens(10))
    twin.update(*tokens(1))
    twin.apply("crop", -3)
    assert twin.ours.get_seq_length() == 8
    twin.check_mask_sizes(1, 4)
    twin.update(*tokens(4))
    twin.apply("crop", -1)
    twin.update(*tokens(1))
    twin.apply("crop", -11)
    twin.update(*tokens(2))
    assert twin.ours.get_seq_length() == 3


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_crop_zero_is_a_no_op_and_positive_raises(mode):
    cache = QuantizedPerTokenHeadCache(mode=mode)
    tokens = Tokens(batch=1, heads=2, seed=12)
    k, v = tokens(6)
    cache.update(k, v, 0)
    before = state(cache)
    cache.crop(0)
    assert_same_state(before, state(cache))
    for bad in (1, 4, 100):
        with pytest.raises(ValueError):
            cache.crop(bad)
        assert_same_state(before, state(cache))
    with pytest.raises(ValueError):
        cache.crop(-7)  # more than it holds
    assert_same_state(before, state(cache))
    k2, v2 = tokens(1)
    ok, _ = cache.update(k2, v2, 0)
    assert torch.equal(ok, deq(torch.cat([k, k2], -2), cache.mode))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("prefill", [3, 6, 20])
@hadamard_options
def test_sliding_crop_with_past_recording_matches_transformers(mode, prefill, hadamard):
    # Assisted decoding: propose candidates, verify, crop the rejected ones; past the window.
    window = 4
    twin = TwinLayer(mode, sliding_window=window, hadamard=hadamard)
    tokens = Tokens(batch=2, heads=1, seed=13)
    twin.update(*tokens(prefill))
    twin.apply("activate_past_recording")
    for candidates, rejected in [(3, 2), (5, 5), (4, 0), (2, 1), (6, 3), (1, 1), (5, 4)]:
        twin.update(*tokens(candidates))
        twin.apply("crop", -rejected)
        twin.check_mask_sizes(1, 2)
        twin.update(*tokens(1))  # the token the target model produced
        assert twin.ours.get_seq_length() > window
    # several forwards in a row without crop, then one crop
    twin.update(*tokens(2))
    twin.update(*tokens(3))
    twin.apply("crop", -4)
    twin.update(*tokens(1))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_sliding_recording_survives_buffer_compactions(mode):
    # Long assisted decoding on a small window: the buffer fills up and is compacted many times while recording;
    # every rollback must still find the tokens before the cropped ones.
    window = 4
    twin = TwinLayer(mode, sliding_window=window)
    tokens = Tokens(batch=1, heads=1, seed=24)
    twin.update(*tokens(2))
    twin.apply("activate_past_recording")
    g = torch.Generator().manual_seed(25)
    first_ptr, ptrs = twin.ours.key_data.data_ptr(), set()
    for _ in range(120):
        candidates = int(torch.randint(1, 7, (1,), generator=g))
        rejected = int(torch.randint(0, candidates + 1, (1,), generator=g))
        twin.update(*tokens(candidates))
        twin.apply("crop", -rejected)
        twin.update(*tokens(1))
        ptrs.add(twin.ours.key_data.data_ptr())
    assert twin.ours.get_seq_length() > 2 * twin.ours.capacity  # compactions did happen
    assert twin.ours.capacity <= 128 and len(ptrs | {first_ptr}) <= 3


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_sliding_recording_many_forwards_then_one_long_crop(mode):
    # Several forwards in a row without a crop (an assistant's own generate): all must stay recoverable.
    window = 4
    twin = TwinLayer(mode, sliding_window=window)
    tokens = Tokens(batch=1, heads=2, seed=26)
    twin.update(*tokens(6))
    twin.apply("activate_past_recording")
    for _ in range(150):
        twin.update(*tokens(1))
    twin.apply("crop", -140)
    twin.check_mask_sizes(1, 3)
    twin.update(*tokens(3))
    twin.update(*tokens(1))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_sliding_crop_without_recording_beyond_what_is_held_raises(mode):
    window = 4
    layer = QuantizedPerTokenHeadSlidingWindowLayer(mode, window)
    tokens = Tokens(batch=1, heads=1, seed=14)
    layer.update(*tokens(300))  # a long prefill: only the window - 1 last tokens are kept
    assert layer.stored == window - 1
    before = state(layer)
    for remove in (1, 2, 3):
        with pytest.raises(RuntimeError):
            layer.crop(-remove)
        assert_same_state(before, state(layer))
    layer.crop(0)
    assert_same_state(before, state(layer))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_sliding_crop_without_recording_of_tokens_still_held(mode):
    # Within the slack the layer still holds, a crop is exact even without recording.
    window = 4
    layer = QuantizedPerTokenHeadSlidingWindowLayer(mode, window)
    tokens = Tokens(batch=1, heads=1, seed=15)
    written = []
    for n in (2, 1, 1, 1, 1, 1):
        k, v = tokens(n)
        written.append(k)
        layer.update(k, v)
    assert layer.stored == 7  # dropped lazily: nothing forced a compaction yet
    layer.crop(-2)
    k, v = tokens(1)
    ok, _ = as_tensors(layer.update(k, v))
    seen = torch.cat(written, -2)[:, :, :-2]
    assert torch.equal(ok, deq(torch.cat([seen[:, :, -(window - 1):], k], -2), layer.mode))
    assert layer.get_seq_length() == seen.shape[-2] + 1


# ---------------------------------------------------------------------------------------------------------------
# batch operations, reset, deepcopy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("sliding_window", [None, 3])
@hadamard_options
def test_reorder_cache_in_place(mode, sliding_window, hadamard):
    twin = TwinLayer(mode, sliding_window=sliding_window, hadamard=hadamard)
    tokens = Tokens(batch=3, heads=2, seed=16)
    twin.update(*tokens(5))
    twin.update(*tokens(1))
    ptrs = [t.data_ptr() for t in twin.ours.buffers]
    for beam_idx in ([2, 0, 0], [1, 2, 0], [0, 0, 0]):
        twin.apply("reorder_cache", torch.tensor(beam_idx))
        assert [t.data_ptr() for t in twin.ours.buffers] == ptrs
        twin.update(*tokens(1))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("sliding_window", [None, 3])
@hadamard_options
def test_batch_repeat_interleave_and_select(mode, sliding_window, hadamard):
    twin = TwinLayer(mode, sliding_window=sliding_window, hadamard=hadamard)
    tokens = Tokens(batch=2, heads=2, seed=17)
    twin.update(*tokens(4))
    twin.update(*tokens(1))
    twin.apply("batch_repeat_interleave", 3)
    assert twin.ours.key_data.shape[0] == 6 and twin.ours.key_scale.shape[0] == 6
    twin.update(*tokens(1, batch=6))
    twin.apply("batch_select_indices", torch.tensor([5, 0, 2]))
    assert twin.ours.key_data.shape[0] == 3
    twin.update(*tokens(2, batch=3))
    twin.apply("batch_select_indices", [1])
    twin.update(*tokens(1, batch=1))
    assert twin.ours.key_data.shape[0] == 1


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_reset_then_reuse_with_another_batch_size(mode):
    config = gemma_config(["full_attention", "sliding_attention"], sliding_window=3)
    cache = QuantizedPerTokenHeadCache(config=config, mode=mode)
    tokens = Tokens(batch=2, heads=1, seed=18)
    for layer_idx in range(2):
        cache.update(*tokens(5), layer_idx)
    assert cache.nbytes > 0
    cache.reset()
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 0
    assert cache.nbytes == 0
    assert [layer.is_initialized for layer in cache.layers] == [False, False]
    assert cache.layers[1].sliding_window == 3
    hf = DynamicCache(config=config)
    other = Tokens(batch=4, heads=1, dtype=torch.bfloat16, seed=19)  # another batch size and dtype
    for n in (2, 1, 3):
        for layer_idx in range(2):
            assert cache.get_mask_sizes(n, layer_idx) == hf.get_mask_sizes(n, layer_idx)
            k, v = other(n)
            ok, ov = cache.update(k, v, layer_idx)
            hk, hv = hf.update(k, v, layer_idx)
            assert ok.shape[0] == 4 and ok.dtype == torch.bfloat16
            assert torch.equal(ok, deq(hk, cache.mode)) and torch.equal(ov, deq(hv, cache.mode))


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("with_config", [False, True])
@hadamard_options
def test_deepcopy_is_independent_and_shares_config(mode, with_config, hadamard):
    config = llama_config(layers=2, attn=ATTENTION_NAME) if with_config else None
    cache = QuantizedPerTokenHeadCache(config=config, mode=mode, hadamard=hadamard)
    tokens = Tokens(batch=1, heads=1, seed=20)
    history = [[], []]
    for layer_idx in range(2):
        k, v = tokens(4)
        history[layer_idx].append(store(k, hadamard))
        cache.update(k, v, layer_idx)
    clone = copy.deepcopy(cache)
    assert clone is not cache
    assert clone.config is cache.config
    if with_config:
        assert clone.config is config and clone.hands_over_quantized
    assert clone.mode is cache.mode and clone.hadamard == cache.hadamard == hadamard
    for a, b in zip(cache.layers, clone.layers):
        assert a is not b
        assert a.rotation is b.rotation  # the shared matrix, not a copy per layer
        for t, u in zip(a.buffers, b.buffers):
            assert t.data_ptr() != u.data_ptr()
            assert torch.equal(as_bytes(t), as_bytes(u))
    before = state(cache)
    k, v = tokens(3)
    out = as_tensors(clone.update(k, v, 0))
    assert out[0].shape[-2] == 7
    expected = readback(torch.cat(history[0] + [store(k, hadamard)], -2), clone.mode, k.dtype, hadamard)
    assert torch.equal(out[0], expected)
    clone.crop(-3)
    assert clone.get_seq_length(0) == 4 and clone.get_seq_length(1) == 1
    assert_same_state(before, state(cache))
    # and the other way round
    clone_before = state(clone)
    k, v = tokens(1)
    cache.update(k, v, 1)
    assert_same_state(clone_before, state(clone))
    # a layer the clone creates lazily does not appear in the original
    if not with_config:
        clone.update(*tokens(2), 2)
        assert len(clone.layers) == 3 and len(cache.layers) == 2


@pytest.mark.parametrize("max_cache_len", [None, 24])
def test_early_initialization(max_cache_len):
    # transformers' export path initializes layers up front with zero-token tensors
    config = gemma_config(["full_attention", "sliding_attention"], sliding_window=4)
    cache = QuantizedPerTokenHeadCache(config=config, mode="fp8_per_token_head", max_cache_len=max_cache_len)
    cache.early_initialization(batch_size=2, num_heads=1, head_dim=64, dtype=torch.float16, device=torch.device("cpu"))
    assert cache.is_initialized
    # a preallocated cache allocates every layer whole, a sliding one its window (4 slots); a growable one nothing yet
    assert [layer.capacity for layer in cache.layers] == ([0, 0] if max_cache_len is None else [max_cache_len, 4])
    assert cache.get_seq_length(0) == 0
    hf = DynamicCache(config=config)
    tokens = Tokens(batch=2, heads=1, dtype=torch.float16, seed=28)
    for n in (6, 1, 1):
        for layer_idx in range(2):
            k, v = tokens(n)
            ok, _ = cache.update(k, v, layer_idx)
            hk, _ = hf.update(k, v, layer_idx)
            if max_cache_len is not None:  # the whole capacity, of which the first tokens are live
                ok = ok[:, :, : int(cache.get_seq_length(layer_idx))][:, :, -hk.shape[-2]:]
            assert torch.equal(ok, deq(hk, cache.mode))
    before = state(cache)
    with pytest.raises(ValueError):
        cache.update(*Tokens(batch=2, heads=1, dtype=torch.float32)(1), 0)  # not the dtype it was initialized with
    assert_same_state(before, state(cache))


# ---------------------------------------------------------------------------------------------------------------
# construction from configs
# ---------------------------------------------------------------------------------------------------------------


def test_config_with_sliding_layers():
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cache = QuantizedPerTokenHeadCache(config=gemma_config(types, sliding_window=6), mode="fp8_per_token_head")
    assert len(cache.layers) == 4
    assert cache.mode is KVQuantMode.FP8_PER_TOKEN_HEAD
    for layer, layer_type in zip(cache.layers, types):
        assert isinstance(layer, QuantizedPerTokenHeadLayer)
        assert layer.mode is KVQuantMode.FP8_PER_TOKEN_HEAD
        if layer_type == "sliding_attention":
            assert isinstance(layer, QuantizedPerTokenHeadSlidingWindowLayer)
            assert layer.is_sliding and layer.sliding_window == 6 and layer.get_max_length() == 6
        else:
            assert type(layer) is QuantizedPerTokenHeadLayer
            assert not layer.is_sliding and layer.get_max_length() == -1
    assert cache.is_sliding == [t == "sliding_attention" for t in types]


def test_config_full_attention_only():
    cache = QuantizedPerTokenHeadCache(config=llama_config(layers=3))
    assert len(cache.layers) == 3 and cache.is_sliding == [False] * 3
    assert cache.mode is KVQuantMode.INT8_PER_TOKEN_HEAD


@pytest.mark.parametrize("layer_type", ["indexed_attention", "heavily_compressed_attention", "mamba", "mystery"])
def test_unsupported_layer_type_raises_naming_it(layer_type):
    config = llama_config(layers=2)
    config.layer_types = ["full_attention", layer_type]
    config.attention_chunk_size = 8  # read by transformers for chunked attention
    with pytest.raises(ValueError, match=layer_type):
        QuantizedPerTokenHeadCache(config=config)


@pytest.mark.parametrize("bad", ["int4", "", "fp16", None, 8])
def test_unknown_mode_raises_listing_names(bad):
    with pytest.raises(ValueError) as excinfo:
        QuantizedPerTokenHeadCache(mode=bad)
    assert "int8_per_token_head" in str(excinfo.value) and "fp8_per_token_head" in str(excinfo.value)
    with pytest.raises(ValueError, match="fp8_per_token_head"):
        QuantizedPerTokenHeadLayer(bad)


# ---------------------------------------------------------------------------------------------------------------
# bad input leaves the cache exactly as it was
# ---------------------------------------------------------------------------------------------------------------


def _bad_inputs(batch, heads, head_dim):
    """(name, key, value, exception, message fragments, applies to an empty cache too)."""
    b, h, d = batch, heads, head_dim
    f = torch.float32
    meta = torch.device("meta")
    return [
        ("int32", torch.ones(b, h, 1, d, dtype=torch.int32), torch.ones(b, h, 1, d, dtype=torch.int32),
         ValueError, ["int32", "float32"], True),
        ("float64", torch.ones(b, h, 1, d, dtype=torch.float64), torch.ones(b, h, 1, d, dtype=torch.float64),
         ValueError, ["float64"], True),
        ("mixed_dtypes", torch.ones(b, h, 1, d), torch.ones(b, h, 1, d, dtype=torch.bfloat16),
         ValueError, ["bfloat16"], True),
        ("head_dim_0", torch.ones(b, h, 1, 0), torch.ones(b, h, 1, 0), ValueError, ["head_dim 0", "any positive"],
         True),
        ("shapes_differ", torch.ones(b, h, 2, d), torch.ones(b, h, 3, d), ValueError, [], True),
        ("value_heads_differ", torch.ones(b, h, 1, d), torch.ones(b, h + 1, 1, d), ValueError, [], True),
        ("three_dims", torch.ones(h, 1, d), torch.ones(h, 1, d), ValueError, [], True),
        ("not_a_tensor", [[1.0]], [[1.0]], TypeError, [], True),
        ("batch_differs", torch.ones(b + 1, h, 1, d), torch.ones(b + 1, h, 1, d), ValueError, [], False),
        ("heads_differ", torch.ones(b, h + 1, 1, d), torch.ones(b, h + 1, 1, d), ValueError, [], False),
        ("head_dim_differs", torch.ones(b, h, 1, 128), torch.ones(b, h, 1, 128), ValueError, ["128"], False),
        ("dtype_differs", torch.ones(b, h, 1, d, dtype=torch.bfloat16), torch.ones(b, h, 1, d, dtype=torch.bfloat16),
         ValueError, ["bfloat16", "float32"], False),
        ("meta_device", torch.ones(b, h, 1, d, dtype=f, device=meta), torch.ones(b, h, 1, d, dtype=f, device=meta),
         ValueError, ["meta"], False),
        ("value_on_meta", torch.ones(b, h, 1, d, dtype=f), torch.ones(b, h, 1, d, dtype=f, device=meta),
         ValueError, ["meta"], True),
    ]


BAD_NAMES = [case[0] for case in _bad_inputs(1, 1, 64)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("layout", ["full", "sliding", "max_cache_len"])
@hadamard_options
def test_bad_input_leaves_cache_unchanged(mode, name, layout, hadamard):
    if layout == "sliding":
        cache = QuantizedPerTokenHeadCache(
            config=gemma_config(["sliding_attention", "full_attention"], sliding_window=3), mode=mode,
            hadamard=hadamard,
        )
    else:
        cache = QuantizedPerTokenHeadCache(
            mode=mode, max_cache_len=64 if layout == "max_cache_len" else None, hadamard=hadamard
        )
    tokens = Tokens(batch=2, heads=2, head_dim=64, seed=21)
    case = {c[0]: c for c in _bad_inputs(2, 2, 64)}[name]
    _, bad_k, bad_v, exc, fragments, on_empty = case

    if on_empty:
        # a fresh cache stays empty
        with pytest.raises(exc) as excinfo:
            cache.update(bad_k, bad_v, 0)
        for fragment in fragments:
            assert fragment in str(excinfo.value)
        assert cache.get_seq_length(0) == 0 and cache.nbytes == 0
        assert not cache.layers[0].is_initialized

    written = []
    for n in (5, 1):
        k, v = tokens(n)
        written.append(store(k, hadamard))
        cache.update(k, v, 0)
    before = state(cache)
    with pytest.raises(exc) as excinfo:
        cache.update(bad_k, bad_v, 0)
    for fragment in fragments:
        assert fragment in str(excinfo.value)
    assert_same_state(before, state(cache))
    # and the cache goes on as if nothing happened
    k, v = tokens(1)
    ok, ov = as_tensors(cache.update(k, v, 0))
    all_k = torch.cat(written + [store(k, hadamard)], -2)
    kv_len = {"sliding": 3, "full": 7, "max_cache_len": 64}[layout]  # a preallocated layer hands over its capacity
    assert ok.shape[-2] == kv_len
    live = min(kv_len, 7)
    assert torch.equal(ok[:, :, :live], readback(all_k[:, :, -live:], cache.mode, k.dtype, hadamard))


def test_unsupported_head_dim_message_lists_accepted():
    # On the CPU any positive head_dim is accepted (tests at the end of this file); an empty one is not, for keys or
    # values, and the message names which and what is accepted.
    layer = QuantizedPerTokenHeadLayer("int8_per_token_head")
    for key_dim, value_dim, which in ((0, 0, "key"), (64, 0, "value"), (0, 64, "key")):
        with pytest.raises(ValueError) as excinfo:
            layer.update(torch.ones(1, 1, 1, key_dim), torch.ones(1, 1, 1, value_dim))
        assert f"{which} head_dim 0" in str(excinfo.value) and "any positive head_dim" in str(excinfo.value)
        assert not layer.is_initialized


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------

MEMORY_LIMITS = {64: 0.55, 128: 0.535}
MAX_TOKENS = 20000


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("prefill", [4096, 3000, 4095, 4097, 6000])
def test_memory_ratio_vs_bf16_dynamic_cache(head_dim, prefill):
    # hands over QuantizedKV views, so no dequantized copy is made at every step
    cache = QuantizedPerTokenHeadCache(
        config=llama_config(layers=1, head_dim=head_dim, attn=ATTENTION_NAME), mode="int8_per_token_head"
    )
    g = torch.Generator().manual_seed(prefill)
    k, v = torch.randn(2, 1, 1, prefill, head_dim, generator=g)
    cache.update(k, v, 0)
    x = torch.randn(1, 1, 1, head_dim, generator=g)
    limit = MEMORY_LIMITS[head_dim]
    worst = 0.0
    for length in range(prefill, MAX_TOKENS + 1):
        if length > prefill:
            cache.update(x, x, 0)
        assert cache.get_seq_length() == length
        if length >= 4096:
            bf16_bytes = 2 * length * head_dim * 2  # keys and values, B = H = 1
            ratio = cache.nbytes / bf16_bytes
            worst = max(worst, ratio)
            assert ratio <= limit, (length, ratio)
    assert kv_cache_nbytes(cache) == cache.nbytes
    # the per-token cost alone: (2 * head_dim + 2 * 4) / (4 * head_dim)
    assert worst >= (2 * head_dim + 8) / (4 * head_dim)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@hadamard_options
def test_nbytes_counts_capacity_and_scales(mode, hadamard):
    # the rotation adds no per-token storage: the same bytes with and without it
    config = gemma_config(["full_attention", "sliding_attention"], sliding_window=4)
    cache = QuantizedPerTokenHeadCache(config=config, mode=mode, hadamard=hadamard)
    assert cache.nbytes == 0
    tokens = Tokens(batch=2, heads=1, head_dim=64, seed=22)
    for layer_idx in range(2):
        cache.update(*tokens(10), layer_idx)
    expected = 0
    for layer in cache.layers:
        # data: 1 byte per element; scales: float32 per (batch, head, slot); keys and values
        expected += 2 * (2 * 1 * layer.capacity * 64 + 2 * 1 * layer.capacity * 4)
        assert layer.nbytes == sum(t.nbytes for t in layer.buffers)
    assert cache.nbytes == expected == kv_cache_nbytes(cache)


def test_kv_cache_nbytes_on_dynamic_cache():
    config = gemma_config(["full_attention", "sliding_attention", "full_attention"], sliding_window=4)
    dyn = DynamicCache(config=config)
    assert kv_cache_nbytes(dyn) == 0
    tokens = Tokens(batch=2, heads=1, head_dim=64, dtype=torch.bfloat16, seed=23)
    for n in (7, 1):
        for layer_idx in range(3):
            dyn.update(*tokens(n), layer_idx)
    expected = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    assert kv_cache_nbytes(dyn) == expected
    # full layers hold all 8 tokens in bf16, the sliding one its window - 1
    assert expected == 2 * (2 * 1 * 64 * 2) * (8 + 3 + 8)
    lazy = DynamicCache()
    lazy.update(*tokens(5), 0)
    assert kv_cache_nbytes(lazy) == 2 * (2 * 1 * 5 * 64 * 2)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_cache_on_cuda_matches_cpu_reference_in_generate(mode):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 128, (2, 50))
    caches = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        cache = QuantizedPerTokenHeadCache(config=m.config, mode=mode)
        with torch.no_grad():
            m(prompt.to(device), cache=cache)
            m(prompt[:, :3].to(device), cache=cache)  # a continuation chunk
        caches[device] = cache
    for cpu_layer, gpu_layer in zip(caches["cpu"].layers, caches["cuda"].layers):
        assert gpu_layer.key_data.is_cuda
        assert cpu_layer.stored == gpu_layer.stored == 53
        # The projections differ in the last bits between CPU and GPU matmuls, so compare dequantized values.
        for data, scale in (("key_data", "key_scale"), ("value_data", "value_scale")):
            c = getattr(cpu_layer, data)[:, :, :53].float() * getattr(cpu_layer, scale)[:, :, :53, None]
            g = getattr(gpu_layer, data)[:, :, :53].float().cpu() * getattr(gpu_layer, scale)[:, :, :53, None].cpu()
            tolerance = 0.02 if mode is KVQuantMode.INT8_PER_TOKEN_HEAD else 0.1
            assert (c - g).abs().max() <= tolerance * c.abs().max()


# ---------------------------------------------------------------------------------------------------------------
# a preallocated cache too small: the numbers and the fix
# ---------------------------------------------------------------------------------------------------------------


def test_check_generation_length_gives_the_numbers_and_the_fix():
    """A generation of max_length tokens writes max_length - 1 (the last new token is never stored); the refusal says
    how many, from what, and the max_cache_len that fits. A growable cache is never refused; nothing changes."""
    import re

    cache = QuantizedPerTokenHeadCache(config=llama_config(), max_cache_len=8)
    before = state(cache)
    cache.check_generation_length(9, max_new_tokens=4)  # 8 slots: fits exactly
    with pytest.raises(ValueError, match=re.escape(
            "this cache holds max_cache_len=8 tokens, but generate would write 9 to it (prompt 6 + max_new_tokens 4 - "
            "1: the last new token is never stored); build it with max_cache_len >= 9, or ask for fewer new tokens")):
        cache.check_generation_length(10, max_new_tokens=4)
    with pytest.raises(ValueError, match=re.escape("write 9 to it (max_length 10 - 1: ")):
        cache.check_generation_length(10)
    for bad in (0, -3, 2.5, True, "9"):
        with pytest.raises(ValueError, match=f"max_length must be a positive int .*; got {re.escape(repr(bad))}"):
            cache.check_generation_length(bad)
    assert_same_state(before, state(cache))
    QuantizedPerTokenHeadCache(config=llama_config()).check_generation_length(10**6)


def test_overflowing_update_gives_the_fix_and_changes_nothing():
    """Past `generate` (direct forward calls, a cache reused without reset): the update that overflows is refused with
    the length that would fit, before anything is written."""
    import re

    cache = QuantizedPerTokenHeadCache(max_cache_len=12)
    k = torch.randn(1, 1, 13, 64)
    with pytest.raises(ValueError, match=re.escape(
            "13 new tokens exceed this cache's max_cache_len=12; build the cache with max_cache_len >= 13")):
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    cache.update(k[:, :, :10], k[:, :, :10], 0)
    before = state(cache)
    with pytest.raises(ValueError, match=re.escape(
            "13 tokens exceed this cache's max_cache_len=12 (10 held + 3 new); build the cache with max_cache_len >= "
            "13, or reset() it before a new prompt")):
        cache.update(k[:, :, 10:], k[:, :, 10:], 0)
    assert_same_state(before, state(cache))


# ---------------------------------------------------------------------------------------------------------------
# any head size, and keys and values of different head sizes (MLA)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [1, 8, 32, 72, 80, 112, 160, 192, 512, 576])
@hadamard_options
def test_any_head_dim_on_the_cpu(head_dim, hadamard):
    """phi-2's 80, the issue's 32-512, and sizes no kernel tile fits (1, 72, 576): on the CPU the cache takes any
    head_dim, exactly as it takes the tuned ones."""
    for window in (None, 5):
        twin = TwinLayer("int8_per_token_head", sliding_window=window, hadamard=hadamard)
        tokens = Tokens(batch=2, heads=2, head_dim=head_dim, seed=head_dim)
        for n in (6, 1, 3):
            twin.update(*tokens(n))
        assert twin.ours.key_data.shape[-1] == twin.ours.value_data.shape[-1] == head_dim


def _mla_tokens(batch, heads, n, key_head_dim, value_head_dim, seed):
    k, _ = Tokens(batch=batch, heads=heads, head_dim=key_head_dim, seed=seed)(n)
    _, v = Tokens(batch=batch, heads=heads, head_dim=value_head_dim, seed=seed + 1)(n)
    return k, v


# DeepSeek-V3 hands the cache one head of its 512-channel latent as keys and of its 64-channel rotary key part as
# values; per-head MLA keys and values (qk_nope + qk_rope = 192, v_head_dim = 128); values wider than keys.
MLA_SHAPES = [(1, 512, 64), (4, 192, 128), (2, 24, 80)]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("heads,key_head_dim,value_head_dim", MLA_SHAPES)
@pytest.mark.parametrize("layout", ["full", "sliding", "max_cache_len"])
@hadamard_options
def test_keys_and_values_of_different_head_dims(mode, heads, key_head_dim, value_head_dim, layout, hadamard):
    """Each quantized with its own per-token-head scale into its own buffer, handed back as transformers'
    DynamicLayer would hand the same rounded values, through growth (90 tokens) and the batch operations."""
    mode = KVQuantMode.parse(mode)
    if layout == "full":
        ours, hf = QuantizedPerTokenHeadLayer(mode, hadamard=hadamard), DynamicLayer()
    elif layout == "sliding":
        ours = QuantizedPerTokenHeadSlidingWindowLayer(mode, 7, hadamard=hadamard)
        hf = DynamicSlidingWindowLayer(7)
    else:
        ours, hf = cache_mod.QuantizedPerTokenHeadStaticLayer(mode, 128, hadamard=hadamard), DynamicLayer()
    for step, n in enumerate((40, 1, 49, 2)):
        k, v = _mla_tokens(2, heads, n, key_head_dim, value_head_dim, seed=10 * step)
        hk, hv = hf.update(store(k, hadamard), store(v, hadamard))
        qk, qv = ours.update(k, v)
        live = hk.shape[-2]
        assert qk.shape[-1] == key_head_dim and qv.shape[-1] == value_head_dim
        assert torch.equal(qk.dequantize()[:, :, :live], readback(hk, mode, k.dtype, hadamard))
        assert torch.equal(qv.dequantize()[:, :, :live], readback(hv, mode, v.dtype, hadamard))
        if step == 1:
            beams = torch.tensor([1, 0])
            ours.reorder_cache(beams)
            hf.reorder_cache(beams)
    codes = mode.storage_dtype.itemsize
    assert ours.nbytes == 2 * heads * ours.capacity * ((key_head_dim + value_head_dim) * codes + 8)
    ours.batch_repeat_interleave(2)
    hf.batch_repeat_interleave(2)
    ours.batch_select_indices(torch.tensor([3, 0]))
    hf.batch_select_indices(torch.tensor([3, 0]))
    k, v = _mla_tokens(2, heads, 1, key_head_dim, value_head_dim, seed=99)
    hk, hv = hf.update(store(k, hadamard), store(v, hadamard))
    qk, qv = ours.update(k, v)
    assert torch.equal(qv.dequantize()[:, :, : hv.shape[-2]], readback(hv, mode, v.dtype, hadamard))
    assert torch.equal(qk.dequantize()[:, :, : hk.shape[-2]], readback(hk, mode, k.dtype, hadamard))


@pytest.mark.parametrize("layout", ["full", "max_cache_len"])
def test_mla_layer_refuses_what_does_not_match_and_stays_unchanged(layout):
    cache = QuantizedPerTokenHeadCache(mode="int8", max_cache_len=64 if layout == "max_cache_len" else None)
    k, v = _mla_tokens(2, 1, 5, 192, 128, seed=3)
    cache.update(k, v, 0)
    before = state(cache)
    bad = {
        "swapped head dims": _mla_tokens(2, 1, 1, 128, 192, seed=4),
        "other value head_dim": _mla_tokens(2, 1, 1, 192, 64, seed=5),
        "other key head_dim": _mla_tokens(2, 1, 1, 160, 128, seed=6),
    }
    for name, (bad_k, bad_v) in bad.items():
        with pytest.raises(ValueError) as excinfo:
            cache.update(bad_k, bad_v, 0)
        given = (2, 1, bad_k.shape[-1], bad_v.shape[-1])
        assert f"(batch, kv_heads, key head_dim, value head_dim) = {given} do not match the cache's (2, 1, 192, 128)" \
            in str(excinfo.value), name
        assert_same_state(before, state(cache))
    k2, v2 = _mla_tokens(2, 1, 2, 192, 128, seed=7)
    for bad_k, bad_v in ((k2, v2[:, :, :1]), (k2, v2[:1]), (k2, v2.expand(2, 3, 2, 128))):  # tokens, batch, heads
        with pytest.raises(ValueError, match="same batch, kv_heads and tokens .their head dims may differ."):
            cache.update(bad_k, bad_v, 0)
        assert_same_state(before, state(cache))
    ok, ov = cache.update(k2, v2, 0)  # and it goes on
    assert torch.equal(ov[:, :, 5:7], deq(v2, cache.mode)) and torch.equal(ok[:, :, 5:7], deq(k2, cache.mode))


def test_mla_model_config_builds_a_cache():
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, kv_lora_rank=32,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=None)
    cache = QuantizedPerTokenHeadCache(config=config, mode="fp8")
    for index in range(3):
        cache.update(*_mla_tokens(1, 1, 4, config.kv_lora_rank, config.qk_rope_head_dim, seed=index), index)
    assert all(layer.head_dims == (32, 8) for layer in cache.layers)


@requires_cuda
def test_head_dim_wider_than_the_kernels_is_refused_on_cuda_only():
    for key_dim, value_dim, refused in ((576, 64, "key head_dim 576"), (512, 640, "value head_dim 640")):
        cache = QuantizedPerTokenHeadCache(mode="int8")
        k, v = _mla_tokens(1, 1, 2, key_dim, value_dim, seed=8)
        with pytest.raises(ValueError, match=f"unsupported {refused} on cuda.*accepted on a CUDA device: 1 to 512.*"
                                             "on the CPU any head_dim"):
            cache.update(k.cuda(), v.cuda(), 0)
        assert cache.nbytes == 0
        cache.update(k, v, 0)  # the CPU takes it
    cache = QuantizedPerTokenHeadCache(mode="int8")
    k, v = _mla_tokens(1, 1, 2, 8, 72, seed=9)  # any head_dim up to 512, padded in the kernels' tiles
    ok, ov = cache.update(k.cuda(), v.cuda(), 0)
    assert torch.equal(ov.cpu(), deq(v, cache.mode)) and torch.equal(ok.cpu(), deq(k, cache.mode))
