"""`model.generate` with `QuantizedPerTokenHeadCache` on the real models (CPU, float32, sdpa attention).

SmolLM2-135M-Instruct (Llama architecture, full attention everywhere) covers the decoding strategies; Gemma-3-270M
covers the hybrid sliding-window layers past their 512-token window.

Greedy text is not required to equal DynamicCache's: quantization rounding can flip a near-tie, after which the two
texts legitimately part ways. What is compared instead are next-token distributions (KL divergence) on the same
token sequence, and exact tokens only where both runs feed the model the same chunks (reused vs hand-fed cache,
assisted vs plain greedy) or over the first few tokens.

Two quantized runs that split the input differently (e.g. a reused prefix cache vs one fresh prefill) are not
bit-identical: float noise of differently shaped matmuls flips a few roundings (an FP8 step is 1/16 to 1/8 of the
value), and the flips propagate through the layers. Such comparisons are therefore bounded by the quantization
error itself, not by float-noise tolerances.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.generation import GenerationMode
from transformers.generation.utils import GENERATION_MODES_MAPPING

import hf_kvquant
from hf_kvquant import QuantizedPerTokenHeadCache, kv_cache_nbytes

MODES = ["int8_per_token_head", "fp8_per_token_head"]
# Mean KL(unquantized || quantized) of next-token distributions, as in test_accuracy.py.
MEAN_KL_LIMIT = {"int8_per_token_head": 0.0015, "fp8_per_token_head": 0.008}
# Per position, where both runs quantize the same keys/values up to float noise (batched vs alone, ...).
SAME_NUMBERS_KL_LIMIT = 5e-3
GEMMA_MEAN_KL_LIMIT = 0.02

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what photosynthesis is.",
]


# -- helpers -----------------------------------------------------------------------------------------------------


def _qcache(model, mode, **kwargs) -> QuantizedPerTokenHeadCache:
    return QuantizedPerTokenHeadCache(config=model.config, mode=mode, **kwargs)


def _chat_ids(tok, text: str) -> torch.Tensor:
    messages = [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def _wiki_ids(tok, wikitext: str, n_tokens: int, offset_chars: int = 0) -> torch.Tensor:
    ids = tok(wikitext[offset_chars : offset_chars + 8 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens, "not enough WikiText for the prompt"
    return ids


def _generate(model, ids, cache=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    if cache is not None:
        kwargs["cache"] = cache
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) over the last dimension, in float64."""
    p = ref_logits.double().log_softmax(-1)
    q = logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def _teacher_forced_logits(model, seq: torch.Tensor, prompt_len: int, cache, chunks=(1,)) -> torch.Tensor:
    """Prefill ``seq[:, :prompt_len]`` into ``cache``, then feed the rest in chunks (sizes cycling through ``chunks``).

    Returns the logits ``[batch, seq_len - prompt_len, vocab]`` that predict ``seq[:, prompt_len:]``.
    """
    out = model(seq[:, :prompt_len], cache=cache, use_cache=True)
    logits = [out.logits[:, -1:].float()]
    pos, i = prompt_len, 0
    while pos < seq.shape[1] - 1:
        end = min(pos + chunks[i % len(chunks)], seq.shape[1] - 1)
        out = model(seq[:, pos:end], cache=cache, use_cache=True)
        logits.append(out.logits.float())
        pos, i = end, i + 1
    return torch.cat(logits, dim=1)


