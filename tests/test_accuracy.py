"""Teacher-forced accuracy on WikiText-2 with the quantized cache in the loop (real SmolLM2-135M, float32, CPU).

The first 2048 tokens of the WikiText-2 test text go through the model as one sequence: a 256-token prefill, then
chunks of 64 tokens. Every token therefore attends to the stored (quantized) keys/values of all earlier chunks and
to its own chunk's tokens, which `update` also hands back quantized. The same chunking runs with DynamicCache
(unquantized), INT8 and FP8 caches, in lockstep, and each quantized run's next-token distributions are compared
with the unquantized ones at every position.

A cheaper second check holds the Hadamard-rotated cache (``hadamard=True``) against the plain one of the same mode, on
the same positions.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from hf_kvquant import QuantizedPerTokenHeadCache
from hf_kvquant.evaluation import make_cache, parse_mode

N_TOKENS = 2048
PREFILL = 256
CHUNK = 64

MAX_MEAN_KL = {"int8_per_token_head": 0.0015, "fp8_per_token_head": 0.008}
MIN_TOP1 = {"int8_per_token_head": 0.97, "fp8_per_token_head": 0.945}
MODES = list(MAX_MEAN_KL)


@pytest.fixture(scope="module")
def wikitext_metrics(smollm2, wikitext):
    """Per mode: mean KL(unquantized || quantized), top-1 agreement, and the perplexities of all runs."""
    model, tok = smollm2
    ids = tok(wikitext[: 8 * N_TOKENS], return_tensors="pt").input_ids[:, :N_TOKENS]
    assert ids.shape[1] == N_TOKENS, "not enough WikiText-2 text"
    caches = {"dynamic": DynamicCache(config=model.config)}
    caches.update({mode: QuantizedPerTokenHeadCache(config=model.config, mode=mode) for mode in MODES})
    kl_sum = dict.fromkeys(MODES, 0.0)
    agree = dict.fromkeys(MODES, 0)
    nll_sum = dict.fromkeys(caches, 0.0)
    positions = 0
    bounds = [0, PREFILL] + list(range(PREFILL + CHUNK, N_TOKENS, CHUNK)) + [N_TOKENS]
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            # Positions start..end-1 predict tokens start+1..end (the last token of the text predicts nothing).
            targets = ids[0, start + 1 : end + 1]
            logprobs = {}
            for name, cache in caches.items():
                logits = model(ids[:, start:end], cache=cache, use_cache=True).logits[0, : len(targets)]
                logprobs[name] = logits.double().log_softmax(-1)
                assert torch.isfinite(logprobs[name]).all(), f"{name}: non-finite log-probs in tokens {start}-{end}"
                nll_sum[name] -= float(logprobs[name].gather(-1, targets[:, None]).sum())
            ref = logprobs["dynamic"]
            for mode in MODES:
                kl_sum[mode] += float((ref.exp() * (ref - logprobs[mode])).sum(-1).sum())
                agree[mode] += int((ref.argmax(-1) == logprobs[mode].argmax(-1)).sum())
            positions += len(targets)
    for name, cache in caches.items():
        assert cache.get_seq_length() == N_TOKENS, name
    assert positions == N_TOKENS - 1
    ppl = {name: math.exp(nll / positions) for name, nll in nll_sum.items()}
    metrics = {
        mode: {"kl": kl_sum[mode] / positions, "top1": agree[mode] / positions, "ppl": ppl[mode],
               "ppl_ref": ppl["dynamic"], "positions": positions}
        for mode in MODES
    }
    print(f"\nWikiText-2, SmolLM2-135M float32, {positions} positions (prefill {PREFILL}, chunks {CHUNK}); "
          f"unquantized perplexity {ppl['dynamic']:.3f}")
    for mode, m in metrics.items():
        print(f"  {mode}: mean KL {m['kl']:.5f}, top-1 agreement {m['top1']:.2%}, perplexity {m['ppl']:.3f}")
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_wikitext_teacher_forced_accuracy(wikitext_metrics, mode):
    m = wikitext_metrics[mode]
    figures = (f"{mode} on {m['positions']} WikiText-2 positions: mean KL {m['kl']:.5f} (limit {MAX_MEAN_KL[mode]}), "
               f"top-1 agreement {m['top1']:.2%} (limit {MIN_TOP1[mode]:.1%}), perplexity {m['ppl']:.3f} "
               f"vs unquantized {m['ppl_ref']:.3f}")
    assert m["kl"] <= MAX_MEAN_KL[mode], figures
    assert m["top1"] >= MIN_TOP1[mode], figures


# -- the Hadamard rotation: at least as accurate as the plain cache of the same mode ------------------------------

# 4 windows of 256 WikiText-2 tokens, one batched forward pass per cache (prefill: every token attends to the
# quantized keys/values of its window, its own included).
ROTATION_WINDOWS, ROTATION_WINDOW = 4, 256
# Mean KL of the rotated cache <= this x the plain cache's, on the same positions. Measured (torch 2.13 CPU):
# INT8 0.000209 vs 0.000858 (0.24 x), FP8 0.00476 vs 0.00541 (0.88 x); on 4 x 512 tokens 0.30 x and 0.81 x.
# A rotation that is not applied gives 1.0 x (INT8 fails); one that is not undone gives garbage (both fail).
MAX_ROTATED_KL_RATIO = {"int8_per_token_head": 0.5, "fp8_per_token_head": 1.0}
# Top-1 agreement of the rotated cache >= the plain cache's minus this. Each cache disagrees with the reference on the
# near-ties its rounding flips (FP8: about 4 % of the 1024 positions, ~40), and which ones flip moves with the CPU's
# float rounding: the two counts differ by noise of about sqrt(40 + 40) ~ 9 positions (0.9 points) when the rotation
# changes nothing. Measured: +0.88 and +0.0 points on one CPU, -0.8 points (FP8) on another. The limit is two standard
# deviations of that noise; the KL bound above is the test of accuracy, this one catches a rotation that breaks top-1.
MAX_ROTATED_TOP1_LOSS = 0.02


@pytest.fixture(scope="module")
def rotation_metrics(smollm2, wikitext):
    """Per cache name (``mode`` and ``mode+hadamard``): mean KL(unquantized || cache) and top-1 agreement."""
    model, tok = smollm2
    n = ROTATION_WINDOWS * ROTATION_WINDOW
    ids = tok(wikitext[: 8 * n], return_tensors="pt").input_ids[0, :n].view(ROTATION_WINDOWS, ROTATION_WINDOW)
    metrics = {}
    with torch.no_grad():
        ref = model(ids, cache=DynamicCache(config=model.config), use_cache=True).logits.double().log_softmax(-1)
        for cache_mode in [parse_mode(mode, hadamard) for mode in MODES for hadamard in (False, True)]:
            name = cache_mode.name
            cache = make_cache(model, cache_mode)
            assert cache.hadamard == cache_mode.hadamard
            logprobs = model(ids, cache=cache, use_cache=True).logits.double().log_softmax(-1)
            assert torch.isfinite(logprobs).all(), name
            metrics[name] = {
                "kl": float((ref.exp() * (ref - logprobs)).sum(-1).mean()),
                "top1": float((ref.argmax(-1) == logprobs.argmax(-1)).double().mean()),
            }
    print(f"\nWikiText-2, SmolLM2-135M float32, {ROTATION_WINDOWS} windows of {ROTATION_WINDOW} tokens:")
    for name, m in metrics.items():
        print(f"  {name}: mean KL {m['kl']:.6f}, top-1 agreement {m['top1']:.2%}")
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_hadamard_rotation_at_least_as_accurate(rotation_metrics, mode):
    plain, rotated = rotation_metrics[mode], rotation_metrics[parse_mode(mode, hadamard=True).name]
    figures = (f"{mode}: mean KL {rotated['kl']:.6f} rotated vs {plain['kl']:.6f} plain "
               f"(limit {MAX_ROTATED_KL_RATIO[mode]} x), top-1 agreement {rotated['top1']:.2%} vs {plain['top1']:.2%}")
    assert 0 < rotated["kl"] <= MAX_ROTATED_KL_RATIO[mode] * plain["kl"], figures
    assert rotated["top1"] >= plain["top1"] - MAX_ROTATED_TOP1_LOSS, figures
