"""End-to-end generation benchmark (GPU): random-weight Llama models in bf16, one process, every cache side by side.

Caches, each with the attention it is meant for:
- ``dynamic``: transformers' `DynamicCache` + ``sdpa`` (the default);
- ``dynamic_no_cudnn``: the same with PyTorch's cuDNN SDPA backend switched off (on torch 2.11 + H100 the
  default picks cuDNN, whose host time per call dominates small decode steps; the targets compare with ``dynamic``);
- ``hf_fp8``: transformers' `QuantizedCache(backend="fp8")` + ``sdpa`` (one frozen per-tensor scale);
- ``hf_quanto_int4``: `QuantizedCache(backend="quanto", nbits=4)` + ``sdpa`` (needs optimum-quanto);
- ``int8`` / ``fp8``: `QuantizedPerTokenHeadCache` + hf_kvquant's attention (`hf_kvquant.ATTENTION_NAME`).

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

Memory budget: the largest batch at a ``--search-context`` (32k) context, and the longest context at batch 1, that
run within ``--budget-gib`` of GPU memory (weights included, enforced with
`torch.cuda.set_per_process_memory_fraction`): doubling, then bisection to 1/``--search-granularity``. An attempt
writes the context into the cache through the cache's own ``update`` (random keys and values, layer by layer, in 16
chunks) instead of a prefill, so that prefill activations (which a server would chunk) do not decide, then runs
``--search-steps`` real decode steps. Default budgets: 40 GiB for the 1B shape (about half an 80 GB H100: room for
~35 sequences of 32k tokens with a bf16 cache and ~65 with INT8, so the cache, not the 2.3 GiB of weights, decides
and the bisection has room to resolve a few percent) and 60 GiB for the 8B shape (45 GiB left after its 15 GiB of
weights); only the 1B shape is searched by default (``--search-shapes``).

quanto: its INT4 cache dequantizes through ``torch.ops.quanto.unpack``, whose CUDA (and CPU) kernel is a C++/CUDA
extension that quanto JIT-compiles with ninja and nvcc on first use (with its Marlin and AWQ GEMMs: minutes),
with no fallback of its own. Here the extension is not built: its ``unpack`` is replaced by quanto's own
plain-PyTorch version of the same op (a few elementwise kernels instead of one). ``--quanto-build-timeout S``
builds it in a child process first and uses it if that finishes within S seconds (the child's process group is
killed otherwise; nothing hangs). quanto re-quantizes its whole cache every 128 steps; the measured window is
shorter, which favours it.

Writes ``bench_generate.json`` and ``bench_generate.md`` into ``--out-dir`` after every cache of every row (a run cut
short keeps what it measured) and ``bench_generate.png`` at the end (matplotlib, if installed; ``--replot`` redraws
the table and plot from the JSON, on any machine).

    python eval/bench_generate.py [--quick] [--shapes 1b,8b] [--rows 1b:8x8192,...] [--caches dynamic,int8,...]
        [--steps 16] [--repeats 3] [--search-shapes 1b] [--budget-gib 40] [--deadline-s 540] [--out-dir eval/results]
    python eval/bench_generate.py --device cpu --tiny      # CPU smoke run of the plumbing (2-layer model)
    python eval/bench_generate.py --replot [--out-dir eval/results]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch.autograd import DeviceType
from tqdm.auto import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig, QuantizedCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_kvquant import ATTENTION_NAME, QuantizedKV, QuantizedPerTokenHeadCache, kv_cache_nbytes

GIB = 1 << 30


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

# key: (label, attention implementation)
CACHES = {
    "dynamic": ("DynamicCache", "sdpa"),
    # The same with PyTorch's cuDNN SDPA backend off (flash / memory-efficient kernels): on torch 2.11 + H100 the default
    # picks cuDNN, whose host time per call grows with every new key length; this shows the default without that cost.
    "dynamic_no_cudnn": ("DynamicCache (no cuDNN SDPA)", "sdpa"),
    "hf_fp8": ("QuantizedCache fp8", "sdpa"),
    "hf_quanto_int4": ("QuantizedCache quanto int4", "sdpa"),
    "int8": ("hf_kvquant INT8", ATTENTION_NAME),
    "fp8": ("hf_kvquant FP8", ATTENTION_NAME),
}
SEARCH_CACHES = ("dynamic", "hf_fp8", "int8", "fp8")  # quanto's re-quantizing fill is slow: opt in with --search-caches

# Prefills longer than this many tokens (batch x prompt) run once after the warm-up: they take long enough (0.1 s to
# seconds) that run-to-run noise is small, and each repeat of the largest rows costs seconds of GPU time.
REPEATED_PREFILL_TOKENS = 16384
# The budget search writes the context in this many chunks per layer: the random source chunk stays ~1/16 of a
# bf16 layer, while the O(chunks) copies that growing caches make stay cheap.
FILL_CHUNKS = 16
# Most elements in one layer's key buffer that the search tries (a bound on the search, far above the budgets here).
MAX_LAYER_ELEMENTS = 2**31 - 1

QUICK = dict(rows="1b:1x2048,1b:8x8192", steps=8, repeats=2, search_granularity=8, search_caches="dynamic,int8")
TINY = dict(shapes="tiny", rows="tiny:1x128,tiny:2x256", search_shapes="tiny", search_context=256, warmup_prompt=16,
            steps=4, repeats=2, warmup_steps=2, profile_steps=2, prefill_repeats=2, search_steps=2, threads=1)


class DeadlineReached(Exception):
    """``--deadline-s`` has passed: start nothing new."""


# -- model, caches, the decode loop ------------------------------------------------------------------------------


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
            cache = make_cache(key, model)
            decode(model, cache, prefill(model, cache, ids), 1)
            synchronize(device)
        except Exception as error:  # noqa: BLE001 -- the rows of this cache will fail and say why; the others run
            print(f"warm-up of {CACHES[key][0]} failed: {type(error).__name__}: {error}")
    return model


def make_cache(key: str, model):
    """A fresh cache of kind ``key``, the model switched to the attention it goes with first: hf_kvquant's cache reads
    ``config._attn_implementation`` when built to decide whether it hands attention its quantized buffers."""
    attention = CACHES[key][1]
    model.set_attn_implementation(attention)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"could not switch the model to {attention!r} attention")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(key != "dynamic_no_cudnn")
    if key in ("dynamic", "dynamic_no_cudnn"):
        return DynamicCache(config=model.config)
    if key == "hf_fp8":
        return QuantizedCache(backend="fp8", config=model.config)
    if key == "hf_quanto_int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=f"{key}_per_token_head")
    if not cache.hands_over_quantized:
        raise RuntimeError("QuantizedPerTokenHeadCache would hand dequantized tensors to attention")
    return cache


def prefill(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt ``ids [batch, prompt]`` through the model into ``cache``; return the next ids ``[batch, 1]``.
    Only the last position's logits are computed (a [batch, prompt, vocab] tensor would dwarf the cache)."""
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def decode(model, cache, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy single-token steps from ``ids [batch, 1]``; the argmax stays on the device (no host sync)."""
    for _ in range(steps):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
    return ids


def time_decode(model, cache, ids: torch.Tensor, steps: int, repeats: int, device: torch.device):
    """``repeats`` timings of ``steps`` greedy steps from ``ids``, each with one synchronize at its end: returns the
    last ids and the seconds per step of each repeat."""
    step_s = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        ids = decode(model, cache, ids, steps)
        synchronize(device)
        step_s.append((time.perf_counter() - start) / steps)
    return ids, step_s


@contextlib.contextmanager
def count_hf_kvquant_calls():
    """Count calls of hf_kvquant's attention, and how many received `QuantizedKV` keys and values: a silent fallback
    (dequantized tensors, another attention) must not pass as a measurement of the kernel."""
    counts = {"calls": 0, "quantized": 0}
    original = ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME]

    def counting(module, query, key, value, *args, **kwargs):
        counts["calls"] += 1
        counts["quantized"] += isinstance(key, QuantizedKV) and isinstance(value, QuantizedKV)
        return original(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, counting)
    try:
        yield counts
    finally:
        AttentionInterface.register(ATTENTION_NAME, original)


def _tensor_bytes(obj) -> int:
    """Bytes of a tensor, of the inner tensors of a tensor subclass (quanto's packed INT4 + scale + shift), or of a
    tuple of them (the fp8 backend's (data, scale))."""
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(t) for t in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(obj, name)) for name in names)
    return obj.nbytes


def kv_bytes(cache) -> int:
    """Bytes the cache holds. `hf_kvquant.kv_cache_nbytes` covers `DynamicCache` and ours; for `QuantizedCache` it
    would only see the full-precision residual, so the quantized storage is counted here as well."""
    if not isinstance(cache, QuantizedCache):
        return kv_cache_nbytes(cache)
    fields = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_tensor_bytes(getattr(layer, name, None)) for layer in cache.layers for name in fields)