def _first_divergence(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first position where 1-D token tensors differ (their common length if none)."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return n if len(diff) == 0 else int(diff[0])


def _assert_same_numbers(logits_a, logits_b, tokens_a, tokens_b, min_positions: int, what: str):
    """Both runs quantize the same keys/values (up to float noise): per-position KL small up to the first token
    divergence, which must not come before ``min_positions``."""
    n = _first_divergence(tokens_a, tokens_b)
    # The logits of position n are still comparable (they produced the divergent tokens).
    n_cmp = min(n + 1, len(logits_a), len(logits_b))
    assert n_cmp >= min_positions, (
        f"{what}: tokens diverge at position {n} (< {min_positions}): {tokens_a.tolist()} vs {tokens_b.tolist()}"
    )
    kl = _kl(torch.stack(logits_a[:n_cmp]), torch.stack(logits_b[:n_cmp]))
    assert torch.isfinite(kl).all(), f"{what}: non-finite KL {kl.tolist()}"
    assert kl.max() <= SAME_NUMBERS_KL_LIMIT, f"{what}: per-position KL {kl.tolist()} > {SAME_NUMBERS_KL_LIMIT}"
    return n, kl


# -- greedy --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_greedy_shape_seq_length_and_bytes(smollm2, wikitext, mode):
    model, tok = smollm2
    ids = _wiki_ids(tok, wikitext, 300)
    new = 16
    dyn = DynamicCache(config=model.config)
    out_d = _generate(model, ids, dyn, max_new_tokens=new, min_new_tokens=new)
    cache = _qcache(model, mode)
    out_q = _generate(model, ids, cache, max_new_tokens=new, min_new_tokens=new)

    assert out_q.shape == out_d.shape == (1, ids.shape[1] + new)
    assert torch.equal(out_q[:, : ids.shape[1]], ids)
    assert ((out_q >= 0) & (out_q < model.config.vocab_size)).all()
    assert cache.get_seq_length() == dyn.get_seq_length()
    assert cache.get_seq_length() == ids.shape[1] + new - 1
    assert len(cache.layers) == model.config.num_hidden_layers
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == dyn.get_seq_length(layer_idx)
        assert layer.stored == layer.get_seq_length()

    # Bytes: float32 DynamicCache holds 4 bytes per value; ours 1 byte per value plus a float32 scale per
    # token-head, on a capacity that stays within ~1.6 % (+80 tokens) of the stored tokens.
    dyn_bytes = kv_cache_nbytes(dyn)
    _, heads, _, head_dim = cache.layers[0].key_data.shape
    assert dyn_bytes == 2 * model.config.num_hidden_layers * heads * dyn.get_seq_length() * head_dim * 4  # float32
    assert kv_cache_nbytes(cache) == cache.nbytes
    expected = 0
    for layer in cache.layers:
        assert layer.stored <= layer.capacity <= layer.stored * (1 + 1 / 64) + 80, layer
        expected += 2 * heads * layer.capacity * (head_dim + 4)
    assert cache.nbytes == expected
    assert cache.nbytes < dyn_bytes, f"quantized {cache.nbytes} B >= DynamicCache {dyn_bytes} B"
    tokens = cache.get_seq_length()
    bound = dyn_bytes * (head_dim + 4) / (4 * head_dim) * (1 + 1 / 64 + 80 / tokens)
    assert cache.nbytes <= bound, f"quantized {cache.nbytes} B > {bound:.0f} B (DynamicCache {dyn_bytes} B)"
    print(f"\n[{mode}] {tokens} tokens: quantized {cache.nbytes} B vs DynamicCache {dyn_bytes} B "
          f"({cache.nbytes / dyn_bytes:.3f})")


# A greedy divergence is excused only where DynamicCache itself nearly ties: its log-probabilities of its own pick
# and of the quantized run's pick differ by at most this (nats).
NEAR_TIE_NATS = 0.1


@pytest.mark.slow
def test_int8_greedy_first_tokens_match_dynamic(smollm2):
    model, tok = smollm2
    prompts = CHAT_PROMPTS + ["Give me three tips for staying healthy."]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    full_matches, report = 0, []
    for prompt in prompts:
        ids = _chat_ids(tok, prompt)
        out_d = _generate(model, ids, DynamicCache(config=model.config), **kwargs)
        out_q = _generate(model, ids, _qcache(model, "int8_per_token_head"), **kwargs)
        gen_d, gen_q = out_d.sequences[0, ids.shape[1]:], out_q.sequences[0, ids.shape[1]:]
        n = _first_divergence(gen_d, gen_q)
        report.append(f"{prompt!r}: INT8 {tok.decode(gen_q)!r} vs DynamicCache {tok.decode(gen_d)!r}")
        if n == 5:
            full_matches += 1
            continue
        # Same prefix up to n, so DynamicCache's logits at n describe the same context: was it a near-tie?
        logp = out_d.logits[n][0].double().log_softmax(-1)
        gap = float(logp[gen_d[n]] - logp[gen_q[n]])
        assert gap <= NEAR_TIE_NATS, (
            f"greedy diverged at token {n} without a near-tie (gap {gap:.3f} nats): {report[-1]}"
        )
        report[-1] += f" (near-tie at token {n}: {gap:.3f} nats)"
    print("\n" + "\n".join(report))
    assert full_matches >= len(prompts) - 1, "\n".join(report)


@pytest.fixture(scope="module")
def smollm2_wiki_continuations(smollm2, wikitext):
    """Three 300-token WikiText prompts, DynamicCache's greedy continuations (24 tokens) and the DynamicCache logits
    of those sequences fed back token by token."""
    model, tok = smollm2
    out = []
    for offset in (0, 20000, 40000):
        ids = _wiki_ids(tok, wikitext, 300, offset_chars=offset)
        seq = _generate(model, ids, DynamicCache(config=model.config), max_new_tokens=24, min_new_tokens=24)
        ref = _teacher_forced_logits(model, seq, ids.shape[1], DynamicCache(config=model.config))
        out.append((ids.shape[1], seq, ref))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_teacher_forced_distributions_match_dynamic(smollm2, smollm2_wiki_continuations, mode):
    """DynamicCache's greedy continuations of WikiText prompts, fed back one token per forward pass (the decode
    path) with the quantized cache: next-token distributions within the WikiText accuracy budget."""
    model, _ = smollm2
    kls, agree, total = [], 0, 0
    for prompt_len, seq, ref in smollm2_wiki_continuations:
        got = _teacher_forced_logits(model, seq, prompt_len, _qcache(model, mode))
        assert torch.isfinite(got).all()
        kls.append(_kl(ref, got).flatten())
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[1]
    kl = torch.cat(kls)
    msg = f"[{mode}] teacher-forced generation: mean KL {kl.mean():.5f}, max KL {kl.max():.5f}, top-1 {agree}/{total}"
    print("\n" + msg)
    assert kl.mean() <= MEAN_KL_LIMIT[mode], msg


# -- sampling ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sampling(smollm2, mode):
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[1])
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        cache = _qcache(model, mode)
        out = _generate(model, ids, cache, do_sample=True, top_k=50, temperature=1.0, max_new_tokens=12,
                        min_new_tokens=12)
        assert out.shape == (1, ids.shape[1] + 12)
        assert ((out >= 0) & (out < model.config.vocab_size)).all()
        assert cache.get_seq_length() == out.shape[1] - 1
        runs.append(out)
    assert torch.equal(runs[0], runs[1]), "same seed, same cache mode: sampling must be reproducible"


