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
  (``int8_per_token_head``, ...; ``unquantized`` is ``dynamic``);
- compiled decoding, as `generate` runs it over a preallocated (compileable) cache: ``static_compiled`` (transformers'
  bf16 `StaticCache` + ``sdpa``, the anchor), ``static_compiled_no_cudnn`` (the same with cuDNN SDPA off, opt-in:
  on an H200 with torch 2.11 it was slower than cuDNN; the compiled targets use the faster of the two where both ran),
  ``int8_compiled`` / ``fp8_compiled`` (`QuantizedPerTokenHeadCache` with ``max_cache_len`` + hf_kvquant's
  attention). Every layer is preallocated for the prompt plus every decode step the
  row runs (warm-up, timed, profiled, checked), the length `generate` would give it for that many new tokens. The
  prefill runs eagerly; each decode step goes through ``model.get_compiled_call(CompileConfig(fullgraph=True, ...))``
  (exactly what `generate` calls: ``torch.compile(model.__call__)``, inductor + ``reduce-overhead``, i.e. CUDA graphs,
  unless ``--compile-backend`` / ``--compile-mode`` say otherwise), fed what `generate` feeds it
  (``prepare_inputs_for_generation``: the last ids, position ids, its 2D mask turned into the attention's own mask
  outside the graph, ``logits_to_keep=1``; see `GenerateInputs`).

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
from transformers import (AttentionInterface, AutoModelForCausalLM, CompileConfig, LlamaConfig, QuantizedCache,
                          StaticCache)
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
EAGER_CACHES = {**BASELINES, **{m.short_name: (f"hf_kvquant {m.short_name.upper()}", ATTENTION_NAME)
                                for m in KVQuantMode}}
# Compiled decoding over preallocated caches (opt-in: --caches or --compiled): StaticCache, the anchor, then ours.
# StaticCache under compile also without cuDNN SDPA (opt-in; measured slower on an H200 with torch 2.11: efficient
# attention over the masked capacity); the compiled targets take the faster StaticCache of a row.
COMPILED = {"static_compiled": ("StaticCache + compile", "sdpa"),
            "static_compiled_no_cudnn": ("StaticCache + compile (no cuDNN SDPA)", "sdpa"),
            **{f"{m.short_name}_compiled": (f"hf_kvquant {m.short_name.upper()} + compile", ATTENTION_NAME)
               for m in KVQuantMode}}
CACHES = {**EAGER_CACHES, **COMPILED}

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
    if name in BASELINES or name in COMPILED:
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


def build_cache(key: str, model, max_cache_len: int | None = None):
    """A fresh cache of kind ``key``, the model switched to the attention it goes with first: hf_kvquant's cache reads
    ``config._attn_implementation`` when built to decide whether it hands attention its quantized buffers. The
    compiled kinds are preallocated for ``max_cache_len`` tokens."""
    attention = CACHES[key][1]
    model.set_attn_implementation(attention)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"could not switch the model to {attention!r} attention")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(not key.endswith("_no_cudnn"))
    if key == "hf_fp8":
        return QuantizedCache(backend="fp8", config=model.config)
    if key == "hf_quanto_int4":
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    if key in BASELINES:  # the two DynamicCache rows
        return make_cache(model, UNQUANTIZED)
    if key in COMPILED and max_cache_len is None:
        raise ValueError(f"{key} is preallocated: give max_cache_len")
    if key.startswith("static_compiled"):
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache = make_cache(model, key.removesuffix("_compiled"), max_cache_len=max_cache_len if key in COMPILED else None)
    if not cache.hands_over_quantized:
        raise RuntimeError("QuantizedPerTokenHeadCache would hand dequantized tensors to attention")
    return cache