# -- quanto without its JIT extension -----------------------------------------------------------------------------


def _quanto_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's own plain-PyTorch ``quanto::unpack`` (optimum/quanto/library/unpack.py): uint8 holding 8 // bits values
    each -> one uint8 per value, the i-th values of all items first."""
    parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)


def _build_quanto_extension(name: str, timeout_s: float) -> str | None:
    """Build quanto's extension in a child process; None when built, else why not. The child gets its own process
    group, killed as a whole on timeout (ninja and nvcc included)."""
    code = f"from optimum.quanto.library.extensions import get_extension; get_extension({name!r}).lib"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"not built: the build did not finish within {timeout_s:g} s and was stopped"
    if child.returncode != 0:
        return f"not built: {output.strip().splitlines()[-1] if output.strip() else f'exit status {child.returncode}'}"
    return None


def prepare_quanto(device: torch.device, build_timeout_s: float) -> str:
    """Make quanto's INT4 path usable without a blocking JIT build; returns how ``unpack`` runs (or raises
    ImportError when optimum-quanto is missing)."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    native = "quanto_cuda" if device.type == "cuda" else "quanto_cpp"
    why = "not built (--quanto-build-timeout 0)"
    if build_timeout_s > 0 and is_extension_available(native):
        start = time.perf_counter()
        why = _build_quanto_extension(native, build_timeout_s)
        if why is None:
            get_extension(native).lib  # noqa: B018 -- loads the finished build
            return f"quanto's {native} extension (built in {time.perf_counter() - start:.0f} s)"
    for name in ("quanto_cpp", "quanto_cuda", "quanto_hip", "quanto_mps"):
        if is_extension_available(name):
            # The `lib` property returns `_lib` once set: quanto then never starts a build.
            get_extension(name)._lib = SimpleNamespace(unpack=_quanto_unpack)
    return f"quanto's plain-PyTorch unpack; its {native} extension was {why}"