@pytest.mark.slow
def test_sampling_num_return_sequences(smollm2):
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[1])
    torch.manual_seed(0)
    cache = _qcache(model, "int8_per_token_head")
    out = _generate(model, ids, cache, do_sample=True, num_return_sequences=3, max_new_tokens=10, min_new_tokens=10)
    assert out.shape == (3, ids.shape[1] + 10)
    assert (out[:, : ids.shape[1]] == ids).all()
    assert ((out >= 0) & (out < model.config.vocab_size)).all()
    assert cache.layers[0].key_data.shape[0] == 3  # the prompt's cache rows were expanded to the 3 sequences
    assert cache.get_seq_length() == out.shape[1] - 1
    assert len({tuple(row) for row in out[:, ids.shape[1]:].tolist()}) > 1, "3 samples, all identical"


@pytest.mark.slow
def test_contrastive_search(smollm2):
    if "/" in GENERATION_MODES_MAPPING[GenerationMode.CONTRASTIVE_SEARCH]:
        pytest.skip(
            "transformers moved contrastive search out of core into a Hub custom_generate repo "
            f"({GENERATION_MODES_MAPPING[GenerationMode.CONTRASTIVE_SEARCH]}); nothing to test offline"
        )
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[0])
    cache = _qcache(model, "int8_per_token_head")
    out = _generate(model, ids, cache, penalty_alpha=0.6, top_k=4, max_new_tokens=8, min_new_tokens=8)
    assert out.shape == (1, ids.shape[1] + 8)


# -- the cache keyword ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("config", [True, False], ids=["with_config", "no_config"])
def test_past_key_values_and_cache_keywords(smollm2, config):
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[0])
    outs, caches = [], []
    for keyword in ("past_key_values", "cache"):
        cache = QuantizedPerTokenHeadCache(config=model.config if config else None, mode="int8_per_token_head")
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                return_dict_in_generate=True, **{keyword: cache},
            )
        assert out.cache is cache, f"{keyword}=: generate returned another cache object"
        assert cache.get_seq_length() == out.sequences.shape[1] - 1, keyword
        assert len(cache.layers) == model.config.num_hidden_layers
        assert all(layer.stored == cache.get_seq_length() for layer in cache.layers)
        assert cache.nbytes > 0
        outs.append(out.sequences)
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    # The model's forward takes both keywords too.
    for keyword in ("past_key_values", "cache"):
        cache = QuantizedPerTokenHeadCache(config=model.config if config else None, mode="int8_per_token_head")
        with torch.no_grad():
            out = model(ids, use_cache=True, **{keyword: cache})
        assert cache.get_seq_length() == ids.shape[1] and cache.layers[0].stored == ids.shape[1], keyword
        assert torch.isfinite(out.logits).all()
    for a, b in zip(caches[0].layers, caches[1].layers):
        n = a.stored
        assert torch.equal(a.key_data[:, :, :n].view(torch.uint8), b.key_data[:, :, :n].view(torch.uint8))
        assert torch.equal(a.value_scale[:, :, :n], b.value_scale[:, :, :n])


# -- batches, beams ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_matches_rows_alone(smollm2, wikitext, mode):
    model, tok = smollm2
    texts = [
        "The capital of France is",
        "Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on",
        wikitext[:400],
    ]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and (batch.attention_mask[:, 0] == 0).any(), "prompts must be left-padded"
    new = 12
    kwargs = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=tok.pad_token_id)
    cache = _qcache(model, mode)
    with torch.no_grad():
        batched = model.generate(**batch, cache=cache, **kwargs)
    assert cache.get_seq_length() == batch.input_ids.shape[1] + new - 1
    assert cache.layers[0].key_data.shape[0] == 3
    for row, text in enumerate(texts):
        ids = tok(text, return_tensors="pt").input_ids
        assert torch.equal(ids[0], batch.input_ids[row, -ids.shape[1]:])
        with torch.no_grad():
            alone = model.generate(ids, attention_mask=torch.ones_like(ids), cache=_qcache(model, mode),
                                   **kwargs)
        n, kl = _assert_same_numbers(
            [step[row] for step in batched.logits], [step[0] for step in alone.logits],
            batched.sequences[row, batch.input_ids.shape[1]:], alone.sequences[0, ids.shape[1]:],
            min_positions=6, what=f"row {row}",
        )
        print(f"\n[{mode}] row {row}: {n} identical tokens, max KL {kl.max():.2e}")


