"""Saving and loading a `QuantizedPerTokenHeadCache` (`hf_kvquant.persistence`), and faults on the CPU: non-finite keys
and values, allocation failures while a layer grows.

What is checked: a loaded cache holds the same live codes, scales and counters as the saved one, and generation
continued from it gives exactly the tokens and logits of generation continued from a `copy.deepcopy` of the original
(tiny random Llama and Gemma 3, growable, preallocated and Hadamard caches); every corrupted or mismatched file raises a
`ValueError` naming what is wrong, and a file that is not safetensors (a pickle) is never unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import pytest
import torch
from conftest import as_bytes, assert_same_state, fill, gemma_config, live_tokens, llama_config, state, tokens
from safetensors import safe_open
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from hf_kvquant.cache import storage
from hf_kvquant import (
    ATTENTION_NAME,
    KVQuantMode,
    QuantizedPerTokenHeadCache,
    persistence,
)
from hf_kvquant.ops.reference import dequantize, quantize_reference

MODES = list(KVQuantMode)
MODE_IDS = [m.value for m in MODES]

# ---------------------------------------------------------------------------------------------------------------
# helpers (those of any cache test are in conftest.py)
# ---------------------------------------------------------------------------------------------------------------


def write_variant(src, dst, edit_layers=None, edit_tensors=None, **fields):
    """Rewrite the cache file ``src`` as ``dst`` with consistent checksums, after ``edit_layers(layers)`` and
    ``edit_tensors(tensors)`` (in place) and with the metadata ``fields`` replaced: files that are well-formed but
    wrong, to test what the checks beyond the checksums catch."""
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    layers = json.loads(metadata["layers"])
    for entry in layers:
        entry.pop("crc32", None)
    if edit_layers is not None:
        edit_layers(layers)
    if edit_tensors is not None:
        edit_tensors(tensors)
    base = dict(mode=metadata["mode"], hadamard=json.loads(metadata["hadamard"]),
                max_cache_len=json.loads(metadata["max_cache_len"]), layers=layers)
    base.update(fields)
    persistence._write_file(dst, tensors, base)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------

LAYOUTS = {
    # name: (config or None, max_cache_len, update sizes)
    "no_config": (None, None, [5, 1, 3]),
    "llama": (llama_config(layers=2), None, [7, 1, 1]),
    "llama_long": (llama_config(layers=1), None, [150, 1]),  # grown past its first capacity
    "gemma_past_window": (gemma_config(["sliding_attention", "full_attention", "sliding_attention"], 4),
                          None, [300, 1, 2, 1]),
    "gemma_within_window": (gemma_config(["sliding_attention", "full_attention"], 8), None, [3, 1]),
    "static_llama": (llama_config(layers=2), 32, [7, 1, 1]),
    "static_gemma": (gemma_config(["sliding_attention", "full_attention"], 4), 16, [10, 1, 1]),  # full at the end
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_round_trip_keeps_live_state_and_continues_the_same(tmp_path, layout, mode, hadamard, dtype):
    config, max_cache_len, steps = LAYOUTS[layout]
    cache = QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len, hadamard=hadamard)
    fill(cache, steps, dtype=dtype)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=config)
    assert type(loaded) is QuantizedPerTokenHeadCache
    assert loaded.mode is cache.mode and loaded.hadamard is hadamard and loaded.max_cache_len == max_cache_len
    assert loaded.config is (None if config is None else config.get_text_config(decoder=True))
    assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))
    assert all(layer.device == torch.device("cpu") for layer in loaded.layers if layer.is_initialized)
    # value codes back in the cache's token-minor layout (the file holds them as [batch, kv_heads, tokens, head_dim])
    assert all(layer.value_data.stride(2 if layer.value_layout is storage.TokenMinor else 3) == 1
               for layer in loaded.layers if layer.is_initialized)
    if max_cache_len is not None:
        assert loaded.nbytes == cache.nbytes  # preallocated: max_cache_len slots, as saved
        assert all(layer.rotation is not None for layer in loaded.layers) == hadamard
    # the file holds the live tokens only
    live_bytes = sum(t[:, :, : live_tokens(layer)].nbytes for layer in cache.layers for t in layer.buffers)
    assert os.path.getsize(path) <= live_bytes + 800 * len(cache.layers) + 500
    # and both go on the same way
    original = copy.deepcopy(cache)
    for step, n in enumerate([1, 2, 1]):
        for index, (a, b) in enumerate(zip(original.layers, loaded.layers)):
            k, v = tokens((2, 1, n, 64), dtype, seed=77 + 10 * step + index)
            ok, ov = original.update(k, v, index)
            lk, lv = loaded.update(k, v, index)
            live = int(original.get_seq_length(index)) if max_cache_len is not None else ok.shape[-2]
            assert ok.shape == lk.shape
            assert torch.equal(ok[:, :, :live], lk[:, :, :live]) and torch.equal(ov[:, :, :live], lv[:, :, :live])
            assert int(original.get_seq_length(index)) == int(loaded.get_seq_length(index))


def test_round_trip_of_uninitialized_reset_dummy_and_empty_layers(tmp_path):
    config = llama_config(layers=4)
    config.layer_types = ["full_attention", "mlp", "full_attention", "full_attention"]  # "mlp": a dummy layer
    cache = QuantizedPerTokenHeadCache(config=config)
    assert cache.is_dummy == [False, True, False, False]
    cache.update(*tokens((1, 1, 5, 64)), 0)  # layer 0 filled, layer 2 initialized empty, layer 3 never reached
    cache.layers[2].lazy_initialization(*tokens((1, 1, 0, 64)))
    path = tmp_path / "c.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=config)
    assert loaded.is_dummy == [False, True, False, False]
    assert [layer.is_initialized for layer in loaded.layers] == [True, True, True, False]
    assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))
    cache.reset()
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=config)
    assert [layer.is_initialized for layer in loaded.layers] == [False, True, False, False]
    assert loaded.get_seq_length() == 0 and loaded.nbytes == 0


def test_sliding_layer_recording_state_survives_the_round_trip(tmp_path):
    config = gemma_config(["sliding_attention", "full_attention"], 4)
    cache = fill(QuantizedPerTokenHeadCache(config=config), [200])
    cache.activate_past_recording()
    fill(cache, [5, 3], seed=1)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=config)
    layer = loaded.layers[0]
    assert layer.record_past and layer._rollback_base == 200 and loaded.is_recording_past(0)
    loaded.crop(-8)  # what assisted decoding rolls back: possible only if the recorded past came through
    cache.crop(-8)
    assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))


def test_static_cache_reset_keeps_its_buffers_through_the_round_trip(tmp_path):
    cache = fill(QuantizedPerTokenHeadCache(config=llama_config(layers=1), max_cache_len=16), [6])
    cache.crop(-2)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=1))
    assert int(loaded.get_seq_length()) == 4 and loaded.layers[0].capacity == 16
    # slots past the length are zeros in the loaded cache (the saved one still holds the cropped tokens there)
    assert not as_bytes(loaded.layers[0].key_data)[:, :, 4:].any()
    cache.reset()
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=1))
    assert loaded.layers[0].is_initialized and int(loaded.get_seq_length()) == 0


def test_load_onto_devices_and_mode_check(tmp_path):
    config = llama_config(layers=2)
    cache = fill(QuantizedPerTokenHeadCache(config=config, mode="fp8"), [4])
    path = tmp_path / "c.safetensors"
    cache.save(str(path))
    for device in ("cpu", torch.device("cpu"), ["cpu", torch.device("cpu")]):
        loaded = QuantizedPerTokenHeadCache.load(str(path), config=config, device=device, mode="fp8_per_token_head")
        assert [layer.device for layer in loaded.layers] == [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match="3 devices given for a cache of 2 layers"):
        QuantizedPerTokenHeadCache.load(path, config=config, device=["cpu"] * 3)
    with pytest.raises(ValueError, match="mode mismatch: expected int8_per_token_head, found fp8_per_token_head"):
        QuantizedPerTokenHeadCache.load(path, config=config, mode="int8")


def test_file_size_is_live_tokens_plus_a_small_header(tmp_path):
    # A preallocated cache filled to max_cache_len is the worst case: the file holds all the bytes the cache holds.
    config = llama_config(layers=4, heads=4, head_dim=128)
    cache = fill(QuantizedPerTokenHeadCache(config=config, max_cache_len=256), [200, 56], batch=2, heads=4,
                 head_dim=128)
    path = tmp_path / "full.safetensors"
    cache.save(path)
    assert os.path.getsize(path) <= 1.02 * cache.nbytes
    assert os.path.getsize(path) - cache.nbytes < 800 * len(cache.layers)  # the header
    # growable: the spare capacity is not written, so the file is smaller than what the cache holds
    grown = fill(QuantizedPerTokenHeadCache(config=config), [200, 56], batch=2, heads=4, head_dim=128)
    grown.save(path)
    assert grown.layers[0].capacity > 256
    assert cache.nbytes < os.path.getsize(path) <= 1.02 * cache.nbytes < grown.nbytes


def test_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    config = llama_config(layers=1)
    path = tmp_path / "c.safetensors"
    fill(QuantizedPerTokenHeadCache(config=config), [3]).save(path)
    before = path.read_bytes()

    def failing(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(persistence, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        fill(QuantizedPerTokenHeadCache(config=config), [9]).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no partial file left behind


# ---------------------------------------------------------------------------------------------------------------
# generation continued from a loaded cache
# ---------------------------------------------------------------------------------------------------------------


def tiny_llama(attn="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval().to(dtype)


def tiny_gemma3(attn="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256)
    config._attn_implementation = attn
    return Gemma3ForCausalLM(config).eval().to(dtype)


GENERATE_CASES = {
    # name: (model builder, attention, dtype, cache options)
    "llama_int8": (tiny_llama, "sdpa", torch.float32, dict(mode="int8")),
    "llama_fp8_bf16": (tiny_llama, "sdpa", torch.bfloat16, dict(mode="fp8")),
    "llama_max_cache_len": (tiny_llama, "sdpa", torch.float32, dict(mode="int8", max_cache_len=40)),
    "llama_hadamard": (tiny_llama, "sdpa", torch.float32, dict(mode="int8", hadamard=True)),
    "llama_hf_kvquant_attention": (tiny_llama, ATTENTION_NAME, torch.float32, dict(mode="fp8", hadamard=True)),
    "gemma3_int8": (tiny_gemma3, "sdpa", torch.float32, dict(mode="int8")),
    "gemma3_fp8_hadamard": (tiny_gemma3, "sdpa", torch.float32, dict(mode="fp8", hadamard=True)),
    "gemma3_max_cache_len": (tiny_gemma3, "sdpa", torch.float32, dict(mode="int8", max_cache_len=200)),
    "gemma3_hf_kvquant_attention": (tiny_gemma3, ATTENTION_NAME, torch.float32, dict(mode="int8")),
}


@pytest.mark.filterwarnings("ignore:hf_kvquant attention")
@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generation_from_loaded_cache_equals_generation_from_a_deep_copy(tmp_path, case):
    build, attn, dtype, options = GENERATE_CASES[case]
    model = build(attn, dtype)
    g = torch.Generator().manual_seed(1)
    # Gemma's prompt is long enough for its sliding layers (window 4) to give their memory back and drop tokens
    prompt = torch.randint(0, 128, (2, 170 if "gemma3" in case else 12), generator=g)
    kwargs = dict(do_sample=False, return_dict_in_generate=True, disable_compile=True)
    cache = QuantizedPerTokenHeadCache(config=model.config, **options)
    with torch.no_grad():
        first = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=cache, max_new_tokens=5,
                               min_new_tokens=5, **kwargs)
    assert cache.get_seq_length() == prompt.shape[1] + 4
    if "gemma3" in case and "max_cache_len" not in options:
        assert cache.layers[0].stored < cache.get_seq_length()  # the sliding layers dropped tokens
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=model.config)
    assert loaded.hands_over_quantized == cache.hands_over_quantized == (attn == ATTENTION_NAME)

    follow_up = torch.randint(0, 128, (2, 3), generator=g)
    seq = torch.cat([first.sequences, follow_up], dim=1)
    more = dict(max_new_tokens=6, min_new_tokens=6, output_logits=True, **kwargs)
    with torch.no_grad():
        from_loaded = model.generate(seq, attention_mask=torch.ones_like(seq), cache=loaded, **more)
        from_copy = model.generate(seq, attention_mask=torch.ones_like(seq), cache=copy.deepcopy(cache), **more)
    assert from_loaded.sequences.shape == (2, seq.shape[1] + 6)
    assert torch.equal(from_loaded.sequences, from_copy.sequences)
    for a, b in zip(from_loaded.logits, from_copy.logits):
        assert torch.equal(a, b)
    assert int(loaded.get_seq_length()) == from_loaded.sequences.shape[1] - 1


# ---------------------------------------------------------------------------------------------------------------
# corrupted, foreign and mismatched files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """(path, config) of a small saved hybrid cache: a sliding, a full and a dummy layer."""
    config = gemma_config(["sliding_attention", "full_attention", "sliding_attention"], 4)
    cache = fill(QuantizedPerTokenHeadCache(config=config, mode="int8"), [9, 1])
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    return path, config


def _header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_truncated_file_raises(saved, tmp_path):
    path, config = saved
    data = path.read_bytes()
    header_end = _header_length(data)
    cut = tmp_path / "cut.safetensors"
    lengths = [*range(0, header_end + 16), *range(header_end + 16, len(data), 97), len(data) - 1]
    messages = set()
    for length in lengths:
        cut.write_bytes(data[:length])
        with pytest.raises(ValueError) as excinfo:
            QuantizedPerTokenHeadCache.load(cut, config=config)
        messages.add(re.sub(r"\d+", "N", str(excinfo.value).replace(str(cut), "PATH")))
    print("\n".join(sorted(messages)))
    assert all("PATH is not a readable safetensors file" in m for m in messages)


def test_every_flipped_byte_is_caught(saved, tmp_path):
    path, config = saved
    data = path.read_bytes()
    header_end = _header_length(data)
    bad = tmp_path / "flipped.safetensors"
    # every byte of the header, both the low bit and the whole byte; every 7th byte of the data
    positions = [(i, x) for i in range(header_end) for x in (0x01, 0xFF)]
    positions += [(i, 0x01) for i in range(header_end, len(data), 7)] + [(len(data) - 1, 0x01)]
    kinds = {}
    for position, mask in positions:
        flipped = bytearray(data)
        flipped[position] ^= mask
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError) as excinfo:
            QuantizedPerTokenHeadCache.load(bad, config=config)
        message = str(excinfo.value).replace(str(bad), "PATH")
        kind = re.sub(r"layers\.\d\.|expected .*", "", message)  # one line per kind of error
        kinds.setdefault(kind[:110], position)
    print("\n".join(f"{position}: {kind}" for kind, position in sorted(kinds.items(), key=lambda kv: kv[1])))
    assert any("does not match its checksum" in k for k in kinds)


def test_corruption_messages(saved, tmp_path):
    """One example of each message (printed with -s, for the record)."""
    path, config = saved
    data = path.read_bytes()
    header_end = _header_length(data)
    cases = {}
    out = tmp_path / "x.safetensors"

    def message(content: bytes, **kwargs):
        out.write_bytes(content)
        with pytest.raises(ValueError) as excinfo:
            QuantizedPerTokenHeadCache.load(out, config=config, **kwargs)
        return str(excinfo.value)

    cases["truncated"] = message(data[: len(data) - 100])
    cases["truncated_header"] = message(data[: header_end // 2])
    header = bytearray(data)
    layers_at = data.index(b'"layers":') + 20
    header[layers_at] ^= 0x01
    cases["flipped_metadata_byte"] = message(bytes(header))
    header = bytearray(data)
    header[data.index(b'"dtype":"I8"') + 10] ^= 0x01  # I8 -> H8
    cases["flipped_tensor_info_byte"] = message(bytes(header))
    data_byte = bytearray(data)
    data_byte[header_end + 10] ^= 0x01
    cases["flipped_data_byte"] = message(bytes(data_byte))
    for name, text in cases.items():
        print(f"{name}: {text}")
    assert "not a readable safetensors file" in cases["truncated"]
    assert "header's checksum" in cases["flipped_metadata_byte"] or "malformed" in cases["flipped_metadata_byte"]
    assert "not a readable safetensors file" in cases["flipped_tensor_info_byte"]
    assert "does not match its checksum" in cases["flipped_data_byte"]


class _Payload:
    """Unpickling this creates a marker file: proof that the loader ran code from the file."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch_save", "torch_save_cache"])
