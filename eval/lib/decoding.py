"""The decode loop, driven the same way for every cache (eval/bench_generate.py, eval/soak.py,
eval/bench_tensor_parallel.py): prefill, greedy steps eager or fed as `generate` feeds a compiled step, their timing
and profile, and the device's synchronisation and memory counters (no-ops on the CPU).
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch
from torch.autograd import DeviceType
from transformers import CompileConfig


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


def allocated_bytes(device: torch.device) -> int | None:
    """GPU memory allocated now (None on the CPU, which has no such counter)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak_bytes(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """GPU memory allocated at most since the last `reset_peak_bytes` (None on the CPU)."""
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


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (the difference over a span: what it compiled there)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def as_generate():
    """The grad mode `generate` runs in, ``torch.no_grad`` (the rest of the benchmark runs in ``torch.inference_mode``),
    for the compiled caches, which are then made there too."""
    with torch.inference_mode(False), torch.no_grad():
        yield