@pytest.mark.slow
def test_beam_search(smollm2):
    """num_beams=3: each beam's score must be the log-probability of its tokens under a fresh quantized cache (which
    it is only if `reorder_cache` moves each beam's own keys/values along), and the best score must be close to
    DynamicCache's best (a near-tie may swap the winning beam, but not change the best score by much)."""
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[0])
    new = 10
    kwargs = dict(num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                  length_penalty=0.0, early_stopping=True, return_dict_in_generate=True, output_scores=True)
    cache = _qcache(model, "int8_per_token_head")
    with torch.no_grad():
        beam_q = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, **kwargs)
        beam_d = model.generate(ids, attention_mask=torch.ones_like(ids), cache=DynamicCache(config=model.config),
                                **kwargs)
    assert beam_q.sequences.shape == beam_d.sequences.shape == (3, ids.shape[1] + new)
    assert cache.get_seq_length() == ids.shape[1] + new - 1
    # The beams were actually reordered during the search (otherwise reorder_cache is not exercised).
    assert (beam_q.beam_indices[:, :new] != torch.arange(3)[:, None]).any()

    # Not float32 accumulation (with DynamicCache the two sums agree within 1.1e-5 over the 10 tokens): the beams ran at
    # batch 3, the check at batch 1, so the keys/values were computed by differently shaped matmuls, whose float noise
    # flips a few INT8 roundings; the flips propagate through the layers. Both runs quantize the same numbers up to
    # float noise, so each position's next-token distributions are within SAME_NUMBERS_KL_LIMIT of each other, and a
    # token's log-prob moves by about sqrt(2 * KL) at most: over `new` tokens, new * sqrt(2 * 5e-3) = 1.0 nat.
    # Measured: 0.003-0.13 nat (two CPUs); a beam fed another beam's keys/values (reorder_cache a no-op) misses by
    # 7.7-13 nats.
    score_tolerance = new * (2 * SAME_NUMBERS_KL_LIMIT) ** 0.5
    for row in range(3):
        seq = beam_q.sequences[row : row + 1]
        logits = _teacher_forced_logits(model, seq, ids.shape[1], _qcache(model, "int8_per_token_head"))
        logp = logits[0].log_softmax(-1).gather(-1, seq[0, ids.shape[1]:, None]).sum()
        assert abs(float(logp) - float(beam_q.sequences_scores[row])) <= score_tolerance, (
            f"beam {row}: score {float(beam_q.sequences_scores[row]):.4f} but its tokens' log-prob is {float(logp):.4f}"
        )
    # Against DynamicCache: the two best beams are among each other's three (a near-tie may swap the order of
    # beams), and the best scores differ by at most sqrt(2 * KL budget) nats per token (the typical log-prob shift
    # of a token at the INT8 KL budget), summed over the generated tokens.
    rows_q = [tuple(r) for r in beam_q.sequences.tolist()]
    rows_d = [tuple(r) for r in beam_d.sequences.tolist()]
    best_q, best_d = float(beam_q.sequences_scores[0]), float(beam_d.sequences_scores[0])
    msg = (f"beam: INT8 best {best_q:.4f} {tok.decode(beam_q.sequences[0, ids.shape[1]:])!r}, "
           f"DynamicCache best {best_d:.4f} {tok.decode(beam_d.sequences[0, ids.shape[1]:])!r}")
    print("\n" + msg)
    assert rows_q[0] in rows_d and rows_d[0] in rows_q, msg
    assert abs(best_q - best_d) <= new * (2 * MEAN_KL_LIMIT["int8_per_token_head"]) ** 0.5, msg


# -- assisted decoding ---------------------------------------------------------------------------------------------


def _count_rollbacks(cache):
    calls = []
    original = cache.crop

    def crop(tokens_to_remove):
        calls.append(tokens_to_remove)
        return original(tokens_to_remove)

    cache.crop = crop
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_matches_greedy(smollm2, assist):
    model, tok = smollm2
    # Repetitive text: prompt lookup finds candidates, some of which the model rejects (crop of the cache).
    ids = tok(
        "Alice has a red ball. Bob has a blue ball. Carol has a green ball. Alice has a red ball. Bob has a",
        return_tensors="pt",
    ).input_ids
    new = 12
    plain = _generate(model, ids, _qcache(model, "int8_per_token_head"), max_new_tokens=new, min_new_tokens=new)
    cache = _qcache(model, "int8_per_token_head")
    rollbacks = _count_rollbacks(cache)
    extra = {"prompt_lookup_num_tokens": 3} if assist == "prompt_lookup" else {"assistant_model": model}
    assisted = _generate(model, ids, cache, max_new_tokens=new, min_new_tokens=new, **extra)
    assert rollbacks, "assisted decoding never called crop on the target cache"
    if assist == "prompt_lookup":
        assert any(n < 0 for n in rollbacks), f"no rejected candidate was rolled back: crops {rollbacks}"
    assert assisted[:, : ids.shape[1] + 10].tolist() == plain[:, : ids.shape[1] + 10].tolist(), (
        f"assisted {tok.decode(assisted[0, ids.shape[1]:])!r} vs plain {tok.decode(plain[0, ids.shape[1]:])!r}"
    )
    assert cache.get_seq_length() == assisted.shape[1] - 1
    assert all(layer.stored == cache.get_seq_length() for layer in cache.layers)
    print(f"\n{assist}: crops {rollbacks}")


# -- cache reuse ---------------------------------------------------------------------------------------------------


