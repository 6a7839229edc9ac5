"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter (set before anything imports triton)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

WIKITEXT_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# The kernels' tests need Triton (a dependency on Linux); the package and the reference tests do not.
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")


def filled_buffers(batch, heads, capacity, head_dim, mode, device):
    """Cache buffers ``(key_data, key_scale, value_data, value_scale)`` filled with marker values (bytes 7, scales -1),
    so that a test can see which slots a write touched."""
    data = [torch.full((batch, heads, capacity, head_dim), 7, dtype=torch.uint8, device=device).view(mode.storage_dtype)
            for _ in range(2)]
    scales = [torch.full((batch, heads, capacity), -1.0, device=device) for _ in range(2)]
    return data[0], scales[0], data[1], scales[1]


# -- caches: small configs, tokens, and the state an operation that fails must leave as it was -------------------
# (transformers and hf_kvquant are imported inside: at this module's top they would import Triton before
# TRITON_INTERPRET is set)


def llama_config(layers=2, heads=1, head_dim=64, attn=None, **extra):
    """A tiny Llama config: ``heads`` KV heads, twice as many query heads."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=layers, hidden_size=2 * heads * head_dim, num_attention_heads=2 * heads,
        num_key_value_heads=heads, head_dim=head_dim, intermediate_size=32, vocab_size=128, **extra,
    )
    if attn is not None:
        config._attn_implementation = attn
        assert config._attn_implementation == attn
    return config


def gemma_config(layer_types, sliding_window, heads=1, head_dim=64, **extra):
    """A tiny Gemma 3 text config with the given ``layer_types`` (``"full_attention"`` / ``"sliding_attention"``)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        num_hidden_layers=len(layer_types), layer_types=list(layer_types), sliding_window=sliding_window,
        hidden_size=2 * heads * head_dim, num_attention_heads=2 * heads, num_key_value_heads=heads,
        head_dim=head_dim, intermediate_size=32, vocab_size=128, **extra,
    )


def tokens(shape, dtype=torch.float32, seed=0):
    """Keys and values ``shape = (batch, heads, n, head_dim)`` of mixed magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.exp(torch.randn(*shape[:3], 1, generator=g) * 2)
    return (torch.randn(*shape, generator=g) * mags).to(dtype), (torch.randn(*shape, generator=g) * mags).to(dtype)


def fill(cache, steps, batch=2, heads=1, head_dim=64, dtype=torch.float32, seed=0):
    """Forward passes of ``steps`` tokens each through every attention layer (layers a config makes exist, or
    ``len(cache.layers)`` lazily created ones)."""
    from hf_kvquant import QuantizedPerTokenHeadLayer

    count = len(cache.layers) or 2
    for step, n in enumerate(steps):
        for index in range(count):
            if index < len(cache.layers) and not isinstance(cache.layers[index], QuantizedPerTokenHeadLayer):
                continue  # a dummy layer
            cache.update(*tokens((batch, heads, n, head_dim), dtype, seed=1000 * seed + 10 * step + index), index)
    return cache


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """One-byte codes (int8, float8) as uint8: comparable with torch.equal (float8 has no CPU ops), NaN-free."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def live_tokens(layer) -> int:
    """Tokens a layer holds: of a preallocated one its length (a sliding one's ring, at most its window)."""
    from hf_kvquant import QuantizedPerTokenHeadStaticLayer

    return min(int(layer.length), layer.capacity) if isinstance(layer, QuantizedPerTokenHeadStaticLayer) else layer.stored


def state(cache, live_only=False):
    """Everything an operation that fails must leave as it was, of a cache or of one layer (``live_only``: what a round
    trip must keep: counters and the live slots, not the spare capacity or the addresses)."""
    from hf_kvquant import QuantizedPerTokenHeadLayer

    out = []
    for layer in getattr(cache, "layers", [cache]):
        if not isinstance(layer, QuantizedPerTokenHeadLayer):
            out.append(type(layer).__name__)
            continue
        entry = {
            "type": type(layer).__name__, "initialized": layer.is_initialized, "seq": int(layer.get_seq_length()),
            "stored": layer.stored, "cumulative_length": layer.cumulative_length,
            "sliding_window": getattr(layer, "sliding_window", None),
            "record_past": getattr(layer, "record_past", None),
            # where a rollback may go back to: it means something only while the layer records the past
            "rollback_base": getattr(layer, "_rollback_base", None) if getattr(layer, "record_past", False) else None,
            "mode": layer.mode, "hadamard": layer.hadamard,
        }
        if layer.is_initialized:
            n = live_tokens(layer)
            entry.update(dtype=layer.dtype, device=layer.device, length=n, shape=tuple(layer.key_data.shape[:2]))
            entry["live"] = [as_bytes(t)[:, :, :n].clone() for t in layer.buffers]
            if not live_only:
                entry.update(capacity=layer.capacity, ptrs=[t.data_ptr() for t in layer.buffers],
                             all=[as_bytes(t).clone() for t in layer.buffers])
        out.append(entry)
    return out


def assert_same_state(a, b):
    """``a`` and ``b`` (from `state`) are the same, tensors bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, str) or isinstance(y, str):
            assert x == y
            continue
        assert x.keys() == y.keys()
        for key in x:
            if key in ("live", "all"):
                assert len(x[key]) == len(y[key])
                for t, u in zip(x[key], y[key]):
                    assert t.dtype == u.dtype and torch.equal(t, u), key
            else:
                assert x[key] == y[key], key


def _load(name: str):
    from hf_kvquant.evaluation import load_model

    try:
        return load_model(name, dtype=torch.float32)
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise  # CI installs the models: a missing one is a broken install, not a skip
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32, CPU."""
    return _load("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of the real Gemma-3-270M (hybrid sliding window), float32, CPU."""
    return _load("gemma3")


@pytest.fixture(scope="session")
def wikitext() -> str:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"WikiText-2 test file not found at {WIKITEXT_TEST}")
    return WIKITEXT_TEST.read_text(encoding="utf-8")
