"""How fast each cache generates (eval/bench_generate.py's timing rows): the random-weight models, the caches
compared, the decode loop driven the same way for every cache, and one timed row.

Caches, each with the attention it is meant for:
- ``dynamic``: transformers' `DynamicCache` + ``sdpa`` (the default);
- ``dynamic_no_cudnn``: the same with PyTorch's cuDNN SDPA backend switched off (on torch 2.11 + H100 the
  default picks cuDNN, whose host time per call dominates small decode steps; the targets compare with ``dynamic``);
- ``hf_fp8``: transformers' `QuantizedCache(backend="fp8")` + ``sdpa`` (one frozen per-tensor scale);
- ``hf_quanto_int4``: `QuantizedCache(backend="quanto", nbits=4)` + ``sdpa`` (needs optimum-quanto);
- ``int8`` / ``fp8``: `QuantizedPerTokenHeadCache` + hf_kvquant's attention (`hf_kvquant.ATTENTION_NAME`), built by
  `hf_kvquant.evaluation.make_cache`; on the command line any name of the mode vocabulary selects them
  (``int8_per_token_head``, ...; ``unquantized`` is ``dynamic``).

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

quanto: its INT4 cache dequantizes through ``torch.ops.quanto.unpack``, whose CUDA (and CPU) kernel is a C++/CUDA
extension that quanto JIT-compiles with ninja and nvcc on first use (with its Marlin and AWQ GEMMs: minutes),
with no fallback of its own. Here the extension is not built: its ``unpack`` is replaced by quanto's own
plain-PyTorch version of the same op (a few elementwise kernels instead of one). ``--quanto-build-timeout S``
builds it in a child process first and uses it if that finishes within S seconds (the child's process group is
killed otherwise; nothing hangs). quanto re-quantizes its whole cache every 128 steps; the measured window is
shorter, which favours it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, QuantizedCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedKV, kv_cache_nbytes
from hf_kvquant.evaluation import ACCEPTED_MODES, UNQUANTIZED, make_cache, parse_mode


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

# key: (label, attention implementation). Transformers' caches, the baselines:
BASELINES = {
    "dynamic": ("DynamicCache", "sdpa"),
    # The same with PyTorch's cuDNN SDPA backend off (flash / memory-efficient kernels): on torch 2.11 + H100 the
    # default picks cuDNN, whose host time per call grows with every new key length; this shows it without that cost.
    "dynamic_no_cudnn": ("DynamicCache (no cuDNN SDPA)", "sdpa"),
    "hf_fp8": ("QuantizedCache fp8", "sdpa"),
    "hf_quanto_int4": ("QuantizedCache quanto int4", "sdpa"),
}
# ... and ours, one per quantization mode, keyed by the mode's short name.
CACHES = {**BASELINES, **{m.short_name: (f"hf_kvquant {m.short_name.upper()}", ATTENTION_NAME) for m in KVQuantMode}}

# Prefills longer than this many tokens (batch x prompt) run once after the warm-up: they take long enough (0.1 s to
# seconds) that run-to-run noise is small, and each repeat of the largest rows costs seconds of GPU time.
REPEATED_PREFILL_TOKENS = 16384


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
            cache = build_cache(key, model)
            decode(model, cache, prefill(model, cache, ids), 1)
            synchronize(device)
        except Exception as error:  # noqa: BLE001 -- the rows of this cache will fail and say why; the others run
            print(f"warm-up of {CACHES[key][0]} failed: {type(error).__name__}: {error}")
    return model


def _cache_key(name: str) -> str | None:
    if name in BASELINES:
        return name
    try:
        mode = parse_mode(name)
    except ValueError:
        return None
    return "dynamic" if mode.quantization is None else mode.quantization.short_name


def cache_keys(text: str, offered: dict = CACHES) -> list[str]:
    """Comma-separated cache names ('none': no cache) -> keys of ``offered``, each once, in the order given. A name
    is a baseline's key or any name of the mode vocabulary (`ACCEPTED_MODES`: ``"unquantized"`` is ``dynamic``,
    ``"int8_per_token_head"`` and ``"int8"`` are ``int8``, ...); any other raises a `ValueError` saying what is."""
    names = [name.strip() for name in text.split(",") if name.strip() not in ("", "none")]
    keys = [_cache_key(name) for name in names]
    for name, key in zip(names, keys):
        if key not in offered:
            raise ValueError(f"unknown cache {name!r}; accepted: {', '.join(offered)}, or by mode name: "
                             f"{', '.join(ACCEPTED_MODES)}")
    return list(dict.fromkeys(keys))


def build_cache(key: str, model):
    """A fresh cache of kind ``key``, the model switched to the attention it goes with first: hf_kvquant's cache reads
    ``config._attn_implementation`` when built to decide whether it hands attention its quantized buffers."""
    attention = CACHES[key][1]
    model.set_attn_implementation(attention)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"could not switch the model to {attention!r} attention")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(key != "dynamic_no_cudnn")
    if key == "hf_fp8":
        return QuantizedCache(backend="fp8", config=model.config)
    if key == "hf_quanto_int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    if key in BASELINES:  # the two DynamicCache rows
        return make_cache(model, UNQUANTIZED)
    cache = make_cache(model, key)
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
        cache = build_cache(key, model)
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
        cache = build_cache(key, model)
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