# -- measurement helpers ------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Give cached GPU memory back. ``collect``: also break reference cycles, as a traceback of a failure holds its
    frames' tensors (a full collection takes ~0.3 s, too much to pay for every cache and search attempt)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def profile_decode(model, cache, ids: torch.Tensor, steps: int, device: torch.device, top: int = 8):
    """Decode ``steps`` steps under `torch.profiler`: GPU time per step (sum of kernel, copy and memset durations),
    the top kernels and the top CPU-side operators (self time), per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        ids = decode(model, cache, ids, steps)
        synchronize(device)
    kernels: dict[str, list[float]] = {}
    cpu_ops: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
        elif event.device_type == DeviceType.CPU:
            entry = cpu_ops.setdefault(event.name, [0.0, 0])
            entry[0] += event.self_cpu_time_total
            entry[1] += 1

    def table(events: dict[str, list[float]]) -> list[dict]:
        ranked = sorted(events.items(), key=lambda item: -item[1][0])[:top]
        return [{"name": name, "ms_per_step": us / steps / 1e3, "calls_per_step": count / steps}
                for name, (us, count) in ranked]

    gpu_ms = sum(us for us, _ in kernels.values()) / steps / 1e3 if device.type == "cuda" else None
    return ids, {"gpu_ms_per_step": gpu_ms, "kernel_names": sorted(kernels), "top_kernels": table(kernels),
                 "top_cpu_ops": table(cpu_ops)}


# -- one row -----------------------------------------------------------------------------------------------------


def bench_row(model, key: str, batch: int, prompt: int, args) -> dict:
    device, vocab = args.device, model.config.vocab_size
    layers = model.config.num_hidden_layers
    free_memory(device)
    baseline = _allocated(device)  # the weights and whatever else lives without a cache
    generator = torch.Generator(device=device).manual_seed(0)

    # Warm-up: a short prompt of the same batch and one step (compiles Triton kernels, picks cuBLAS algorithms), and
    # the proof that hf_kvquant's attention receives the quantized buffers.
    uses_ours = CACHES[key][1] == ATTENTION_NAME
    with count_hf_kvquant_calls() if uses_ours else contextlib.nullcontext() as calls:
        cache = make_cache(key, model)
        ids = torch.randint(vocab, (batch, min(args.warmup_prompt, prompt)), device=device, generator=generator)
        decode(model, cache, prefill(model, cache, ids), 1)
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
        cache = make_cache(key, model)
        _reset_peak(device)
        synchronize(device)
        start = time.perf_counter()
        next_ids = prefill(model, cache, ids)
        synchronize(device)
        prefill_s.append(time.perf_counter() - start)
    prefill_peak = _peak(device)
    del ids

    _reset_peak(device)
    next_ids = decode(model, cache, next_ids, args.warmup_steps)
    next_ids, step_s = time_decode(model, cache, next_ids, args.steps, args.repeats, device)
    peak = _peak(device)
    tokens = cache.get_seq_length()
    held = kv_bytes(cache)
    profile = {"gpu_ms_per_step": None, "kernel_names": [], "top_kernels": [], "top_cpu_ops": []}
    if args.profile_steps > 0:
        next_ids, profile = profile_decode(model, cache, next_ids, args.profile_steps, device)
    del cache, next_ids
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
        "top_kernels": profile["top_kernels"],
        "top_cpu_ops": profile["top_cpu_ops"],
    }
    if uses_ours and device.type == "cuda" and profile["kernel_names"]:
        row["hf_kvquant_kernels_seen"] = any("_attention_kernel" in name for name in profile["kernel_names"])
    return row


# -- memory budget --------------------------------------------------------------------------------------------------


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
    cache = make_cache(key, model)
    fill_cache(cache, model.config, batch, tokens, args.dtype_, args.device)
    ids = torch.randint(model.config.vocab_size, (batch, 1), device=args.device)
    decode(model, cache, ids, args.search_steps)
    synchronize(args.device)
    return kv_bytes(cache)


def _fits(model, key: str, batch: int, tokens: int, budget: int, weights: int, args) -> bool:
    if _past_deadline(args):
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


# -- results: targets, markdown, plot -----------------------------------------------------------------------------


def _row_label(row: dict) -> str:
    return f"{row['shape']} {row['batch']}x{row['prompt'] // 1024 if row['prompt'] >= 1024 else row['prompt']}" + (
        "k" if row["prompt"] >= 1024 else "")


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _get(row: dict, key: str, field: str):
    entry = row["caches"].get(key) or {}
    return entry.get(field)


def targets(result: dict) -> list[dict]:
    """The issue's targets, each checked where its data exist: INT8 against DynamicCache and QuantizedCache fp8."""
    checks = []

    def check(name, where, value, limit, higher_is_better):
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        checks.append({"target": name, "where": where, "value": value, "limit": limit, "met": met})

    for row in result["rows"]:
        where = _row_label(row)
        check("wall tok/s INT8 / DynamicCache >= 0.95", where,
              _ratio(_get(row, "int8", "decode_tok_s"), _get(row, "dynamic", "decode_tok_s")), 0.95, True)
        if row["prompt"] >= 8192:
            check("wall tok/s INT8 / QuantizedCache fp8 >= 1.5", where,
                  _ratio(_get(row, "int8", "decode_tok_s"), _get(row, "hf_fp8", "decode_tok_s")), 1.5, True)
        if (row["shape"], row["batch"], row["prompt"]) == ("8b", 8, 16384):
            check("GPU ms/step INT8 / DynamicCache <= 0.8", where,
                  _ratio(_get(row, "int8", "gpu_ms_per_step"), _get(row, "dynamic", "gpu_ms_per_step")), 0.8, False)
        check("peak decode KV memory INT8 / DynamicCache <= 0.55", where,
              _ratio(_get(row, "int8", "peak_decode_kv_bytes"), _get(row, "dynamic", "peak_decode_kv_bytes")),
              0.55, False)
    for search in result["search"]:
        for field, what in (("max_batch", f"largest batch at {search['context']}"),
                            ("max_context", "longest context at batch 1")):
            check(f"{what} INT8 / DynamicCache >= 1.8", f"{search['shape']}, {search['budget_gib']:g} GiB",
                  _ratio(_get(search, "int8", field), _get(search, "dynamic", field)), 1.8, True)
    return checks


