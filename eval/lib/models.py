"""The random-weight models eval/bench_generate.py and eval/soak.py decode: the real configs of Llama-3.2-1B and
Llama-3.1-8B (weights do not change speed), their rows and memory budgets, and a 2-layer model for the CPU smoke runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lib.caches import CACHES, build_cache
from lib.decoding import decode, prefill, synchronize


@dataclass(frozen=True)
class Shape:
    model: str
    config: dict
    rows: tuple[tuple[int, int], ...]  # (batch, prompt tokens)
    budget_gib: float


_LLAMA3 = dict(rope_theta=500000.0, rms_norm_eps=1e-5, vocab_size=128256, max_position_embeddings=1 << 22)
SHAPES = {
    "1b": Shape("Llama-3.2-1B", dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                                     tie_word_embeddings=True),
                rows=((1, 2048), (8, 8192), (16, 32768)), budget_gib=40.0),
    "8b": Shape("Llama-3.1-8B", dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                                     tie_word_embeddings=False),
                rows=((1, 32768), (8, 16384)), budget_gib=60.0),
    # The CPU smoke run: the same code on a 2-layer model (head_dim 64, the smallest hf_kvquant supports).
    "tiny": Shape("tiny Llama (2 layers)", dict(_LLAMA3, vocab_size=1024, hidden_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                                intermediate_size=256, tie_word_embeddings=True),
                  rows=((1, 128), (2, 256)), budget_gib=4 / 1024),
}


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    """Random weights, created on ``device`` in ``dtype`` (no checkpoint, no copy through the host), then run once
    with each attention so that one-time allocations (cuBLAS workspaces and the like) are made before any
    measurement: they would otherwise count as the first cache's memory."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape.config), dtype=dtype).eval()
    ids = torch.zeros(1, 16, dtype=torch.long, device=device)
    for key in ("dynamic", "int8"):
        try:
            cache = build_cache(key, model)
            decode(model, cache, prefill(model, cache, ids), 1)
            synchronize(device)
        except Exception as error:  # noqa: BLE001 -- the rows of this cache will fail and say why; the others run
            print(f"warm-up of {CACHES[key][0]} failed: {type(error).__name__}: {error}")
    return model
