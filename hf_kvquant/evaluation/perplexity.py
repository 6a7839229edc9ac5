"""Perplexity with the KV cache in the loop: what a cache costs in accuracy, on any causal LM.

Every window runs as one forward pass through a fresh cache, so with a quantized cache every token
attends to the *quantized* keys and values of its window, its own included (the cache hands
attention what it stored; see `hf_kvquant.quantized_kv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .caches import make_cache, parse_mode


def prefix_token_id(tokenizer) -> int:
    """The token put before a text so that its first token is predicted too: BOS, else EOS (lm-eval's choice)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to put before the text")
    return token


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """``[prefix_token_id] + tokens(text)`` as a 1-D tensor, cut to ``max_tokens`` (prefix included) if given.

    The text is tokenized without the tokenizer's own special tokens and gets exactly one prefix token, as
    lm-eval's ``loglikelihood_rolling`` does, so both score the same token sequence (Gemma's tokenizer would add
    its BOS anyway; SmolLM2's adds none, and its BOS then conditions the first text token).
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.cat([torch.tensor([prefix_token_id(tokenizer)], dtype=ids.dtype), ids])
    return ids if max_tokens is None else ids[:max_tokens]


@dataclass
class PerplexityResult:
    mode: str
    nll_sum: float  # natural-log negative log-likelihood summed over the scored tokens
    tokens: int  # tokens scored

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def perplexity(
    model,
    input_ids: torch.Tensor,
    mode=None,
    context_length: int = 1024,
    stride: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Token perplexity of ``input_ids`` (1-D) with sliding windows of ``context_length`` tokens moved by
    ``stride`` (default: ``context_length``, disjoint windows); each window scores only the tokens no earlier
    window scored, so with ``stride < context_length`` every scored token has at least
    ``context_length - stride`` tokens of context. ``mode`` is any name `parse_mode` accepts, or a `CacheMode` (for the
    Hadamard rotation: ``parse_mode("int8", hadamard=True)``)."""
    mode = parse_mode(mode)
    stride = context_length if stride is None else stride
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}]; got {stride}")
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"input_ids must be 1-D with at least 2 tokens; got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    total = input_ids.numel()
    nll_sum, scored, scored_until = 0.0, 0, 1  # the first token has no prediction
    starts = range(0, total - 1, stride)
    for begin in tqdm(starts, desc=f"perplexity {mode.name}", disable=not progress, leave=False):
        end = min(begin + context_length, total)
        window = input_ids[begin:end]
        logits = model(window[None], cache=make_cache(model, mode), use_cache=True).logits[0].float()
        # Position i predicts token begin + i + 1; score the targets from `scored_until` on (the first token of a
        # window has no context inside it, so disjoint windows leave it unscored).
        first = max(scored_until - begin - 1, 0)
        targets = window[first + 1 :]
        logprobs = torch.log_softmax(logits[first:-1], dim=-1)
        nll_sum -= logprobs.gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        scored_until = end
        if end == total:
            break
    return PerplexityResult(mode=mode.name, nll_sum=nll_sum, tokens=scored)
