"""What fits in a memory budget (eval/bench_generate.py's budget search): the largest batch at a ``--search-context``
(32k) context, and the longest context at batch 1, that run within ``--budget-gib`` of GPU memory (weights included,
enforced with `torch.cuda.set_per_process_memory_fraction`), per cache.

Doubling, then bisection to 1/``--search-granularity``. An attempt writes the context into the cache through the
cache's own ``update`` (random keys and values, layer by layer, in 16 chunks) instead of a prefill, so that prefill
activations (which a server would chunk) do not decide, then runs ``--search-steps`` real decode steps. Default
budgets: 40 GiB for the 1B shape (about half an 80 GB H100: room for ~35 sequences of 32k tokens with a bf16 cache
and ~65 with INT8, so the cache, not the 2.3 GiB of weights, decides and the bisection has room to resolve a few
percent) and 60 GiB for the 8B shape (45 GiB left after its 15 GiB of weights); only the 1B shape is searched by
default (``--search-shapes``).
"""

from __future__ import annotations

import functools
import time

import torch
from tqdm.auto import tqdm

from lib.caches import CACHES, build_cache, kv_bytes
from lib.decoding import decode, free_memory, synchronize
from lib.environment import GIB
from lib.models import SHAPES

# The budget search writes the context in this many chunks per layer: the random source chunk stays ~1/16 of a
# bf16 layer, while the O(chunks) copies that growing caches make stay cheap.
FILL_CHUNKS = 16
# Most elements in one layer's key buffer that the search tries (a bound on the search, far above the budgets here).
MAX_LAYER_ELEMENTS = 2**31 - 1
SEARCH_CACHES = ("dynamic", "hf_fp8", "int8", "fp8")  # quanto's re-quantizing fill is slow: opt in with --search-caches


class DeadlineReached(Exception):
    """``--deadline-s`` has passed: start nothing new."""


def past_deadline(args) -> bool:
    return bool(args.deadline_s) and time.perf_counter() - args.start_ > args.deadline_s


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def fill_cache(cache, config, batch: int, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    """Write ``tokens`` random keys and values into every layer through the cache's own ``update``, FILL_CHUNKS
    pieces per layer, laid out as the model's projections are (``[batch, tokens, heads, head_dim]`` transposed)."""
    chunk = -(-tokens // FILL_CHUNKS)
    shape = (batch, chunk, config.num_key_value_heads, config.head_dim)
    key = torch.randn(shape, dtype=dtype, device=device).transpose(1, 2)
    value = torch.randn(shape, dtype=dtype, device=device).transpose(1, 2)
    for layer in range(config.num_hidden_layers):
        for start in range(0, tokens, chunk):
            count = min(chunk, tokens - start)
            cache.update(key[:, :, :count], value[:, :, :count], layer)


def _attempt(model, key: str, batch: int, tokens: int, args) -> int:
    """Fill a fresh cache to ``tokens`` tokens of ``batch`` sequences and decode a few steps; returns its bytes."""
    cache = build_cache(key, model)
    fill_cache(cache, model.config, batch, tokens, args.dtype_, args.device)
    ids = torch.randint(model.config.vocab_size, (batch, 1), device=args.device)
    decode(model, cache, ids, args.search_steps)
    synchronize(args.device)
    return kv_bytes(cache)


def _fits(model, key: str, batch: int, tokens: int, budget: int, weights: int, args) -> bool:
    if past_deadline(args):
        raise DeadlineReached
    try:
        held = _attempt(model, key, batch, tokens, args)
    except Exception as error:  # only running out of memory is an answer; the rest is re-raised
        if not _is_oom(error):
            raise
        oom = True
    else:
        oom = False
    free_memory(args.device, collect=oom)
    if oom:
        return False
    # On CUDA the allocator enforces the budget; the CPU smoke run has no such limit and counts the bytes held.
    return args.device.type == "cuda" or weights + held <= budget


def largest_fitting(fits, start: int, quantum: int, granularity: int, cap: int, progress) -> tuple[int, list, bool]:
    """Largest multiple of ``quantum`` up to ``cap`` for which ``fits`` holds: doubling from ``start``, then bisection
    until the gap is at most 1/``granularity`` of the answer. Returns (answer, attempts, capped)."""
    attempts, lo, hi, n = [], 0, None, min(start, cap)
    while True:
        ok = fits(n)
        attempts.append([n, ok])
        progress.update()
        if not ok:
            hi = n
            break
        lo = n
        if n == cap:
            return lo, attempts, True
        n = min(2 * n, cap)
    while hi - lo > max(quantum, lo // granularity):
        mid = (lo + hi) // 2 // quantum * quantum
        if mid <= lo:
            break
        ok = fits(mid)
        attempts.append([mid, ok])
        progress.update()
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, attempts, False


def search_budget(model, shape_name: str, args, progress) -> dict:
    """Largest batch at ``--search-context`` and longest context at batch 1 within the budget, per cache."""
    config, device = model.config, args.device
    budget = int((args.budget_gib or SHAPES[shape_name].budget_gib) * GIB)
    context = args.search_context
    per_token = config.num_key_value_heads * config.head_dim  # elements of one token in one layer's key buffer
    weights = sum(p.nbytes for p in model.parameters())
    quantum = max(16, context // 128)  # context granularity: 256 tokens at 32k
    result = {"shape": shape_name, "model": SHAPES[shape_name].model, "budget_gib": budget / GIB,
              "context": context, "weights_bytes": weights, "caches": {}}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if budget > total:
            raise ValueError(f"budget {budget / GIB:.1f} GiB exceeds the device's {total / GIB:.1f} GiB")
        free_memory(device)
        torch.cuda.set_per_process_memory_fraction(budget / total, _index(device))
    try:
        for key in args.search_caches_:
            entry = result["caches"].setdefault(key, {})
            try:
                fits = functools.partial(_fits, model, key, budget=budget, weights=weights, args=args)
                cap = MAX_LAYER_ELEMENTS // (per_token * (context + 1024))
                entry["max_batch"], entry["batch_attempts"], entry["batch_capped"] = largest_fitting(
                    functools.partial(fits, tokens=context), 1, 1, args.search_granularity, cap, progress)
                cap = (MAX_LAYER_ELEMENTS // per_token - 1024) // quantum * quantum
                entry["max_context"], entry["context_attempts"], entry["context_capped"] = largest_fitting(
                    functools.partial(fits, 1), context, quantum, args.search_granularity, cap, progress)
            except DeadlineReached:
                entry["skipped"] = "deadline reached"
                result["deadline_reached"] = True
                break
            except Exception as error:  # noqa: BLE001 -- one cache's failure must not lose the others' results
                entry["error"] = f"{type(error).__name__}: {error}"
            free_memory(device, collect="error" in entry)
            tqdm.write(f"budget {budget / GIB:g} GiB, {CACHES[key][0]:<27} max batch at {context}: "
                       f"{entry.get('max_batch')}, max context at batch 1: {entry.get('max_context')}")
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, _index(device))
    return result


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index