def _exact_logits(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Unquantized logits ``[n, vocab]`` predicting ``seq[0, prompt_len:]``, from one forward pass without a cache."""
    with torch.no_grad():
        return model(seq[:, :-1], use_cache=False).logits[0, prompt_len - 1 :].float()


def _assert_like_fresh(model, out, fresh, prompt_len: int, what: str):
    """``out`` reused a cache, ``fresh`` prefilled the same input into a fresh quantized cache in one pass.

    The two round the same keys/values, but float noise (a different prefill split) flips a few roundings, and
    the flips propagate; so the bar is: the same first 5 greedy tokens, and a mean KL between the two runs no larger
    than the quantization error itself (KL of the exact model vs the fresh quantized run, same positions)."""
    gen, gen_f = out.sequences[0, prompt_len:], fresh.sequences[0, prompt_len:]
    assert gen[:5].tolist() == gen_f[:5].tolist(), f"{what}: {gen.tolist()} vs fresh {gen_f.tolist()}"
    n = min(_first_divergence(gen, gen_f) + 1, len(out.logits))
    kl_reuse = _kl(torch.stack([s[0] for s in fresh.logits[:n]]), torch.stack([s[0] for s in out.logits[:n]]))
    exact = _exact_logits(model, fresh.sequences, prompt_len)[:n]
    kl_quant = _kl(exact, torch.stack([s[0] for s in fresh.logits[:n]]))
    msg = (f"{what}: mean KL reused vs fresh {kl_reuse.mean():.2e} (per position {kl_reuse.numpy().round(5)}), "
           f"exact vs fresh {kl_quant.mean():.2e}")
    print("\n" + msg)
    assert torch.isfinite(kl_reuse).all() and kl_reuse.mean() <= kl_quant.mean(), msg


def _assert_same_run(out, ref, prompt_len: int, what: str):
    """``out`` and ``ref`` fed the model the same chunks: the same tokens and (up to float noise) the same logits."""
    assert out.sequences.tolist() == ref.sequences.tolist(), what
    kl = _kl(torch.stack([s[0] for s in ref.logits]), torch.stack([s[0] for s in out.logits]))
    assert kl.max() <= SAME_NUMBERS_KL_LIMIT, f"{what}: per-position KL {kl.tolist()}"


@pytest.mark.slow
def test_deepcopied_prompt_cache_reuse(smollm2):
    model, tok = smollm2
    mode = "int8_per_token_head"
    system = [{"role": "system", "content": "You are a concise assistant. You answer in one short sentence."}]
    system_ids = tok.apply_chat_template(system, return_tensors="pt", return_dict=True)["input_ids"]

    def prefilled():
        cache = _qcache(model, mode)
        with torch.no_grad():
            model(system_ids, cache=cache, use_cache=True)
        return cache

    base = prefilled()
    prefix_len = system_ids.shape[1]
    assert base.get_seq_length() == prefix_len
    snapshot = [(layer.key_data.clone(), layer.value_data.clone(), layer.key_scale.clone(), layer.stored)
                for layer in base.layers]

    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True,
                  output_logits=True)
    for question in CHAT_PROMPTS[:2]:
        full = tok.apply_chat_template(system + [{"role": "user", "content": question}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
        assert torch.equal(full[:, :prefix_len], system_ids), "the system prompt must be a prefix"
        reused = copy.deepcopy(base)
        assert reused.layers[0].key_data.data_ptr() != base.layers[0].key_data.data_ptr()
        with torch.no_grad():
            out = model.generate(full, attention_mask=torch.ones_like(full), cache=reused, **kwargs)
            # The same chunks (system prompt, then the rest) into a cache that was never copied.
            same = model.generate(full, attention_mask=torch.ones_like(full), cache=prefilled(), **kwargs)
            fresh = model.generate(full, attention_mask=torch.ones_like(full), cache=_qcache(model, mode), **kwargs)
        assert reused.get_seq_length() == out.sequences.shape[1] - 1
        _assert_same_run(out, same, full.shape[1], f"deep copy vs uncopied prefix cache, {question!r}")
        _assert_like_fresh(model, out, fresh, full.shape[1], f"deep copy vs fresh cache, {question!r}")

    # The prefilled original is untouched by both continuations.
    assert base.get_seq_length() == prefix_len
    for layer, (key_data, value_data, key_scale, stored) in zip(base.layers, snapshot):
        assert layer.stored == stored == prefix_len
        assert torch.equal(layer.key_data.view(torch.uint8), key_data.view(torch.uint8))
        assert torch.equal(layer.value_data.view(torch.uint8), value_data.view(torch.uint8))
        assert torch.equal(layer.key_scale, key_scale)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_continue_generation_with_returned_cache(smollm2, mode):
    model, tok = smollm2
    ids = _chat_ids(tok, CHAT_PROMPTS[0])
    cache = _qcache(model, mode)
    with torch.no_grad():
        first = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, do_sample=False,
                               max_new_tokens=8, return_dict_in_generate=True)
    returned = first.cache
    assert returned is cache and returned.get_seq_length() == first.sequences.shape[1] - 1

    follow_up = tok("\nAnd what is the capital of Italy?", return_tensors="pt", add_special_tokens=False).input_ids
    seq = torch.cat([first.sequences, follow_up], dim=1)
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True,
                  output_logits=True)
    # Reference with the same chunks, fed by hand: the prompt, then the first answer one token at a time.
    manual = _qcache(model, mode)
    with torch.no_grad():
        model(ids, cache=manual, attention_mask=torch.ones_like(ids))
        for t in range(ids.shape[1], first.sequences.shape[1] - 1):
            model(seq[:, t : t + 1], cache=manual, attention_mask=torch.ones(1, t + 1, dtype=torch.long))
        cont = model.generate(seq, attention_mask=torch.ones_like(seq), cache=returned, **kwargs)
        same = model.generate(seq, attention_mask=torch.ones_like(seq), cache=manual, **kwargs)
        fresh = model.generate(seq, attention_mask=torch.ones_like(seq), cache=_qcache(model, mode), **kwargs)
    assert cont.sequences.shape == fresh.sequences.shape == (1, seq.shape[1] + 8)
    assert returned.get_seq_length() == cont.sequences.shape[1] - 1
    _assert_same_run(cont, same, seq.shape[1], f"[{mode}] continued vs hand-fed cache")
    _assert_like_fresh(model, cont, fresh, seq.shape[1], f"[{mode}] continued vs fresh cache")


# -- Gemma 3: sliding-window layers past the window ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_reference(gemma3, wikitext):
    """A ~450-token WikiText prompt, DynamicCache's greedy continuation past 512 tokens, the teacher-forced
    DynamicCache logits of that sequence (chunked as in the quantized runs), and what that DynamicCache handed to
    attention at each step in the first sliding and the first full layer."""
    model, tok = gemma3
    ids = _wiki_ids(tok, wikitext, 450)
    dyn = DynamicCache(config=model.config)
    seq = _generate(model, ids, dyn, max_new_tokens=120, min_new_tokens=120)
    tf_cache = DynamicCache(config=model.config)
    handed = _capture_updates(tf_cache, _gemma3_probe_layers(model))
    ref = _teacher_forced_logits(model, seq, ids.shape[1], tf_cache, chunks=GEMMA_CHUNKS)
    return ids, seq, dyn, ref, handed


GEMMA_CHUNKS = (1, 7, 16)  # single-token decode steps and multi-token chunks, across the 512 boundary


def _gemma3_probe_layers(model) -> tuple[int, int]:
    """The first sliding and the first full-attention layer: the probed layers' inputs do not depend on the cache
    only for layer 0, so the sliding probe is layer 0."""
    layer_types = model.config.get_text_config(decoder=True).layer_types
    assert layer_types[0] == "sliding_attention"
    return 0, layer_types.index("full_attention")


def _capture_updates(cache, layer_ids) -> list:
    """Record ``(layer_idx, keys, values)`` that ``cache.update`` hands to attention for the given layers."""
    seen = []
    original = cache.update

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in layer_ids:
            seen.append((layer_idx, keys.detach().clone(), values.detach().clone()))
        return keys, values

    cache.update = update
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_gemma3_sliding_window_past_window(gemma3, gemma3_reference, wikitext, mode):
    model, tok = gemma3
    ids, seq_d, dyn, ref, handed_ref = gemma3_reference
    text_config = model.config.get_text_config(decoder=True)
    window = text_config.sliding_window
    assert seq_d.shape[1] > window + 32

    # generate() with the quantized cache past the window.
    cache = _qcache(model, mode)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    full = [layer for layer in cache.layers if not layer.is_sliding]
    assert sliding and full and all(layer.sliding_window == window for layer in sliding)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, do_sample=False,
                             max_new_tokens=120, min_new_tokens=120, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == seq_d.shape
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert cache.get_seq_length() == dyn.get_seq_length() == seq_d.shape[1] - 1
    total = cache.get_seq_length()
    for layer in full:
        assert layer.get_seq_length() == layer.stored == total
    for layer in sliding:
        assert layer.get_seq_length() == total
        # The window (window - 1 past tokens + the new one), plus at most the growth slack before old tokens are
        # dropped: not the whole sequence.
        assert window - 1 <= layer.stored <= layer.capacity <= window * (1 + 1 / 64) + 80, layer
        assert layer.stored < total
        assert layer.nbytes < 0.95 * full[0].nbytes

    # Teacher-forced: DynamicCache's greedy sequence through the model with the quantized cache in the loop.
    qcache = _qcache(model, mode)
    handed = _capture_updates(qcache, _gemma3_probe_layers(model))
    got = _teacher_forced_logits(model, seq_d, ids.shape[1], qcache, chunks=GEMMA_CHUNKS)
    assert torch.isfinite(got).all()
    kl = _kl(ref, got)[0]
    past = seq_d.shape[1] - 1 - window  # the last `past` positions predict tokens beyond the window
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    msg = (f"[{mode}] Gemma-3 teacher-forced over {kl.numel()} positions: mean KL {kl.mean():.5f} "
           f"(past the window {kl[-past:].mean():.5f}), max KL {kl.max():.4f}, top-1 {top1:.3f}")
    print("\n" + msg)
    assert kl.mean() <= GEMMA_MEAN_KL_LIMIT, msg
    assert kl[-past:].mean() <= GEMMA_MEAN_KL_LIMIT, msg

    # What attention received, step by step: as many tokens as DynamicCache's layers hand over (the last
    # window - 1 past tokens plus the new ones on the sliding layer, everything on the full one), and on layer 0,
    # whose keys/values depend only on the tokens (not on earlier layers' quantization error), the same tokens up
    # to one rounding step.
    assert len(handed) == len(handed_ref)
    step_fraction = 1 / 127 if mode == "int8_per_token_head" else 1 / 16  # of the token-head's absmax
    crossed = 0
    for (layer_idx, keys, values), (ref_idx, ref_keys, ref_values) in zip(handed, handed_ref):
        assert layer_idx == ref_idx and keys.shape == ref_keys.shape and values.shape == ref_values.shape
        if layer_idx != 0:
            continue
        for name, x, x_ref in (("keys", keys, ref_keys), ("values", values, ref_values)):
            err = (x.float() - x_ref.float()).abs()
            tol = step_fraction * x_ref.float().abs().amax(-1, keepdim=True) + 1e-6
            assert (err <= tol).all(), (
                f"layer {layer_idx} {name} [{tuple(x.shape)}]: handed-over tensor differs from DynamicCache's by "
                f"{float((err / tol).max()):.1f}x one rounding step"
            )
        crossed += int(layer_idx == 0 and keys.shape[2] > window)  # a sliding layer past its window
    assert crossed > 0

    # Keep going well past the window + growth slack, in 64-token chunks: sliding layers stay around the window
    # (they need room for window - 1 past tokens plus the chunk, plus the growth slack), full layers keep all.
    chunk = 64
    more = _wiki_ids(tok, wikitext, 8 * chunk, offset_chars=30000)
    with torch.no_grad():
        for start in range(0, more.shape[1], chunk):
            model(more[:, start : start + chunk], cache=qcache, use_cache=True)
    total = qcache.get_seq_length()
    assert total == seq_d.shape[1] - 1 + more.shape[1]
    for layer in qcache.layers:
        if layer.is_sliding:
            assert layer.get_seq_length() == total
            assert window - 1 <= layer.stored <= layer.capacity <= (window - 1 + chunk) * (1 + 1 / 64) + 80, layer
            assert layer.capacity < 0.7 * total, layer
        else:
            assert layer.stored == total, layer


# -- compiled decoding over a preallocated cache ----------------------------------------------------------------------

COMPILED_NEW_TOKENS = 24


def _compiled_vs_eager(model, input_ids, mode):
    """(compiled, eager, dynamo counters): greedy generations (tokens and logits) over a preallocated cache, `generate`
    compiling its decode step by itself (``is_compileable``), here with dynamo's whole-graph trace and no compiler
    (``backend="eager"``, on the CPU)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True
    options = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                   max_new_tokens=COMPILED_NEW_TOKENS, min_new_tokens=COMPILED_NEW_TOKENS, return_dict_in_generate=True,
                   output_logits=True)
    max_len = input_ids.shape[1] + COMPILED_NEW_TOKENS
    with torch.no_grad():
        eager = model.generate(cache=_qcache(model, mode, max_cache_len=max_len), disable_compile=True, **options)
        torch._dynamo.reset()
        counters.clear()
        compiled = model.generate(cache=_qcache(model, mode, max_cache_len=max_len), compile_config=config, **options)
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"], dict(counters)
    return compiled, eager


