"""The preallocated sliding-window layer that holds one window (`hf_kvquant.cache.ring`): what it hands over, the
attention over it, crop, save/load, and the memory it saves on Gemma-3-270M."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, fill, gemma_config, state, tokens

from hf_kvquant import (
    KVQuantMode,
    QuantizedPerTokenHeadCache,
    QuantizedPerTokenHeadStaticLayer,
    QuantizedPerTokenHeadStaticSlidingWindowLayer,
    kv_cache_nbytes,
)
from hf_kvquant.integration import attend_quantized

MAX_CACHE_LEN = 40
# Prompts shorter and longer than the window, decode steps, chunks that wrap the ring.
PLANS = {"decode": [3] + [1] * 12, "long_prefill": [11, 1, 1, 2, 1], "chunks": [2, 3, 3, 5, 1, 4, 1]}


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.short_name)
@pytest.mark.parametrize("window", [2, 4, 7])
@pytest.mark.parametrize("plan", list(PLANS))
def test_ring_hands_over_what_a_layer_keeping_every_token_does(mode, window, plan):
    """Step by step, against the preallocated layer that keeps every token (the mask applying the window): the same
    numbers in every column a query of the step sees, zeros in the columns before, the same mask sizes and length,
    and attention over both equal to the bit (the CPU path lays a window out at its positions)."""
    ring = QuantizedPerTokenHeadStaticSlidingWindowLayer(mode, MAX_CACHE_LEN, window)
    full = QuantizedPerTokenHeadStaticLayer(mode, MAX_CACHE_LEN, sliding_window=window)
    held = 0
    for step, count in enumerate(PLANS[plan]):
        k, v = tokens((2, 2, count, 64), seed=step)
        ours, theirs = ring.update(k, v), full.update(k, v)
        first = held - min(held, window - 1)  # the first position the step's first query sees
        for a, b in zip(ours, theirs):
            got, want = a.dequantize(), b.dequantize()
            assert got.shape == want.shape == (2, 2, MAX_CACHE_LEN, 64)
            assert torch.equal(got[:, :, first : held + count], want[:, :, first : held + count])
            assert not got[:, :, :first].any()
        query = torch.randn(2, 4, count, 64, generator=torch.Generator().manual_seed(step))
        assert torch.equal(attend_quantized(query, *ours, None, sliding_window=window),
                           attend_quantized(query, *theirs, None, sliding_window=window))
        held += count
        assert int(ring.get_seq_length()) == int(full.get_seq_length()) == held
        assert ring.get_mask_sizes(1) == full.get_mask_sizes(1) == (MAX_CACHE_LEN, 0)
    assert ring.capacity == window and full.capacity == MAX_CACHE_LEN
    # batch 2 x 2 heads: one-byte key and value codes of the window's slots (value rows padded to 16 slots) and two
    # float32 scales per slot
    assert ring.nbytes == 2 * 2 * (window * 64 + -(-window // 16) * 16 * 64 + 2 * window * 4)


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.short_name)
def test_crop_only_where_the_ring_never_overwrites(mode):
    """As transformers' StaticSlidingWindowLayer: with max_cache_len past the window the ring overwrites tokens, so a
    crop is refused (changing nothing, even before it wrapped); with max_cache_len <= window it goes back as far as
    asked."""
    config = gemma_config(["sliding_attention", "full_attention"], 4)
    cache = fill(QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=24), [3])
    assert not cache.layers[0].is_croppable
    before = state(cache)
    with pytest.raises(RuntimeError, match="keeps one window"):
        cache.crop(-1)
    assert_same_state(before, state(cache))
    short = fill(QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention", "full_attention"], 8),
                                            mode=mode, max_cache_len=8), [5, 1])
    assert short.layers[0].is_croppable and short.layers[0].capacity == 8
    short.crop(-3)
    assert int(short.get_seq_length()) == 3


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.short_name)
def test_save_and_load_past_the_window(mode, tmp_path):
    """A ring saved after it wrapped loads into the same slots and goes on handing over the same tokens."""
    config = gemma_config(["sliding_attention", "full_attention"], 4)
    cache = fill(QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=24), [6, 1, 3, 1])
    cache.save(tmp_path / "ring.safetensors")
    loaded = QuantizedPerTokenHeadCache.load(tmp_path / "ring.safetensors", config=config)
    assert [layer.capacity for layer in loaded.layers] == [4, 24]
    assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))
    for index in range(2):
        k, v = tokens((2, 1, 1, 64), seed=50 + index)
        for got, want in zip(loaded.update(k, v, index), cache.update(k, v, index)):
            assert torch.equal(got.dequantize(), want.dequantize())


def test_a_compiled_step_that_wraps_is_refused():
    """A multi-token step decides on the host whether it wraps: compiled, it is refused with the reason (generate
    compiles single-token steps only)."""
    layer = QuantizedPerTokenHeadStaticSlidingWindowLayer("int8", MAX_CACHE_LEN, 4)
    layer.update(*tokens((1, 1, 3, 64)))

    def step(k, v):
        return layer.update(k, v)[0].data

    with pytest.raises(Exception, match="compiled step of 2 tokens over a preallocated sliding-window layer"):
        torch.compile(step, backend="eager", fullgraph=True)(*tokens((1, 1, 2, 64), seed=1))


@pytest.mark.slow
def test_gemma3_270m_preallocated_holds_about_half_of_static_cache():
    """Gemma-3-270M (15 of 18 layers slide over 512 tokens, head_dim 256) at max_cache_len=32768, bf16: transformers'
    StaticCache keeps one window on a sliding layer, and so does the INT8 cache now (it held 2.83x StaticCache's bytes
    when its sliding layers kept every token)."""
    from transformers import AutoConfig, StaticCache

    from hf_kvquant.evaluation import resolve_model

    try:
        source, gguf_file = resolve_model("gemma3")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    text = config.get_text_config(decoder=True)
    shape = dict(batch_size=1, num_heads=text.num_key_value_heads, head_dim=text.head_dim, dtype=torch.bfloat16,
                 device=torch.device("cpu"))
    ours = QuantizedPerTokenHeadCache(config=config, mode="int8", max_cache_len=32768)
    static = StaticCache(config=config, max_cache_len=32768)
    for cache in (ours, static):
        cache.early_initialization(**shape)
    ratio = kv_cache_nbytes(ours) / kv_cache_nbytes(static)
    print(f"\nGemma-3-270M, max_cache_len=32768: INT8 {kv_cache_nbytes(ours):,} bytes, bf16 StaticCache "
          f"{kv_cache_nbytes(static):,} bytes: {ratio:.3f} x")
    # (1 + 4/256) / 2 = 0.508 of bf16 per slot; the rows of the 3 full layers are padded to 16 slots (none here)
    assert ratio <= 0.55