def prefill(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt ``ids [batch, prompt]`` through the model into ``cache``; return the next ids ``[batch, 1]``.
    Only the last position's logits are computed (a [batch, prompt, vocab] tensor would dwarf the cache)."""
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def eager_step(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """One eager decode step of the growable caches: the new ids and the cache (positions from its length)."""
    return model(input_ids=ids, cache=cache, use_cache=True).logits


class GenerateInputs:
    """One decode step fed as `generate` feeds it over a compileable cache, through ``forward`` (the compiled call, or
    the model itself for the eager reference): generate's 2D mask grows by one and its position ids advance by one,
    then ``model.prepare_inputs_for_generation`` gives the forward the last ids, the cache, the position ids
    ``[batch, 1]``, the attention's own mask made from the 2D mask outside the graph (SDPA: a boolean
    ``[batch, 1, 1, max_cache_len]``; hf_kvquant: none when nothing is padded) and ``logits_to_keep=1``. Holds the
    state of one sequence of steps, after a prompt of ``length`` tokens."""

    def __init__(self, model, forward, batch: int, length: int, device: torch.device):
        self.model, self.forward = model, forward
        self.mask = torch.ones(batch, length, dtype=torch.long, device=device)
        self.positions = torch.full((batch, 1), length - 1, dtype=torch.long, device=device)

    def __call__(self, model, cache, ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        self.positions = self.positions + 1
        inputs = self.model.prepare_inputs_for_generation(
            ids, next_sequence_length=1, cache=cache, attention_mask=self.mask, position_ids=self.positions,
            use_cache=True, logits_to_keep=1)
        return self.forward(**inputs).logits

    def rewind(self, steps: int) -> None:
        """Back ``steps`` steps (with the cache's ``crop(-steps)``)."""
        self.mask = self.mask[:, :-steps]
        self.positions = self.positions - steps


def decode(model, cache, ids: torch.Tensor, steps: int, step=eager_step) -> torch.Tensor:
    """``steps`` greedy single-token steps from ``ids [batch, 1]``; the argmax stays on the device (no host sync).
    ``step(model, cache, ids)`` returns the logits of one step (`eager_step`, or a `GenerateInputs`)."""
    for _ in range(steps):
        logits = step(model, cache, ids)
        ids = logits[:, -1].argmax(-1, keepdim=True)
    return ids


def time_decode(model, cache, ids: torch.Tensor, steps: int, repeats: int, device: torch.device, step=eager_step):
    """``repeats`` timings of ``steps`` greedy steps from ``ids``, each with one synchronize at its end: returns the
    last ids and the seconds per step of each repeat."""
    step_s = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        ids = decode(model, cache, ids, steps, step)
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


def profile_decode(model, cache, ids: torch.Tensor, steps: int, device: torch.device, top: int = 8, step=eager_step):
    """Decode ``steps`` steps under `torch.profiler`: GPU time per step (sum of kernel, copy and memset durations),
    the top kernels and the top CPU-side operators (self time), per step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        ids = decode(model, cache, ids, steps, step)
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


def decode_steps(args) -> int:
    """The decode steps a row runs after its prefill (a compiled cache is preallocated for them): the warm-up (at least
    one, the compiled step that compiles), the timed and the profiled steps, and the steps checked against eager."""
    return max(args.warmup_steps, 1) + args.steps * args.repeats + args.profile_steps + args.match_steps


def compiled_call(model, args):
    """A new ``model.get_compiled_call(CompileConfig(fullgraph=True, ...))``, what `generate` decodes with over a
    compileable cache: the call cached on the model by an earlier cache is dropped first (with the same config,
    transformers would hand it back)."""
    for name in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(name, None)
    return model.get_compiled_call(CompileConfig(fullgraph=True, backend=args.compile_backend, mode=args.compile_mode))


@contextlib.contextmanager
def compiling(model):
    """Where one cache compiles and runs: dynamo reset on entry and exit (no graph, guard, automatic-dynamic shape or
    CUDA graph pool of another cache or attention survives, and the pools' memory is given back), inside a fresh
    inductor + Triton cache directory (every cache compiles cold, whichever ran before it)."""
    from torch._inductor import utils

    fresh_cache = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # its name before torch 2.8
    torch._dynamo.reset()
    try:
        with fresh_cache():
            yield
    finally:
        for name in ("_compiled_call", "_last_compile_config"):
            model.__dict__.pop(name, None)
        torch._dynamo.reset()


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


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


@contextlib.contextmanager
def as_generate():
    """The grad mode `generate` runs in, ``torch.no_grad`` (the rest of the benchmark runs in ``torch.inference_mode``),
    for the compiled caches, which are then made there too."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def bench_row(model, key: str, batch: int, prompt: int, args) -> dict:
    if key in COMPILED:
        with as_generate():
            return _bench_row(model, key, batch, prompt, args)
    return _bench_row(model, key, batch, prompt, args)


def _bench_row(model, key: str, batch: int, prompt: int, args) -> dict:
    device, vocab = args.device, model.config.vocab_size
    layers = model.config.num_hidden_layers
    free_memory(device)
    baseline = _allocated(device)  # the weights and whatever else lives without a cache
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
        _reset_peak(device)
        synchronize(device)
        start = time.perf_counter()
        next_ids = prefill(model, cache, ids)
        synchronize(device)
        prefill_s.append(time.perf_counter() - start)
    prefill_peak = _peak(device)
    del ids

    extra = {}
    _reset_peak(device)
    with compiling(model) if compiled else contextlib.nullcontext():
        step, warmup_steps = steps_after(prompt), args.warmup_steps
        if compiled:
            # The first compiled step, alone: the time to the first compiled token, compilation included.
            graphs = _graphs_compiled()
            step.forward = compiled_call(model, args)
            synchronize(device)
            start = time.perf_counter()
            next_ids = decode(model, cache, next_ids, 1, step)
            synchronize(device)
            extra = {"max_cache_len": length, "compile_s": time.perf_counter() - start,
                     "peak_compile_bytes": _peak(device)}
            _reset_peak(device)
            warmup_steps = max(warmup_steps - 1, 0)
        start = time.perf_counter()
        next_ids = decode(model, cache, next_ids, warmup_steps, step)
        synchronize(device)
        warmup_s = time.perf_counter() - start
        next_ids, step_s = time_decode(model, cache, next_ids, args.steps, args.repeats, device, step)
        peak = _peak(device)
        tokens = int(cache.get_seq_length())
        held = kv_bytes(cache)
        profile = {"gpu_ms_per_step": None, "kernel_names": [], "top_kernels": [], "top_cpu_ops": []}
        if args.profile_steps > 0:
            next_ids, profile = profile_decode(model, cache, next_ids, args.profile_steps, device, step=step)
        if compiled:
            extra["compile_warmup_s"] = warmup_s  # the rest of the warm-up: under CUDA graphs, the recording
            if args.match_steps > 0:
                extra.update(match_eager(model, cache, next_ids, step, args.match_steps))
            extra["graphs_compiled"] = _graphs_compiled() - graphs
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