# A flip between the two best tokens is allowed only where eager's margin is under this (logits), and the first steps'
# logits agree within this fraction of the largest: with SDPA, transformers builds the mask as a tensor under a trace
# where eagerly SDPA takes is_causal, another float32 summation order (2e-5 of the logits measured on SmolLM2 at the
# first steps, growing as it flips roundings downstream: 0.07 by step 24, where a 0.026 margin flipped).
NEAR_TIE = 0.1
FIRST_STEPS, FIRST_STEPS_TOLERANCE = 4, 1e-3


def _assert_same_up_to_a_near_tie(compiled, eager):
    steps = len(eager.logits)
    for step in range(steps):
        want, got = eager.logits[step].float(), compiled.logits[step].float()
        if step < FIRST_STEPS:
            assert (got - want).abs().max() <= FIRST_STEPS_TOLERANCE * want.abs().max(), step
        token, other = eager.sequences[:, -steps + step], compiled.sequences[:, -steps + step]
        if not torch.equal(token, other):
            top2 = want.topk(2, dim=-1).values
            assert ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).all(), f"step {step}: tokens differ without a near tie"
            return


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["hf_kvquant", "sdpa"])
def test_smollm2_compiled_generate_equals_eager(smollm2, attention):
    """INT8 over a preallocated cache: under hf_kvquant's attention the compiled step runs the same custom operators as
    eager decoding, tokens equal; under SDPA equal up to a near tie (see `NEAR_TIE`)."""
    model, tok = smollm2
    model.set_attn_implementation(attention)
    try:
        compiled, eager = _compiled_vs_eager(model, _chat_ids(tok, CHAT_PROMPTS[1]), "int8")
    finally:
        model.set_attn_implementation("sdpa")
    if attention == "hf_kvquant":
        assert torch.equal(compiled.sequences, eager.sequences)
    else:
        _assert_same_up_to_a_near_tie(compiled, eager)