def test_pickle_disguised_as_safetensors_is_refused_without_unpickling(tmp_path, writer):
    path = tmp_path / "cache.safetensors"
    marker = tmp_path / "unpickled"
    payload = _Payload()
    payload.marker = str(marker)
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"layers.0.key_data": payload}))
    elif writer == "torch_save":
        torch.save({"payload": payload, "layers.0.key_data": torch.zeros(1, 1, 1, 64, dtype=torch.int8)}, path)
    else:
        torch.save(fill(QuantizedPerTokenHeadCache(config=llama_config(layers=1)), [3]), path)
    with pytest.raises(ValueError, match="is not a readable safetensors file") as excinfo:
        QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=1))
    print(f"{writer}: {excinfo.value}")
    assert not marker.exists()


def test_other_safetensors_files_and_missing_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="not a saved QuantizedPerTokenHeadCache"):
        QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=1))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=1))
    with pytest.raises(FileNotFoundError):
        QuantizedPerTokenHeadCache.load(tmp_path / "missing.safetensors", config=llama_config(layers=1))


def _set(index, key, value):
    def edit(layers):
        layers[index][key] = value
    return edit


def _reshape(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    return edit


WELL_FORMED_BUT_WRONG = {
    # name: (write_variant kwargs, expected message fragment)
    "newer_version": (dict(format_version=3), "format version 3 by a newer hf_kvquant"),
    "wrong_shape_heads": (
        dict(edit_tensors=_reshape("layers.1.value_data", lambda t: t.repeat(1, 2, 1, 1))),
        "layer 1 tensor value_data shape mismatch: expected (2, 1, 10, 64), found (2, 2, 10, 64)"),
    "wrong_shape_tokens": (
        dict(edit_tensors=_reshape("layers.1.value_scale", lambda t: t[:, :, :-1].contiguous())),
        "layer 1 tensor value_scale shape mismatch: expected (2, 1, 10), found (2, 1, 9)"),
    "wrong_dtype": (
        dict(edit_tensors=_reshape("layers.0.key_scale", lambda t: t.half())),
        "layer 0 tensor key_scale dtype mismatch: expected torch.float32, found torch.float16"),
    "data_of_another_mode": (
        dict(edit_tensors=_reshape("layers.0.value_data", lambda t: t.view(torch.float8_e4m3fn))),
        "layer 0 tensor value_data dtype mismatch: expected torch.int8, found torch.float8_e4m3fn"),
    "missing_tensor": (
        dict(edit_tensors=lambda tensors: tensors.pop("layers.2.value_scale")),
        "missing ['layers.2.value_scale']"),
    "stored_disagrees": (dict(edit_layers=_set(1, "stored", 9)),
                         "layer 1 token count (stored vs cumulative_length) mismatch: expected 10, found 9"),
    "sliding_stored_too_few": (dict(edit_layers=_set(0, "stored", 2)),
                               "has 10 tokens seen and 2 stored; expected between 3 and 10 stored"),
    "unknown_dtype": (dict(edit_layers=_set(0, "dtype", "float64")), "layer 0 dtype 'float64' is not one of"),
    "unknown_mode": (dict(mode="int4_per_token_head"), "unknown KV-cache quantization mode 'int4_per_token_head'"),
    "negative_counter": (dict(edit_layers=_set(1, "cumulative_length", -1)), "layer 1 cumulative_length is -1"),
}


@pytest.mark.parametrize("case", list(WELL_FORMED_BUT_WRONG))
def test_well_formed_but_wrong_files_raise_naming_the_problem(saved, tmp_path, case):
    path, config = saved
    kwargs, fragment = WELL_FORMED_BUT_WRONG[case]
    bad = write_variant(path, tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(ValueError) as excinfo:
        QuantizedPerTokenHeadCache.load(bad, config=config)
    print(f"{case}: {excinfo.value}")
    assert fragment in str(excinfo.value)


def test_batch_sizes_that_disagree_between_layers_raise(saved, tmp_path):
    path, config = saved

    def edit(tensors):
        for name in [n for n in tensors if n.startswith("layers.1.")]:
            tensors[name] = tensors[name][:1].contiguous()

    bad = write_variant(path, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(ValueError, match=r"the layers disagree on the batch size: \[1, 2\]"):
        QuantizedPerTokenHeadCache.load(bad, config=config)


MISMATCHED_CONFIGS = {
    # name: (config, expected message fragment)
    "layer_count": (gemma_config(["sliding_attention", "full_attention"], 4),
                    "number of layers mismatch: expected 2 (the config's), found 3"),
    "layer_types": (gemma_config(["sliding_attention", "sliding_attention", "full_attention"], 4),
                    "layer 1 type mismatch: expected sliding_attention, found full_attention"),
    "sliding_window": (gemma_config(["sliding_attention", "full_attention", "sliding_attention"], 8),
                       "layer 0 sliding_window mismatch: expected 8, found 4"),
    "kv_heads": (gemma_config(["sliding_attention", "full_attention", "sliding_attention"], 4, heads=2),
                 "layer 0 kv heads (num_key_value_heads) mismatch: expected 2, found 1"),
    "head_dim": (gemma_config(["sliding_attention", "full_attention", "sliding_attention"], 4, head_dim=128),
                 "layer 0 head_dim mismatch: expected 128, found 64"),
    "llama_config": (llama_config(layers=3), "layer 0 type mismatch: expected full_attention, found sliding_attention"),
    "no_config": (None, "layer 0 is 'sliding_attention'; a cache built without a config has only full-attention"),
}


@pytest.mark.parametrize("case", list(MISMATCHED_CONFIGS))
def test_mismatched_config_raises_naming_expected_and_found(saved, case):
    path, _ = saved
    config, fragment = MISMATCHED_CONFIGS[case]
    with pytest.raises(ValueError) as excinfo:
        QuantizedPerTokenHeadCache.load(path, config=config)
    print(f"{case}: {excinfo.value}")
    assert fragment in str(excinfo.value)


def test_static_file_checked_against_max_cache_len(tmp_path):
    config = llama_config(layers=1)
    path = tmp_path / "c.safetensors"
    fill(QuantizedPerTokenHeadCache(config=config, max_cache_len=8), [6]).save(path)
    bad = write_variant(path, tmp_path / "bad.safetensors", max_cache_len=4)
    with pytest.raises(ValueError, match="holds 6 tokens, more than max_cache_len=4"):
        QuantizedPerTokenHeadCache.load(bad, config=config)
    fill(QuantizedPerTokenHeadCache(config=config), [6]).save(path)
    bad = write_variant(path, tmp_path / "bad.safetensors", max_cache_len=8)  # a growable file called preallocated
    with pytest.raises(ValueError, match="layer 0 length is None"):
        QuantizedPerTokenHeadCache.load(bad, config=config)


# ---------------------------------------------------------------------------------------------------------------
# faults: non-finite keys and values
# ---------------------------------------------------------------------------------------------------------------

FAULT_LAYOUTS = {
    "full": (None, None),
    "sliding": (gemma_config(["sliding_attention"], 6), None),
    "max_cache_len": (None, 32),
}


def _readback(kv):
    k, v = kv
    return k.float(), v.float()


@pytest.mark.parametrize("layout", list(FAULT_LAYOUTS))
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_key_or_value_stays_in_its_token_head(layout, mode, hadamard, dtype):
    config, max_cache_len = FAULT_LAYOUTS[layout]
    clean, faulty = (QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len,
                                                hadamard=hadamard) for _ in range(2))
    shape = (2, 3, 4, 64)
    prefill = tokens(shape, dtype, seed=5)
    for cache in (clean, faulty):
        cache.update(*prefill, 0)
    k, v = tokens(shape, dtype, seed=6)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[1, 0, 2, 5] = float("inf")  # row 1, head 0, the 3rd new token
    bad_v[0, 2, 1, 7] = float("nan")  # row 0, head 2, the 2nd new token
    want_k, want_v = _readback(clean.update(k, v, 0))
    got_k, got_v = _readback(faulty.update(bad_k, bad_v, 0))
    new_start = 4  # the new tokens follow the 4 of the prefill in every readback (a window of 6 shows them all)
    for want, got, (b, h, t) in ((want_k, got_k, (1, 0, 2)), (want_v, got_v, (0, 2, 1))):
        hit = torch.zeros(got.shape[:3], dtype=torch.bool)
        hit[b, h, new_start + t] = True
        assert got[hit].isnan().all()  # the whole token-head reads NaN...
        assert torch.equal(got[~hit], want[~hit])  # ...and nothing else moved
    layer_clean, layer_faulty = clean.layers[0], faulty.layers[0]
    slot = live_tokens(layer_faulty) - 4 + 2
    assert layer_faulty.key_scale[1, 0, slot] == float("inf")
    assert layer_faulty.value_scale[0, 2, slot - 1].isnan()
    # the next token reads the same, and the faulty token-heads still read NaN, alone
    k2, v2 = tokens((2, 3, 1, 64), dtype, seed=7)
    for want, got in zip(_readback(clean.update(k2, v2, 0)), _readback(faulty.update(k2, v2, 0))):
        nan = got.isnan()
        assert nan.sum() == 64 and nan.any(dim=-1).sum() == 1
        assert torch.equal(got[~nan], want[~nan])
    assert layer_clean.stored == layer_faulty.stored


def test_reference_quantizer_on_non_finite_rows():
    """What the numbers above come from: absmax inf -> scale inf -> every code x / inf = 0 (the inf itself: NaN), read
    back as code * inf = NaN; a NaN makes the absmax and the scale NaN. Other rows keep their own scale."""
    x = torch.randn(3, 64)
    x[0, 5], x[1, 9] = float("inf"), float("nan")
    for mode in MODES:
        q, scale = quantize_reference(x, mode)
        assert scale[0] == float("inf") and scale[1].isnan() and scale[2].isfinite()
        out = dequantize(q, scale, torch.float32)
        assert out[:2].isnan().all()
        clean_q, clean_scale = quantize_reference(x[2:], mode)
        assert torch.equal(out[2:], dequantize(clean_q, clean_scale, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# faults: an allocation failure while a layer grows
# ---------------------------------------------------------------------------------------------------------------


def _fail_nth_zeros(monkeypatch, n):
    """Make the ``n``-th call of ``torch.zeros`` (as hf_kvquant.cache.layer calls it) raise `torch.OutOfMemoryError`."""
    real = torch.zeros
    calls = {"count": 0, "failed": None}

    def zeros(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            calls["failed"] = torch.OutOfMemoryError("injected: cannot allocate")
            raise calls["failed"]
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)  # the torch every module of hf_kvquant.cache calls
    return calls


@pytest.mark.parametrize("nth", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["full", "sliding_compaction", "sliding_long_prefill", "static_first_update"])
def test_allocation_failure_while_growing_leaves_the_cache_unchanged(monkeypatch, layout, nth):
    mode = KVQuantMode.INT8_PER_TOKEN_HEAD
    sliding = gemma_config(["sliding_attention"], 4, heads=2)
    # (config, max_cache_len, tokens before, tokens of the update that allocates, slots it asks for)
    config, max_cache_len, prefill, count, slots = {
        "full": (None, None, 60, 70, storage.grown_capacity(130)),  # capacity 128 -> 208
        "sliding_compaction": (sliding, None, 60, 130, storage.grown_capacity(3 + 130)),  # keeps 3 of the 60
        "sliding_long_prefill": (sliding, None, 2, 300, storage.grown_capacity(302)),
        "static_first_update": (None, 64, 0, 5, 64),  # the whole buffer, at the first update
    }[layout]
    cache = QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len)
    if prefill:
        cache.update(*tokens((2, 2, prefill, 64)), 0)
    grow = tokens((2, 2, count, 64), seed=1)
    asked = 2 * 2 * 2 * slots * (64 + 4)  # keys and values, batch 2, 2 heads: codes and a float32 scale per slot
    before = state(cache)
    held = cache.nbytes
    calls = _fail_nth_zeros(monkeypatch, nth)
    with pytest.raises(torch.OutOfMemoryError) as excinfo:
        cache.update(*grow, 0)
    message = str(excinfo.value)
    print(f"{layout}, allocation {nth}: {message}")
    assert f"allocating {asked} bytes" in message and f"holds {held} bytes" in message
    assert excinfo.value.__cause__ is calls["failed"]
    monkeypatch.undo()
    if layout == "static_first_update":
        assert not cache.layers[0].is_initialized and cache.nbytes == 0
    else:
        assert_same_state(before, state(cache))
    # still usable: the same update now goes through and reads back what a cache that never failed reads
    twin = QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len)
    if prefill:
        twin.update(*tokens((2, 2, prefill, 64)), 0)
    want = twin.update(*grow, 0)
    got = cache.update(*grow, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_static_layer_length_allocation_failure_leaves_it_usable(monkeypatch):
    cache = QuantizedPerTokenHeadCache(max_cache_len=16)
    _fail_nth_zeros(monkeypatch, 5)
    with pytest.raises(torch.OutOfMemoryError):
        cache.update(*tokens((1, 1, 3, 64)), 0)
    monkeypatch.undo()
    cache.update(*tokens((1, 1, 3, 64)), 0)


def test_sliding_give_back_failure_leaves_the_update_whole(monkeypatch):
    cache = QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention"], 4))
    cache.update(*tokens((1, 1, 2, 64)), 0)
    _fail_nth_zeros(monkeypatch, 5)  # the 4 allocations of the growth pass, the give-back's first fails
    try:
        cache.update(*tokens((1, 1, 300, 64), seed=1), 0)
    except torch.OutOfMemoryError:
        assert cache.get_seq_length() == 2, "raised, but the tokens were stored"


def _fail_nth_call(monkeypatch, method: str, n: int):
    """Make the ``n``-th call of ``torch.Tensor.<method>`` raise `torch.OutOfMemoryError`."""
    real, calls = getattr(torch.Tensor, method), {"count": 0}

    def failing(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise torch.OutOfMemoryError("injected: cannot allocate")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, method, failing)


def test_failed_compaction_leaves_the_sliding_layer_unchanged(monkeypatch):
    cache = QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention"], 4))
    cache.update(*tokens((1, 1, 60, 64)), 0)  # 60 tokens in 128 slots; the next 70 fit after dropping 57
    before = state(cache)
    _fail_nth_call(monkeypatch, "clone", 3)
    with pytest.raises(torch.OutOfMemoryError):
        cache.update(*tokens((1, 1, 70, 64), seed=1), 0)
    monkeypatch.undo()
    assert_same_state(before, state(cache))


def test_failed_reorder_leaves_the_layer_unchanged(monkeypatch):
    cache = fill(QuantizedPerTokenHeadCache(config=llama_config(layers=1)), [5])
    before = state(cache)
    _fail_nth_call(monkeypatch, "index_select", 3)
    with pytest.raises(torch.OutOfMemoryError):
        cache.reorder_cache(torch.tensor([1, 0]))
    monkeypatch.undo()
    assert_same_state(before, state(cache))


def test_crop_refused_by_a_sliding_layer_changes_no_layer():
    cache = fill(QuantizedPerTokenHeadCache(config=gemma_config(["full_attention", "sliding_attention"], 4)), [200])
    before = state(cache)
    with pytest.raises(RuntimeError, match="no longer holds the tokens"):
        cache.crop(-3)
    assert_same_state(before, state(cache))


# ---------------------------------------------------------------------------------------------------------------
# any head size, and keys and values of different head sizes (MLA)
# ---------------------------------------------------------------------------------------------------------------


def _deepseek_config(layers=2, kv_lora_rank=32, qk_rope_head_dim=8):
    """A tiny DeepSeek-V3 config: its attention hands the cache one head of the ``kv_lora_rank`` latent as keys and
    one of the ``qk_rope_head_dim`` rotary part as values."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, q_lora_rank=None,
                            kv_lora_rank=kv_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=qk_rope_head_dim,
                            v_head_dim=16, vocab_size=128)


def _fill_mla(cache, steps, key_head_dim=32, value_head_dim=8, seed=0):
    for step, n in enumerate(steps):
        for index in range(len(cache.layers) or 2):
            key, _ = tokens((2, 1, n, key_head_dim), seed=seed + 10 * step + index)
            _, value = tokens((2, 1, n, value_head_dim), seed=seed + 10 * step + index + 5)
            cache.update(key, value, index)
    return cache


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
@pytest.mark.parametrize("max_cache_len", [None, 16])
def test_mla_round_trip_keeps_both_head_dims(tmp_path, mode, hadamard, max_cache_len):
    config = _deepseek_config()
    cache = _fill_mla(QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len,
                                                 hadamard=hadamard), [6, 1])
    path = tmp_path / "mla.safetensors"
    cache.save(path)
    for load_config in (config, None):  # without a config, the file's own (consistent) head dims
        loaded = QuantizedPerTokenHeadCache.load(path, config=load_config)
        assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))
        assert all(layer.head_dims == (32, 8) for layer in loaded.layers)
        original = copy.deepcopy(cache)
        _fill_mla(original, [2], seed=50)
        _fill_mla(loaded, [2], seed=50)
        assert_same_state(state(original, live_only=True), state(loaded, live_only=True))


MLA_MISMATCHES = {
    "kv_lora_rank": (_deepseek_config(kv_lora_rank=48),
                     "layer 0 key head_dim (kv_lora_rank) mismatch: expected 48, found 32"),
    "qk_rope_head_dim": (_deepseek_config(qk_rope_head_dim=16),
                         "layer 0 value head_dim (qk_rope_head_dim) mismatch: expected 16, found 8"),
    "not_mla": (llama_config(layers=2, head_dim=32), "layer 0 value head_dim mismatch: expected 32, found 8"),
}


@pytest.mark.parametrize("case", list(MLA_MISMATCHES))
def test_mla_file_checked_against_the_config(tmp_path, case):
    path = tmp_path / "mla.safetensors"
    _fill_mla(QuantizedPerTokenHeadCache(config=_deepseek_config()), [3]).save(path)
    config, fragment = MLA_MISMATCHES[case]
    with pytest.raises(ValueError) as excinfo:
        QuantizedPerTokenHeadCache.load(path, config=config)
    assert fragment in str(excinfo.value)


def test_value_tensor_of_another_head_dim_than_its_scale_says_is_refused(tmp_path):
    path = tmp_path / "mla.safetensors"
    _fill_mla(QuantizedPerTokenHeadCache(), [3]).save(path)

    def edit(tensors):
        tensors["layers.1.value_data"] = tensors["layers.1.value_data"][:, :, :2].contiguous()  # 2 tokens, not 3

    bad = write_variant(path, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(ValueError, match=r"layer 1 tensor value_data shape mismatch: expected \(2, 1, 3, 8\)"):
        QuantizedPerTokenHeadCache.load(bad)


def test_head_dim_80_round_trip(tmp_path):
    """phi-2's head_dim (hidden_size / heads = 80, no head_dim in the config), with the rotation of 80 channels."""
    from transformers import PhiConfig

    from hf_kvquant.rotation import hadamard_matrix

    config = PhiConfig(num_hidden_layers=2, hidden_size=160, num_attention_heads=2, intermediate_size=32,
                       vocab_size=128)
    cache = fill(QuantizedPerTokenHeadCache(config=config, hadamard=True), [5, 1], heads=2, head_dim=80)
    path = tmp_path / "phi.safetensors"
    cache.save(path)
    loaded = QuantizedPerTokenHeadCache.load(path, config=config)
    assert_same_state(state(cache, live_only=True), state(loaded, live_only=True))
    assert all(layer.rotation is hadamard_matrix(80) for layer in loaded.layers)
    with pytest.raises(ValueError, match="layer 0 head_dim mismatch: expected 64, found 80"):
        QuantizedPerTokenHeadCache.load(path, config=llama_config(layers=2, heads=2, head_dim=64))


# ---------------------------------------------------------------------------------------------------------------
# files written by an earlier version (tests/data/make_v1_files.py, format version 1) still load
# ---------------------------------------------------------------------------------------------------------------

DATA = os.path.join(os.path.dirname(__file__), "data")


def _v1_caches():
    """The caches of tests/data/make_v1_files.py, rebuilt the same way: name -> (config, cache)."""
    llama, gemma = llama_config(layers=2, head_dim=16), gemma_config(["sliding_attention", "full_attention"], 4,
                                                                      head_dim=16)
    recording = QuantizedPerTokenHeadCache(config=gemma, mode="int8")
    fill(recording, [3], batch=1, head_dim=16, seed=7)
    recording.layers[0].activate_past_recording()
    caches = {
        "growable_int8": (llama, QuantizedPerTokenHeadCache(config=llama, mode="int8"), [5, 1, 1]),
        "preallocated_fp8": (llama, QuantizedPerTokenHeadCache(config=llama, mode="fp8", max_cache_len=12), [4, 1]),
        "gemma3_sliding_int8": (gemma, QuantizedPerTokenHeadCache(config=gemma, mode="int8"), [6, 1, 1]),
        "gemma3_recording_int8": (gemma, recording, [2, 1]),
        "hadamard_fp8": (llama, QuantizedPerTokenHeadCache(config=llama, mode="fp8", hadamard=True), [4, 2]),
        # version 1 kept all 8 tokens of the sliding layer; today's ring keeps its window of 4, which goes on the same
        "gemma3_preallocated_int8": (gemma, QuantizedPerTokenHeadCache(config=gemma, mode="int8", max_cache_len=12),
                                     [6, 1, 1]),
    }
    return {name: (config, fill(cache, steps, batch=1, head_dim=16, seed=3))
            for name, (config, cache, steps) in caches.items()}


@pytest.mark.parametrize("name", ["growable_int8", "preallocated_fp8", "gemma3_sliding_int8", "gemma3_recording_int8",
                                  "hadamard_fp8", "gemma3_preallocated_int8"])
def test_files_of_format_version_1_still_load(name):
    config, expected = _v1_caches()[name]
    loaded = QuantizedPerTokenHeadCache.load(os.path.join(DATA, f"{name}.v1.safetensors"), config=config)
    assert (loaded.mode, loaded.hadamard, loaded.max_cache_len) == (expected.mode, expected.hadamard,
                                                                    expected.max_cache_len)
    assert_same_state(state(expected, live_only=True), state(loaded, live_only=True))
    assert [layer.is_sliding for layer in loaded.layers] == [layer.is_sliding for layer in expected.layers]
    assert [layer.get_mask_sizes(1) for layer in loaded.layers] == [layer.get_mask_sizes(1) for layer in
                                                                    expected.layers]
    # the loaded cache goes on as the original does: the same handed-over windows and the same state
    for index in range(len(expected.layers)):
        k, v = tokens((1, 1, 2, 16), seed=40 + index)
        for got, want in zip(loaded.update(k, v, index), expected.update(k, v, index)):
            assert torch.equal(got, want)
    assert_same_state(state(expected, live_only=True), state(loaded, live_only=True))
