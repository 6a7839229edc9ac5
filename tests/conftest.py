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