@pytest.mark.slow
def test_gemma3_compiled_generate_equals_eager_past_the_window(gemma3, wikitext):
    """Gemma 3's sliding-window layers (rings of one window, preallocated), FP8, compiled, with a prompt longer than
    their 512-token window: tokens equal eager decoding's (INT8 and SDPA compiled: the SmolLM2 test above and
    tests/test_integration.py's tiny Gemma 3)."""
    model, tok = gemma3
    model.set_attn_implementation("hf_kvquant")
    try:
        compiled, eager = _compiled_vs_eager(model, _wiki_ids(tok, wikitext, 600), "fp8")
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(compiled.sequences, eager.sequences)


# -- a preallocated cache too small for the call -----------------------------------------------------------------


def _tiny(arch: str):
    """A random-weight model of 2 layers: Llama (full attention) or Gemma 3 (a sliding-window layer and a full one)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 128, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    config = Gemma3TextConfig(**shape, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


def _forward_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("length", ["max_new_tokens", "max_length"])
@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_too_small_preallocated_cache_is_refused_before_the_first_step(arch, length, argument):
    """generate writes prompt + new tokens - 1 positions (the last new token is never fed back): with one slot fewer
    the call is refused before any forward pass, the cache untouched; with exactly that many it runs to the end."""
    from conftest import assert_same_state, state

    model = _tiny(arch)
    ids = torch.randint(3, 128, (2, 5))
    lengths = {"max_new_tokens": 4} if length == "max_new_tokens" else {"max_length": 9}
    options = dict(do_sample=False, min_new_tokens=4, **lengths)
    cache = _qcache(model, "int8", max_cache_len=7)
    before = state(cache)
    calls = _forward_calls(model)
    asked = "prompt 5 + max_new_tokens 4 - 1" if length == "max_new_tokens" else "max_length 9 - 1"
    message = (f"this cache holds max_cache_len=7 tokens, but generate would write 8 to it ({asked}: the last new "
               "token is never stored); build it with max_cache_len >= 8, or ask for fewer new tokens")
    with torch.no_grad(), pytest.raises(ValueError) as refused:
        model.generate(ids, **{argument: cache}, **options)
    assert str(refused.value) == message
    assert calls == [] and cache.get_seq_length() == 0 and cache.nbytes == 0
    assert_same_state(before, state(cache))

    cache = _qcache(model, "int8", max_cache_len=8)
    with torch.no_grad():
        out = model.generate(ids, **{argument: cache}, **options)
    assert out.shape == (2, 9) and len(calls) == 4  # the prefill and 3 decode steps
    assert all(int(layer.length) == 8 for layer in cache.layers)


def test_refused_continuation_leaves_the_filled_cache_as_it_was():
    """A cache that already holds a generation: continuing past its capacity is refused before any step, and its
    buffers and length stay bit for bit; the tokens that fit still continue it."""
    from conftest import assert_same_state, state

    model = _tiny("llama")
    ids = torch.randint(3, 128, (1, 5))
    cache = _qcache(model, "fp8", max_cache_len=10)
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    before = state(cache)
    calls = _forward_calls(model)
    with torch.no_grad(), pytest.raises(ValueError, match=r"generate would write 11 to it \(prompt 9 \+ "
                                                          r"max_new_tokens 3 - 1.*max_cache_len >= 11"):
        model.generate(out, cache=cache, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert calls == []
    assert_same_state(before, state(cache))
    with torch.no_grad():
        more = model.generate(out, cache=cache, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert torch.equal(more[:, :9], out) and more.shape == (1, 11) and int(cache.get_seq_length()) == 10


def test_growable_cache_and_other_caches_are_not_checked():
    """Without max_cache_len nothing is refused (the buffers grow); transformers' own caches pass through as before,
    and installing the check again (another preallocated cache, or the explicit call) does not wrap generate's cache
    preparation twice."""
    from transformers import StaticCache
    from transformers.generation.utils import GenerationMixin

    model = _tiny("llama")
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        out = model.generate(ids, cache=_qcache(model, "int8"), max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert out.shape == (1, 45)
        static = StaticCache(config=model.config, max_cache_len=48)
        assert model.generate(ids, cache=static, max_new_tokens=4, do_sample=False).shape[1] <= 9
    hf_kvquant.install_generate_length_check()
    wrapped = GenerationMixin._prepare_cache_for_generation
    _qcache(model, "int8", max_cache_len=8)
    hf_kvquant.install_generate_length_check()
    assert GenerationMixin._prepare_cache_for_generation is wrapped
    assert not getattr(wrapped.__wrapped__, "hf_kvquant_checks_cache_length", False)


# -- what importing changes, and the switch for the one patch ------------------------------------------------------

_IMPORT_ONLY = r"""
import json, sys
from transformers.generation.utils import GenerationMixin
original = GenerationMixin._prepare_cache_for_generation
import hf_kvquant
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
after_import = GenerationMixin._prepare_cache_for_generation is original
hf_kvquant.QuantizedPerTokenHeadCache(mode="int8")
after_growable = GenerationMixin._prepare_cache_for_generation is original
hf_kvquant.QuantizedPerTokenHeadCache(mode="int8", max_cache_len=4)
after_preallocated = GenerationMixin._prepare_cache_for_generation is not original
registered = hf_kvquant.ATTENTION_NAME in AttentionInterface() and hf_kvquant.ATTENTION_NAME in AttentionMaskInterface()
print(json.dumps([after_import, after_growable, after_preallocated, registered]))
"""


def test_importing_registers_names_and_patches_nothing():
    """In a fresh interpreter: `import hf_kvquant` registers the attention and mask names and leaves `generate` as it
    is; a growable cache changes nothing either; the first preallocated cache installs the length check."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ONLY], capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True, True, True]