def _one_line(text: str, limit: int = 160) -> str:
    """An error message fit for a table cell."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _f(value, fmt: str = ".2f", scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return format(value, fmt) if fmt == "d" else format(value / scale, fmt)


def markdown(result: dict) -> str:
    s = result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [
        "# End-to-end generation: DynamicCache vs transformers' QuantizedCache vs hf_kvquant",
        "",
        f"Device: {result['device']}; {versions}. Written by `eval/bench_generate.py` "
        f"({result.get('elapsed_s', 0):.0f} s{', incomplete' if not result.get('complete') else ''}).",
        "",
        f"Random-weight Llama models in {s['dtype']}. Prefill: median of up to {s['prefill_repeats']} runs (one run "
        f"above {REPEATED_PREFILL_TOKENS} prompt tokens), after a warm-up. Decode: greedy steps, {s['warmup_steps']} "
        f"warm-up, then wall time of {s['steps']} steps / {s['steps']} (one synchronize), median of {s['repeats']}; "
        f"tokens/s = batch / that. GPU ms/step: kernel time summed by `torch.profiler` over {s['profile_steps']} "
        "steps; host gap = wall − GPU. Peak KV = peak allocated during decode − allocated before the cache existed "
        "(the cache plus what a step adds). KV held = the cache's bytes at the end (capacity; QuantizedCache: "
        "quantized storage + scales + full-precision residual). quanto: " + result.get("quanto", "not run") + ".",
        "",
    ]
    headline = ["| row | DynamicCache tok/s | QC fp8 tok/s | INT8 tok/s | FP8 tok/s | INT8 / Dynamic | INT8 / QC fp8 "
                "| GPU ms/step Dynamic → INT8 | peak KV GiB Dynamic → INT8 |", "|" + " --- |" * 9]
    for row in result["rows"]:
        headline.append(
            f"| {_row_label(row)} | {_f(_get(row, 'dynamic', 'decode_tok_s'), '.1f')} "
            f"| {_f(_get(row, 'hf_fp8', 'decode_tok_s'), '.1f')} | {_f(_get(row, 'int8', 'decode_tok_s'), '.1f')} "
            f"| {_f(_get(row, 'fp8', 'decode_tok_s'), '.1f')} "
            f"| {_f(_ratio(_get(row, 'int8', 'decode_tok_s'), _get(row, 'dynamic', 'decode_tok_s')))} "
            f"| {_f(_ratio(_get(row, 'int8', 'decode_tok_s'), _get(row, 'hf_fp8', 'decode_tok_s')))} "
            f"| {_f(_get(row, 'dynamic', 'gpu_ms_per_step'))} → {_f(_get(row, 'int8', 'gpu_ms_per_step'))} "
            f"| {_f(_get(row, 'dynamic', 'peak_decode_kv_bytes'), '.2f', GIB)} → "
            f"{_f(_get(row, 'int8', 'peak_decode_kv_bytes'), '.2f', GIB)} |")
    lines += ["## Headline (wall-clock decode, for the README)", "", *headline, ""]

    lines += ["## Every row and cache", "",
              "| row | cache | prefill ms | decode tok/s | ms/step wall | GPU ms/step | host gap ms | peak decode GiB "
              "| peak KV GiB | KV held GiB | tok/s vs Dynamic | tok/s vs QC fp8 |", "|" + " --- |" * 12]
    for row in result["rows"]:
        for key, entry in row["caches"].items():
            label = CACHES[key][0]
            if "error" in entry or "skipped" in entry:
                lines.append(f"| {_row_label(row)} | {label} | {_one_line(entry.get('error') or entry['skipped'])} |"
                             + " |" * 9)
                continue
            lines.append(
                f"| {_row_label(row)} | {label} | {_f(entry['prefill_ms'], '.1f')} "
                f"| {_f(entry['decode_tok_s'], '.1f')} "
                f"| {_f(entry['ms_per_step_wall'])} | {_f(entry['gpu_ms_per_step'])} "
                f"| {_f(entry['host_gap_ms_per_step'])} | {_f(entry['peak_decode_bytes'], '.2f', GIB)} "
                f"| {_f(entry['peak_decode_kv_bytes'], '.3f', GIB)} | {_f(entry['kv_bytes'], '.3f', GIB)} "
                f"| {_f(_ratio(entry['decode_tok_s'], _get(row, 'dynamic', 'decode_tok_s')))} "
                f"| {_f(_ratio(entry['decode_tok_s'], _get(row, 'hf_fp8', 'decode_tok_s')))} |")
    lines.append("")

    if result["search"]:
        enforced = ("under `torch.cuda.set_per_process_memory_fraction`" if result["device"] != "cpu" else
                    "(CPU smoke run: fits = weights + bytes held within the budget)")
        lines += ["## Memory budget", "",
                  "Weights included in the budget; the context is written through each cache's `update` (random keys "
                  f"and values, no prefill), then decoded for {s['search_steps']} steps {enforced}; bisection to "
                  f"1/{s['search_granularity']}.", "",
                  "| model | budget GiB | cache | largest batch at context | × Dynamic | longest context at batch 1 "
                  "| × Dynamic |", "|" + " --- |" * 7]
        for search in result["search"]:
            for key, entry in search["caches"].items():
                note = _one_line(entry.get("error") or entry.get("skipped") or "")
                batch, ctx = entry.get("max_batch"), entry.get("max_context")
                lines.append(
                    f"| {search['model']} | {search['budget_gib']:g} "
                    f"| {CACHES[key][0]}{' (' + note + ')' if note else ''} "
                    f"| {_f(batch, 'd')}{'+' if entry.get('batch_capped') else ''} at {search['context']} "
                    f"| {_f(_ratio(batch, _get(search, 'dynamic', 'max_batch')))} "
                    f"| {_f(ctx, 'd')}{'+' if entry.get('context_capped') else ''} "
                    f"| {_f(_ratio(ctx, _get(search, 'dynamic', 'max_context')))} |")
        lines.append("")

    checks = targets(result)
    lines += ["## Targets (issue 5)", "", "| target | where | measured | met |", "| --- | --- | --- | --- |"]
    for c in checks:
        lines.append(f"| {c['target']} | {c['where']} | {_f(c['value'], '.3f')} "
                     f"| {'–' if c['met'] is None else ('yes' if c['met'] else '**no**')} |")
    lines.append("")

    missed = {c["where"] for c in checks if c["met"] is False and ("tok/s" in c["target"] or "GPU" in c["target"])}
    if missed:
        lines += ["## Where the time goes (rows with a missed time target)", "",
                  "Per decode step, from the profiled steps: the top GPU kernels and the top CPU-side operators "
                  "(self time; Python time of transformers and of the caches is in the host gap, not here).", ""]
    for row in result["rows"]:
        if _row_label(row) not in missed:
            continue
        lines += [f"### {_row_label(row)}", ""]
        for key in ("dynamic", "hf_fp8", "int8"):
            entry = row["caches"].get(key)
            if not entry or "top_kernels" not in entry:
                continue
            lines += [f"**{CACHES[key][0]}**: wall {_f(entry['ms_per_step_wall'])} ms/step, GPU "
                      f"{_f(entry['gpu_ms_per_step'])} ms, host gap {_f(entry['host_gap_ms_per_step'])} ms.", ""]
            for title, top in (("GPU kernel", entry["top_kernels"]), ("CPU operator (self)", entry["top_cpu_ops"])):
                if top:
                    lines += [f"| {title} | ms/step | calls/step |", "| --- | --- | --- |"]
                    lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:g} |" for k in top]
                    lines.append("")
    seen = [entry["hf_kvquant_kernels_seen"] for row in result["rows"] for entry in row["caches"].values()
            if "hf_kvquant_kernels_seen" in entry]
    if seen:
        lines += [f"hf_kvquant's Triton attention kernel in the profile of {sum(seen)} of the {len(seen)} INT8/FP8 "
                  "runs (each also checked at warm-up to receive the quantized buffers in every layer).", ""]
    if result.get("skipped"):
        lines += ["Not run: " + "; ".join(f"{CACHES[k][0]}: {why}" for k, why in result["skipped"].items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Four panels: decode tokens/s, wall vs GPU ms per step, KV memory, and what fits in the budget."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grouped(groups: int, keys: list[str]):
        """(cache, x of its bar in each group, bar width, colour): bars side by side, one colour per cache."""
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(groups)]
            yield key, xs, width, f"C{list(CACHES).index(key)}"

    rows = [r for r in result["rows"] if r["caches"]]
    keys = [k for k in CACHES if any(k in r["caches"] for r in rows)]
    on_gpu = any(_get(r, k, "peak_decode_kv_bytes") is not None for r in rows for k in keys)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    for key, xs, width, color in grouped(len(rows), keys):
        axes[0].bar(xs, [_get(r, key, "decode_tok_s") or 0 for r in rows], width, label=CACHES[key][0], color=color)
        axes[1].bar(xs, [_get(r, key, "ms_per_step_wall") or 0 for r in rows], width, color=color, alpha=0.45)
        axes[1].bar(xs, [_get(r, key, "gpu_ms_per_step") or 0 for r in rows], width * 0.5, color=color, hatch="//",
                    edgecolor="black", linewidth=0.3)
        field = "peak_decode_kv_bytes" if on_gpu else "kv_bytes"
        axes[2].bar(xs, [(_get(r, key, field) or 0) / GIB for r in rows], width, color=color)
    titles = ("decode tokens/s (wall clock)", "ms per decode step: wall (light), GPU (hatched)",
              "peak decode memory of the KV cache, GiB" if on_gpu else "KV cache held, GiB")
    for ax, title in zip(axes[:3], titles):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), [_row_label(r) for r in rows], fontsize=8)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)

    searches = [s for s in result["search"] if s["caches"]]
    groups = [(s, f) for s in searches for f in ("max_batch", "max_context")]
    skeys = [k for k in CACHES if any(k in s["caches"] for s in searches)]
    ax = axes[3]
    for key, xs, width, color in grouped(len(groups), skeys):
        values = [_ratio(_get(s, key, f), _get(s, "dynamic", f)) or 0 for s, f in groups]
        for x, value, (s, f) in zip(xs, values, groups):
            ax.bar(x, value, width, color=color)
            ax.annotate(_f(_get(s, key, f), "d"), (x, value), ha="center", va="bottom", fontsize=7)
    if groups:
        ax.set_xticks(range(len(groups)), [f"{s['shape']}, {s['budget_gib']:g} GiB:\n" + (
            f"batch at {s['context']}" if f == "max_batch" else "context at batch 1") for s, f in groups], fontsize=8)
        ax.axhline(1.8, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title("what fits in the budget, x DynamicCache (labels: absolute)", fontsize=10)
    else:
        ax.axis("off")
    fig.suptitle(f"{result['device']}: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save(result: dict, out_dir: Path, with_plot: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["targets"] = targets(result)
    (out_dir / "bench_generate.json").write_text(json.dumps(result, indent=2))
    (out_dir / "bench_generate.md").write_text(markdown(result))
    if with_plot and not plot(result, out_dir / "bench_generate.png"):
        print("matplotlib is not installed: no plot (draw it elsewhere with --replot)")


# -- main -------------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("triton", "optimum-quanto"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    versions["python"] = platform.python_version()
    return versions


def _parse_rows(text: str) -> list[tuple[str, int, int]]:
    rows = []
    for item in (part.strip() for part in text.split(",")):
        if item in ("", "none"):
            continue
        shape, _, size = item.partition(":")
        batch, _, prompt = size.partition("x")
        if shape not in SHAPES or not batch.isdigit() or not prompt.isdigit():
            raise SystemExit(f"error: bad row {item!r}; expected SHAPE:BATCHxPROMPT with SHAPE in {sorted(SHAPES)}")
        rows.append((shape, int(batch), int(prompt)))
    return rows


def _names(text: str, accepted) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in accepted]
    if unknown:
        raise SystemExit(f"error: unknown {unknown}; accepted: {', '.join(accepted)}")
    return names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer model and short rows (CPU smoke run)")
    parser.add_argument("--quick", action="store_true", help="two 1B rows, fewer steps, a coarse search")
    parser.add_argument("--shapes", default="1b,8b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=None, help="SHAPE:BATCHxPROMPT,... (default: the shapes' rows; 'none')")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"of {', '.join(CACHES)}")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup-prompt", type=int, default=256)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=16,
                        help="decode steps before timing; >= 16 so that Triton has compiled every specialization")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--search-shapes", default="1b", help="shapes whose memory budget is searched ('none': skip)")
    parser.add_argument("--search-caches", default=",".join(SEARCH_CACHES))
    parser.add_argument("--budget-gib", type=float, default=None, help="default: 40 (1B shape), 60 (8B shape)")
    parser.add_argument("--search-context", type=int, default=32768)
    parser.add_argument("--search-steps", type=int, default=4)
    parser.add_argument("--search-granularity", type=int, default=32)
    parser.add_argument("--quanto-build-timeout", type=float, default=0.0,
                        help="seconds allowed to JIT-build quanto's extension (0: use its plain-PyTorch unpack)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="start no new cache or search attempt after this many seconds (0: none)")
    parser.add_argument("--out-dir", type=Path, default=Path("eval/results"))
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the markdown and plot from the JSON in --out-dir")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch during the run (0: unchanged; --tiny: 1, fastest for its tensors)")
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, defaults in (("--quick", QUICK), ("--tiny", TINY)):
        if flag in argv:
            parser.set_defaults(**defaults)  # explicit options still win
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype_ = getattr(torch, args.dtype)
    shapes = _names(args.shapes, SHAPES)
    args.rows_ = _parse_rows(args.rows) if args.rows is not None else [(s, b, p) for s in shapes for b, p in
                                                                       SHAPES[s].rows]
    args.caches_ = _names(args.caches, CACHES)
    args.search_shapes_ = _names(args.search_shapes, SHAPES)
    args.search_caches_ = _names(args.search_caches, CACHES)
    return args


def _past_deadline(args) -> bool:
    return bool(args.deadline_s) and time.perf_counter() - args.start_ > args.deadline_s


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        result = json.loads((args.out_dir / "bench_generate.json").read_text())
        save(result, args.out_dir, with_plot=True)
        return result
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args, argv) -> dict:
    args.start_ = time.perf_counter()
    device = args.device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _versions(),
        "settings": {"dtype": args.dtype, "warmup_prompt": args.warmup_prompt, "prefill_repeats": args.prefill_repeats,
                     "warmup_steps": args.warmup_steps, "steps": args.steps, "repeats": args.repeats,
                     "profile_steps": args.profile_steps, "search_steps": args.search_steps,
                     "search_granularity": args.search_granularity, "argv": sys.argv[1:] if argv is None else argv},
        "rows": [], "search": [], "skipped": {}, "complete": False, "elapsed_s": 0.0,
    }
    caches = list(args.caches_)
    if "hf_quanto_int4" in caches + args.search_caches_:
        try:
            result["quanto"] = prepare_quanto(device, args.quanto_build_timeout)
        except Exception as error:  # noqa: BLE001 -- ImportError when it is not installed; any failure skips it only
            result["skipped"]["hf_quanto_int4"] = f"optimum-quanto unusable: {type(error).__name__}: {error}"
            caches = [k for k in caches if k != "hf_quanto_int4"]
            args.search_caches_ = [k for k in args.search_caches_ if k != "hf_quanto_int4"]
    print(f"{result['device']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))

    def checkpoint(with_plot: bool = False) -> None:
        result["elapsed_s"] = time.perf_counter() - args.start_
        save(result, args.out_dir, with_plot)

    progress = tqdm(total=len(args.rows_) * len(caches), desc="rows x caches", disable=args.no_progress)
    search_progress = tqdm(desc="budget attempts", disable=args.no_progress or not args.search_caches_)
    with torch.inference_mode():
        # The rows first, then the budget searches (their model rebuilt: seconds): a run cut short loses the search.
        for shape_name in dict.fromkeys(s for s, _, _ in args.rows_):
            if _past_deadline(args):
                result["deadline_reached"] = True
                break
            model = build_model(SHAPES[shape_name], device, args.dtype_)
            for shape, batch, prompt in args.rows_:
                if shape != shape_name:
                    continue
                row = {"shape": shape, "model": SHAPES[shape].model, "batch": batch, "prompt": prompt, "caches": {}}
                result["rows"].append(row)
                for key in caches:
                    progress.set_postfix_str(f"{shape} {batch}x{prompt} {key}")
                    if _past_deadline(args):
                        row["caches"][key] = {"skipped": "deadline reached"}
                        result["deadline_reached"] = True
                        continue
                    try:
                        row["caches"][key] = entry = bench_row(model, key, batch, prompt, args)
                        tqdm.write(f"{shape} {batch}x{prompt} {CACHES[key][0]:<27} "
                                   f"prefill {entry['prefill_ms']:9.1f} ms  decode {entry['decode_tok_s']:8.1f} tok/s  "
                                   f"{entry['ms_per_step_wall']:7.2f} ms/step (GPU {_f(entry['gpu_ms_per_step'])})  "
                                   f"KV {entry['kv_bytes'] / 2**20:.1f} MiB")
                    except Exception as error:  # noqa: BLE001 -- record it, free the memory, go on with the rest
                        row["caches"][key] = {"error": f"{type(error).__name__}: {error}"}
                        tqdm.write(f"{shape} {batch}x{prompt} {CACHES[key][0]}: {row['caches'][key]['error']}")
                    free_memory(device, collect="error" in row["caches"][key])
                    progress.update()
                    checkpoint()
            del model
            free_memory(device, collect=True)
        for shape_name in args.search_shapes_ if args.search_caches_ else ():
            if _past_deadline(args):
                result["deadline_reached"] = True
                break
            model = build_model(SHAPES[shape_name], device, args.dtype_)
            result["search"].append(search_budget(model, shape_name, args, search_progress))
            checkpoint()
            del model
            free_memory(device, collect=True)
    progress.close()
    search_progress.close()
    result["complete"] = not result.get("deadline_reached") and not any(
        s.get("deadline_reached") for s in result["search"])
    checkpoint(with_plot=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
