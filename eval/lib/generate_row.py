"""One timed row of eval/bench_generate.py: how fast a cache (`lib.caches`) prefills and decodes on a model of
`lib.models`, and how much memory it holds.

Models are built from the real configs (Llama-3.2-1B, Llama-3.1-8B) straight on the GPU with random weights
(weights do not change speed). For every (model, batch, prompt) row and cache, after a warm-up:
- prefill time: one forward over the prompt that keeps the logits of the last position only;
- decode: greedy single-token steps driven here (the same loop for every cache, no host sync inside). Wall time per
  step = the time of ``--steps`` steps / steps with one synchronize at the end, median of ``--repeats``; tokens/s =
  batch / that. GPU time per step = the summed durations of the GPU kernels (and copies) that `torch.profiler`
  records over ``--profile-steps`` steps / steps. Eager decoding in transformers is often bound by host (Python)
  work, so both are reported side by side; their difference is the host gap;
- peak GPU memory during decode (`torch.cuda.max_memory_allocated` after a reset at the end of the prefill), and the
  part attributable to the cache: that peak minus what was allocated before the cache existed (the weights), so it
  holds the cache and what decoding a step adds (transformers' `torch.cat` copy of one layer for `DynamicCache`,
  the dequantized copy of one layer for `QuantizedCache`, a buffer growth for ours);
- KV-cache bytes held at the end (allocated capacity; for `QuantizedCache` the quantized storage, its scales and
  zero-points, and its full-precision residual).

Compiled decoding (the ``*_compiled`` caches of `lib.caches`) runs as `generate` runs it over a preallocated
(compileable) cache: every layer is preallocated for the prompt plus every decode step the row runs (warm-up, timed,
profiled, checked), the length `generate` would give it for that many new tokens. The prefill runs eagerly; each
decode step goes through ``model.get_compiled_call(CompileConfig(fullgraph=True, ...))`` (exactly what `generate`
calls: ``torch.compile(model.__call__)``, inductor + ``reduce-overhead``, i.e. CUDA graphs, unless
``--compile-backend`` / ``--compile-mode`` say otherwise), fed what `generate` feeds it
(``prepare_inputs_for_generation``: the last ids, position ids, its 2D mask turned into the attention's own mask
outside the graph, ``logits_to_keep=1``; see `lib.decoding.GenerateInputs`).

A compiled row differs in these ways (`bench_row`): its warm-up is eager; before its first compiled step dynamo is reset
(``torch._dynamo.reset()``: no graph, guard, automatic-dynamic shape or CUDA graph of another cache or attention is
reused; the compiled call cached on the model is dropped) and the whole compiled part runs in a fresh inductor and
Triton cache directory (`torch._inductor.utils.fresh_cache`), so every cache compiles cold, whatever ran before it;
`prewarm_compile` has paid the process's one-time costs beforehand (worker pool, imports) on the tiny model. The
first compiled step is the first warm-up step, timed alone (synchronised) as the compile time: time to the first
compiled token, compilation and the first run included (under CUDA graphs the next step records the graph: it is in
the remaining warm-up, timed too). Peak memory is reset after that step (the compiled decode's own pools count, the
compiler's transients do not). GPU time comes from the same profiler: it sees the kernels inside CUDA graph replays.
After the profiled steps, ``--match-steps`` greedy steps run compiled, the cache is rolled back (``crop``) and the
same steps run eagerly (same cache type, same inputs, uncompiled forward), fed the compiled tokens (`match_eager`):
whether eager picks the same tokens is recorded, with how long, how often, and by what logit gap where it does not
(on a GPU inductor's fused bf16 arithmetic differs from eager's in the last bits, so a near-tie of random-weight
logits can flip a token, more easily through a quantized cache whose rounding can flip too: StaticCache's row shows
how often that happens by itself).

Seen on an H200 (torch 2.11, transformers 5.24, 1B 16x32k): StaticCache's compiled step spends about 22 of its 39 ms
in one fused pointwise kernel per layer for its keys and one for its values (rotary embedding, the cache write and a
clone, named ``triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_..._clone_...``), which passes over
the whole preallocated buffer: inductor does not write the new token in place. It is the same with efficient
attention instead of cuDNN and under ``torch.no_grad`` (generate's mode, which the compiled rows use) as under
inference mode: it is what `generate` gets from StaticCache there, and the anchor is measured as such. Ours writes
through a mutating custom op and has no such pass.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from hf_kvquant import ATTENTION_NAME

from lib.caches import CACHES, COMPILED, build_cache, count_hf_kvquant_calls, kv_bytes
from lib.decoding import (GenerateInputs, allocated_bytes, as_generate, compiled_call, compiling, decode, eager_step,
                          free_memory, graphs_compiled, peak_bytes, prefill, profile_decode, reset_peak_bytes,
                          synchronize, time_decode)
from lib.models import SHAPES, build_model


# Prefills longer than this many tokens (batch x prompt) run once after the warm-up: they take long enough (0.1 s to
# seconds) that run-to-run noise is small, and each repeat of the largest rows costs seconds of GPU time.
REPEATED_PREFILL_TOKENS = 16384


def decode_steps(args) -> int:
    """The decode steps a row runs after its prefill (a compiled cache is preallocated for them): the warm-up (at least
    one, the compiled step that compiles), the timed and the profiled steps, and the steps checked against eager."""
    return max(args.warmup_steps, 1) + args.steps * args.repeats + args.profile_steps + args.match_steps


def prewarm_compile(keys, args) -> float:
    """Three compiled decode steps on the tiny model (batch 1, 16 tokens), untimed, with the first cache in ``keys``
    of each attention: the process's one-time costs (compile workers, imports, each op's first lowering, the first
    CUDA graph) are paid here, not by the first measured compile. Returns its seconds."""
    start = time.perf_counter()
    model = build_model(SHAPES["tiny"], args.device, args.dtype_)
    ids = torch.zeros(1, 16, dtype=torch.long, device=args.device)
    for key in {CACHES[key][1]: key for key in reversed(keys)}.values():
        with compiling(model), as_generate():
            cache = build_cache(key, model, max_cache_len=ids.shape[1] + 3)
            step = GenerateInputs(model, compiled_call(model, args), 1, ids.shape[1], args.device)
            decode(model, cache, prefill(model, cache, ids), 3, step)
            synchronize(args.device)
            del cache, step
    del model
    free_memory(args.device, collect=True)
    return time.perf_counter() - start


def match_eager(model, cache, ids: torch.Tensor, step: GenerateInputs, steps: int) -> dict:
    """``steps`` greedy steps from ``ids`` through ``step``'s compiled forward; then, the cache and the step rolled
    back, the same steps through the uncompiled forward, fed the compiled tokens (teacher forcing: up to the first
    difference this is eager greedy decoding itself, and after it every step still compares like with like).

    Returns whether eager picks the same tokens at every step (``tokens_match_eager``), for how many leading steps it
    does in every sequence (``tokens_matched_steps``: eager greedy decoding equals the compiled one that long), the
    fraction of (sequence, step) where it does (``tokens_agreement``), and by how much eager prefers its own token
    where they differ (``max_logit_gap``: its top logit minus its logit of the compiled token; a tie is 0), beside the
    median gap between eager's two top logits (``median_top2_margin``). A broken compiled step (wrong positions, a
    stale cache) disagrees almost everywhere; rounding flips only near-ties (gaps far below the typical margin)."""
    inputs = [ids]
    for _ in range(steps):
        inputs.append(decode(model, cache, inputs[-1], 1, step))
    cache.crop(-steps)
    step.rewind(steps)
    step.forward = model
    agree, gaps, margins = [], [], []
    for fed, chosen in zip(inputs[:-1], inputs[1:]):
        logits = step(model, cache, fed)[:, -1].float()
        top = logits.topk(2, dim=-1).values
        agree.append(logits.argmax(-1, keepdim=True) == chosen)
        gaps.append(top[:, :1] - logits.gather(-1, chosen))
        margins.append(top[:, :1] - top[:, 1:])
    agree, gaps, margins = (torch.cat(t, dim=-1).cpu() for t in (agree, gaps, margins))
    every = agree.all(dim=0)
    return {"tokens_match_eager": bool(every.all()),
            "tokens_matched_steps": steps if every.all() else int(every.int().argmin()),
            "tokens_agreement": agree.float().mean().item(), "max_logit_gap": gaps.max().item(),
            "median_top2_margin": margins.median().item(), "match_steps": steps}


def bench_row(model, key: str, batch: int, prompt: int, args) -> dict:
    if key in COMPILED:
        with as_generate():
            return _bench_row(model, key, batch, prompt, args)
    return _bench_row(model, key, batch, prompt, args)


def _bench_row(model, key: str, batch: int, prompt: int, args) -> dict:
    device, vocab = args.device, model.config.vocab_size
    layers = model.config.num_hidden_layers
    free_memory(device)
    baseline = allocated_bytes(device)  # the weights and whatever else lives without a cache
    generator = torch.Generator(device=device).manual_seed(0)
    compiled = key in COMPILED
    length = prompt + decode_steps(args) if compiled else None

    def steps_after(tokens: int):
        """The step function of decoding after a prompt of ``tokens`` (a compiled cache: fed as `generate` feeds it;
        the forward compiled later)."""
        return GenerateInputs(model, model, batch, tokens, device) if compiled else eager_step

    # Warm-up: a short prompt of the same batch and one step (compiles Triton kernels, picks cuBLAS algorithms), and
    # the proof that hf_kvquant's attention receives the quantized buffers. Eager for the compiled caches too.
    uses_ours = CACHES[key][1] == ATTENTION_NAME
    with count_hf_kvquant_calls() if uses_ours else contextlib.nullcontext() as calls:
        warm = min(args.warmup_prompt, prompt)
        # A preallocated cache gets the row's decode room: its capacity then has the divisibility (by 16) of the
        # row's, which Triton specializes its kernels on, so the timed prefill compiles nothing.
        cache = build_cache(key, model, warm + length - prompt if compiled else None)
        ids = torch.randint(vocab, (batch, warm), device=device, generator=generator)
        decode(model, cache, prefill(model, cache, ids), 1, steps_after(warm))
        synchronize(device)
    if uses_ours and not (calls["calls"] == 2 * layers == calls["quantized"]):
        raise RuntimeError(f"hf_kvquant attention ran {calls['calls']} times ({calls['quantized']} with QuantizedKV) "
                           f"over 2 forward passes of {layers} layers: it is not what attends")
    del cache, ids
    free_memory(device)

    ids = torch.randint(vocab, (batch, prompt), device=device, generator=generator)
    prefill_s = []
    for _ in range(args.prefill_repeats if batch * prompt <= REPEATED_PREFILL_TOKENS else 1):
        cache = None  # the previous repeat's cache goes before the next one is filled
        free_memory(device)
        cache = build_cache(key, model, length)
        reset_peak_bytes(device)
        synchronize(device)
        start = time.perf_counter()
        next_ids = prefill(model, cache, ids)
        synchronize(device)
        prefill_s.append(time.perf_counter() - start)
    prefill_peak = peak_bytes(device)
    del ids

    extra = {}
    reset_peak_bytes(device)
    with compiling(model) if compiled else contextlib.nullcontext():
        step, warmup_steps = steps_after(prompt), args.warmup_steps
        if compiled:
            # The first compiled step, alone: the time to the first compiled token, compilation included.
            graphs = graphs_compiled()
            step.forward = compiled_call(model, args)
            synchronize(device)
            start = time.perf_counter()
            next_ids = decode(model, cache, next_ids, 1, step)
            synchronize(device)
            extra = {"max_cache_len": length, "compile_s": time.perf_counter() - start,
                     "peak_compile_bytes": peak_bytes(device)}
            reset_peak_bytes(device)
            warmup_steps = max(warmup_steps - 1, 0)
        start = time.perf_counter()
        next_ids = decode(model, cache, next_ids, warmup_steps, step)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        next_ids, step_s = time_decode(model, cache, next_ids, args.steps, args.repeats, device, step)
        peak = peak_bytes(device)
        tokens = int(cache.get_seq_length())
        held = kv_bytes(cache)
        profile = {"gpu_ms_per_step": None, "kernel_names": [], "top_kernels": [], "top_cpu_ops": []}
        if args.profile_steps > 0:
            next_ids, profile = profile_decode(model, cache, next_ids, args.profile_steps, device, step=step)
        if compiled:
            extra["compile_warmup_s"] = warmup_s  # the rest of the warm-up: under CUDA graphs, the recording
            if args.match_steps > 0:
                extra.update(match_eager(model, cache, next_ids, step, args.match_steps))
            extra["graphs_compiled"] = graphs_compiled() - graphs
        del cache, next_ids, step
    free_memory(device)

    wall_ms = statistics.median(step_s) * 1e3
    gpu_ms = profile["gpu_ms_per_step"]
    row = {
        "prefill_ms": statistics.median(prefill_s) * 1e3,
        "prefill_ms_all": [s * 1e3 for s in prefill_s],
        "decode_tok_s": batch / (wall_ms / 1e3),
        "ms_per_step_wall": wall_ms,
        "ms_per_step_wall_all": [s * 1e3 for s in step_s],
        "gpu_ms_per_step": gpu_ms,
        "host_gap_ms_per_step": None if gpu_ms is None else wall_ms - gpu_ms,
        "baseline_bytes": baseline,
        "peak_prefill_bytes": prefill_peak,
        "peak_decode_bytes": peak,
        "peak_decode_kv_bytes": None if peak is None else peak - baseline,
        "kv_bytes": held,
        "kv_tokens": tokens,
        **extra,
        "top_kernels": profile["top_kernels"],
        "top_cpu_ops": profile["top_cpu_ops"],
    }
    if uses_ours and device.type == "cuda" and profile["kernel_names"]:
        row["hf_kvquant_kernels_seen"] = any("_attention_kernel" in name for name in profile["kernel_names"])
    return row