def test_generate_length_check_installed_and_removed():
    """Installed: a too-small preallocated cache is refused before the first step. Removed: `generate`'s cache
    preparation is transformers' own function again, and building another preallocated cache does not put the check
    back; the overflow is then refused by the cache's own update (a `ValueError` on the CPU), at the step that
    overflows. Installed again: refused before the first step again."""
    import transformers.generation.utils as generation_utils
    from transformers.generation.utils import GenerationMixin

    model = _tiny("llama")
    ids = torch.randint(3, 128, (1, 5))
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    try:
        hf_kvquant.install_generate_length_check()
        calls = _forward_calls(model)
        with torch.no_grad(), pytest.raises(ValueError, match="build it with max_cache_len >= 8"):
            model.generate(ids, cache=_qcache(model, "int8", max_cache_len=7), **options)
        assert calls == []

        hf_kvquant.remove_generate_length_check()
        original = GenerationMixin._prepare_cache_for_generation
        assert original.__code__.co_filename == generation_utils.__file__
        assert original.__qualname__ == "GenerationMixin._prepare_cache_for_generation"
        assert not hasattr(original, "hf_kvquant_checks_cache_length") and not hasattr(original, "__wrapped__")
        cache = _qcache(model, "int8", max_cache_len=7)  # does not install it again
        assert GenerationMixin._prepare_cache_for_generation is original
        hf_kvquant.remove_generate_length_check()  # twice: nothing more to remove
        assert GenerationMixin._prepare_cache_for_generation is original
        with torch.no_grad(), pytest.raises(ValueError, match="8 tokens exceed this cache's max_cache_len=7"):
            model.generate(ids, cache=cache, **options)
        assert len(calls) == 4  # the prefill and 2 decode steps ran; the third began and was refused by the cache
    finally:
        hf_kvquant.install_generate_length_check()
    calls.clear()
    with torch.no_grad(), pytest.raises(ValueError, match="build it with max_cache_len >= 8"):
        model.generate(ids, cache=_qcache(model, "int8", max_cache_len=7), **options)
    assert calls == []
