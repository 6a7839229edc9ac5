"""Faults: an out-of-memory error while a layer allocates its buffers, and two caches used from two threads.

Out of memory. On the CPU the failure is injected: the modules of `hf_kvquant.cache` are handed a ``torch`` whose
``zeros`` (every buffer the cache allocates goes through it) raises `torch.OutOfMemoryError` at its n-th call. A run of
updates goes through a cache and through a twin that never fails; at every update that allocates, each of its
allocations is failed in turn (the first preallocation with ``max_cache_len``, the lazy start of a growable layer,
growth in the middle of a long run, a sliding-window layer's growth and give-back). After each fault:

* the error says the bytes asked (checked against the bytes of the allocation that failed) and the bytes the layer
  holds;
* the cache is unchanged: same counters and buffers (addresses included), same token counts, dequantized contents and
  ``nbytes`` as a deep copy taken before;
* the same update, retried without the fault, succeeds and returns what the twin's returned; the run ends with the
  cache equal to the twin (where a give-back failed: the latest tokens both hold, and the same ``nbytes``).

A sliding-window layer gives memory back after a long prompt; a failure there is swallowed (the update is whole, the
larger buffer stays until a later step gives it back). On a GPU the memory is really exhausted (`requires_cuda`).

Threads. Two caches, each driven from its own thread on its own CUDA stream (updates and `hf_kvquant.ops.attention`,
prefill then decode), give bit for bit the outputs and buffers of the same work run one after the other.

`test_fault_count` (last) prints how many faults were injected and survived (``pytest -s``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import re
import sys
import threading
import types

import pytest
import torch
from conftest import assert_same_state, gemma_config, live_tokens, llama_config, requires_cuda, state, tokens

import hf_kvquant.cache as cache_package
from hf_kvquant.cache import storage
from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedKV, QuantizedPerTokenHeadCache
from hf_kvquant.integration import attend_quantized
from hf_kvquant.ops.reference import dequantize

FAULTS = collections.Counter()  # reported by test_fault_count
MESSAGE = re.compile(r"out of memory on (\S+) allocating (\d+) bytes for (\d+) slots of a layer .* that holds (\d+) "
                     r"bytes")


# ---------------------------------------------------------------------------------------------------------------
# the injection
# ---------------------------------------------------------------------------------------------------------------


class FailingTorch(types.ModuleType):
    """``torch`` as `hf_kvquant.cache` sees it, except that ``zeros`` raises `torch.OutOfMemoryError` at its call
    number ``fail_at`` (from 1; 0: never), as the CUDA allocator does when memory runs out. Records, for every call,
    the calling function's name and the bytes asked."""

    def __init__(self, fail_at: int = 0):
        super().__init__("torch")
        self.fail_at, self.calls, self.raised = fail_at, [], None

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *size, dtype=None, device=None, **kwargs):
        numel = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size).numel()
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        caller = sys._getframe(1).f_code.co_name
        if caller in ("token_minor_zeros", "zeros"):  # a layer's value codes (its value layout): its caller's
            caller = sys._getframe(2).f_code.co_name
        self.calls.append((caller, numel * itemsize))
        if len(self.calls) == self.fail_at:
            self.raised = torch.OutOfMemoryError(f"injected: allocation {self.fail_at} fails")
            raise self.raised
        return torch.zeros(*size, dtype=dtype, device=device, **kwargs)


@contextlib.contextmanager
def cache_torch(fake: FailingTorch):
    """The modules of `hf_kvquant.cache` see ``fake`` as ``torch`` inside the block (nothing else does)."""
    modules = [m for name, m in sys.modules.items()
               if name.startswith(cache_package.__name__ + ".") and getattr(m, "torch", None) is torch]
    for module in modules:
        module.torch = fake
    try:
        yield fake
    finally:
        for module in modules:
            module.torch = torch


def asked_bytes(calls, index: int) -> int:
    """The bytes of the `_allocate` call (four buffers, four calls) that the call ``index`` (from 0) of the complete
    record ``calls`` belongs to."""
    assert calls[index][0] == "_allocate"
    group = (sum(name == "_allocate" for name, _ in calls[: index + 1]) - 1) // 4
    sizes = [size for name, size in calls if name == "_allocate"]
    assert len(sizes) % 4 == 0, calls
    return sum(sizes[4 * group : 4 * group + 4])


def readout(cache) -> list:
    """Per layer: the token count, ``nbytes`` and the live tokens' keys and values dequantized to float32."""
    out = []
    for layer in cache.layers:
        entry = [int(layer.get_seq_length()), layer.nbytes]
        if layer.is_initialized:
            n = live_tokens(layer)
            entry += [dequantize(d[:, :, :n], s[:, :, :n], torch.float32)
                      for d, s in ((layer.key_data, layer.key_scale), (layer.value_data, layer.value_scale))]
        out.append(entry)
    return out


def assert_same_readout(a, b, last_only=False):
    """Two `readout`s are the same (``last_only``: the latest tokens that both hold: a sliding-window layer may hold
    more or fewer of the tokens before its window, depending on when it last gave memory back)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:2] == y[:2] and len(x) == len(y)
        for t, u in zip(x[2:], y[2:]):
            if last_only:
                n = min(t.shape[2], u.shape[2])
                t, u = t[:, :, t.shape[2] - n :], u[:, :, u.shape[2] - n :]
            assert torch.equal(t, u)


def assert_same_output(got, want):
    """What two `update` calls returned (tensors or `QuantizedKV`), compared bit for bit as dequantized float32."""
    for g, w in zip(got, want):
        g, w = (t.dequantize() if isinstance(t, QuantizedKV) else t for t in (g, w))
        assert g.shape == w.shape and torch.equal(g.float(), w.float())


# ---------------------------------------------------------------------------------------------------------------
# out of memory, injected (CPU)
# ---------------------------------------------------------------------------------------------------------------


def forwards(layers: int, counts, batch=2, heads=2, head_dim=64, dtype=torch.float32, seed=0):
    """The updates of forward passes of ``counts`` tokens each: ``(layer, keys, values)`` in order."""
    return [(layer, *tokens((batch, heads, n, head_dim), dtype, seed=seed + 100 * step + layer))
            for step, n in enumerate(counts) for layer in range(layers)]


def _hybrid(layer_types, window, heads=2):
    return gemma_config(layer_types, window, heads=heads)


# name: (cache options, updates). Every update that allocates is failed at each of its allocations.
PLANS = {
    # the first update of each layer preallocates max_cache_len slots (4 buffers, then the device-side length)
    "preallocated": (lambda: {"config": llama_config(layers=2, heads=2), "max_cache_len": 64},
                     lambda: forwards(2, [5, 1, 1, 3])),
    "preallocated_hybrid": (lambda: {"config": _hybrid(["sliding_attention", "full_attention"], 4),
                                     "max_cache_len": 48},
                            lambda: forwards(2, [7, 1, 2], dtype=torch.bfloat16)),
    # a growable layer's first update: an empty allocation at its lazy start, then its first growth
    "growable_first_update": (lambda: {"config": llama_config(layers=2, heads=2)},
                              lambda: forwards(2, [10, 1, 1])),
    # growth every ~80 tokens of a full-attention layer beside a sliding one, decoding one token at a time: at
    # tokens 113, 193, 273 and 353
    "long_run": (lambda: {"config": _hybrid(["full_attention", "sliding_attention"], 16, heads=1), "hadamard": True},
                 lambda: forwards(2, [40] + [1] * 330, batch=1, heads=1)),
    # a prompt longer than the window: growth, then the memory given back (a failure there is swallowed)
    "sliding_long_prompt": (lambda: {"config": _hybrid(["sliding_attention"], 4)},
                            lambda: forwards(1, [2, 300, 1, 1, 70, 1])),
}


def _check_fault(cache, before_state, before_copy, held_by_layer, error, fake: FailingTorch, layer_idx: int,
                 all_calls):
    """After ``error`` was raised by an update of ``layer_idx`` that failed at ``fake.fail_at`` (``all_calls``: the
    same update's calls where none fails): the message, and the cache unchanged."""
    failed_in = fake.calls[-1][0]
    assert fake.calls == all_calls[: fake.fail_at]
    if failed_in == "_allocate":
        assert error.__cause__ is fake.raised
        found = MESSAGE.search(str(error))
        assert found, str(error)
        assert int(found.group(2)) == asked_bytes(all_calls, fake.fail_at - 1), str(error)
        assert int(found.group(4)) == held_by_layer, str(error)
        FAULTS["message_with_bytes"] += 1
    else:  # the preallocated layer's 8-byte token count, allocated after its buffers: torch's own error
        assert failed_in == "lazy_initialization" and error is fake.raised
        FAULTS["message_from_torch"] += 1
    assert_same_state(before_state, state(cache))
    assert_same_readout(readout(before_copy), readout(cache))
    assert cache.nbytes == before_copy.nbytes and cache.layers[layer_idx].nbytes == held_by_layer


@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.value)
@pytest.mark.parametrize("plan", list(PLANS))
def test_out_of_memory_leaves_the_cache_unchanged_and_usable(plan, mode):
    options, updates = PLANS[plan]
    cache = QuantizedPerTokenHeadCache(mode=mode, **options())
    twin = QuantizedPerTokenHeadCache(mode=mode, **options())
    faults_here, swallowed_before = 0, FAULTS["swallowed_give_back"]
    for layer_idx, k, v in updates():
        with cache_torch(FailingTorch()) as counter:
            want = twin.update(k, v, layer_idx)
        done = False
        for fail_at in range(1, len(counter.calls) + 1):
            before_state, before_copy = state(cache), copy.deepcopy(cache)
            held = cache.layers[layer_idx].nbytes
            try:
                with cache_torch(FailingTorch(fail_at)) as fake:
                    got = cache.update(k, v, layer_idx)
            except torch.OutOfMemoryError as error:
                FAULTS["injected"] += 1
                faults_here += 1
                _check_fault(cache, before_state, before_copy, held, error, fake, layer_idx, counter.calls)
                FAULTS["survived"] += 1  # unchanged; usable is checked by the retry below
                continue
            # not raised: a sliding layer's give-back failed (swallowed) and the update went through
            assert fake.raised is not None and fake.calls[-1][0] == "_allocate", fake.calls
            FAULTS["injected"] += 1
            faults_here += 1
            FAULTS["swallowed_give_back"] += 1
            assert_same_output(got, want)
            assert cache.layers[layer_idx].nbytes > twin.layers[layer_idx].nbytes  # the larger buffer stays
            FAULTS["survived"] += 1
            done = True
            break
        if not done:
            assert_same_output(cache.update(k, v, layer_idx), want)
        assert int(cache.get_seq_length(layer_idx)) == int(twin.get_seq_length(layer_idx))
    assert faults_here >= 8
    # nbytes too (a later step gave a larger buffer back); after a give-back failed, its next one kept fewer tokens
    swallowed = FAULTS["swallowed_give_back"] > swallowed_before
    assert_same_readout(readout(cache), readout(twin), last_only=swallowed)
    if not swallowed:
        assert_same_state(state(cache, live_only=True), state(twin, live_only=True))


def test_failed_first_update_leaves_a_growable_layer_uninitialized():
    """A growable layer whose first update failed takes a first update of another shape and dtype, as a new one does."""
    cache = QuantizedPerTokenHeadCache(config=llama_config(layers=1, heads=2))
    with cache_torch(FailingTorch(5)), pytest.raises(torch.OutOfMemoryError, match="holds 0 bytes"):
        cache.update(*tokens((2, 2, 10, 64)), 0)
    FAULTS["injected"] += 1
    assert not cache.layers[0].is_initialized and cache.nbytes == 0 and cache.get_seq_length() == 0
    fresh = QuantizedPerTokenHeadCache(config=llama_config(layers=1, heads=2))
    k, v = tokens((3, 2, 4, 64), torch.bfloat16, seed=1)
    assert_same_output(cache.update(k, v, 0), fresh.update(k, v, 0))
    FAULTS["survived"] += 1


# ---------------------------------------------------------------------------------------------------------------
# out of memory, for real (GPU)
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_memory_exhausted(device):
    """This process may allocate no more GPU memory than it holds now: PyTorch's allocator raises its real
    out-of-memory error past that cap (``set_per_process_memory_fraction``), while other processes on the GPU (test
    workers) are untouched, as they would not be by a hog of the whole device."""
    device = torch.cuda.current_device() if device.index is None else device.index  # the cap takes an index
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # no cached free block may serve the request
    total = torch.cuda.mem_get_info(device)[1]
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved(device) / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


GPU_HEADS, GPU_HEAD_DIM = 8, 128


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.value)
def test_preallocating_more_than_the_gpu_holds_raises_and_leaks_nothing(mode):
    device = torch.device("cuda")
    total = torch.cuda.mem_get_info(device)[1]
    per_token = 2 * GPU_HEADS * (GPU_HEAD_DIM + 4)  # keys and values: one-byte codes and a float32 scale per head
    # Twice the device, in whole 16-slot rows of token-minor value codes (their padding would add to the bytes asked:
    # a length off that multiple made this test depend on the card's memory size)
    max_cache_len = (2 * total // per_token) // 16 * 16
    cache = QuantizedPerTokenHeadCache(config=llama_config(layers=1, heads=GPU_HEADS, head_dim=GPU_HEAD_DIM),
                                       mode=mode, max_cache_len=max_cache_len)
    k, v = (t.to(device, torch.bfloat16) for t in tokens((1, GPU_HEADS, 4, GPU_HEAD_DIM)))
    allocated = torch.cuda.memory_allocated(device)
    with pytest.raises(torch.OutOfMemoryError) as excinfo:
        cache.update(k, v, 0)
    FAULTS["injected"] += 1
    message = str(excinfo.value)
    print(message)
    assert f"allocating {per_token * max_cache_len} bytes" in message and "holds 0 bytes" in message
    assert not cache.layers[0].is_initialized and cache.nbytes == 0 and cache.get_seq_length() == 0
    excinfo = None  # the traceback's frames go
    assert torch.cuda.memory_allocated(device) == allocated  # nothing of the failed buffers is left
    FAULTS["survived"] += 1


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode), ids=lambda m: m.value)
@pytest.mark.parametrize("layout", ["growth", "preallocation"])
def test_real_out_of_memory_leaves_the_cache_unchanged_and_usable(layout, mode):
    device = torch.device("cuda")
    # The cap stops new segments only: a request that fits in a free part of a segment in use is served whatever the
    # cap. Freed first, this test's buffers get segments of their own (blocks of 10 MB and more get one of their exact
    # size, smaller ones share 20 MB segments), so a request above 20 MB finds no such part.
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    config = llama_config(layers=1, heads=GPU_HEADS, head_dim=GPU_HEAD_DIM)
    max_cache_len = None if layout == "growth" else 1 << 16
    cache, twin = (QuantizedPerTokenHeadCache(config=config, mode=mode, max_cache_len=max_cache_len)
                   for _ in range(2))
    # growth: 1000 tokens, then 32768 more (>= 32 MB per code buffer); preallocation: 16 tokens into 65536 slots (64
    # MB per code buffer)
    counts = [1000, 32768] if layout == "growth" else [16]
    updates = [[t.to(device, torch.bfloat16) for t in tokens((1, GPU_HEADS, n, GPU_HEAD_DIM), seed=n)] for n in counts]
    *prefill, new = updates
    for kv in prefill:
        cache.update(*kv, 0)
        twin.update(*kv, 0)
    want = twin.update(*new, 0)
    before_state, before_copy = state(cache), copy.deepcopy(cache)
    held = cache.nbytes
    torch.cuda.synchronize(device)
    allocated = torch.cuda.memory_allocated(device)
    with gpu_memory_exhausted(device), pytest.raises(torch.OutOfMemoryError) as excinfo:
        cache.update(*new, 0)
    FAULTS["injected"] += 1
    message = str(excinfo.value)
    excinfo = None  # the traceback's frames go
    assert torch.cuda.memory_allocated(device) == allocated  # nothing of the failed buffers is left
    print(f"{layout}: {message}")
    found = MESSAGE.search(message)
    assert found and int(found.group(4)) == held, message
    assert_same_state(before_state, state(cache))
    assert_same_readout(readout(before_copy), readout(cache))
    got = cache.update(*new, 0)  # memory back: the same update goes through
    assert_same_output(got, want)
    assert int(found.group(2)) == twin.layers[0].nbytes  # the bytes asked are the bytes the layer then holds
    assert_same_readout(readout(cache), readout(twin))
    FAULTS["survived"] += 1


# ---------------------------------------------------------------------------------------------------------------
# two caches, two threads, two CUDA streams
# ---------------------------------------------------------------------------------------------------------------

STREAM_LAYOUTS = {
    # name: (cache options from (kv heads, head_dim, prefill tokens), whether layer 0 has a window of prefill // 2)
    "growable_hybrid": (lambda h, d, p: {"config": _attn(gemma_config(["sliding_attention", "full_attention"],
                                                                      p // 2, heads=h, head_dim=d))}, True),
    "preallocated": (lambda h, d, p: {"config": _attn(llama_config(layers=2, heads=h, head_dim=d)),
                                      "max_cache_len": 2 * p}, False),
}


def _attn(config):
    config._attn_implementation = ATTENTION_NAME  # the cache hands attention its QuantizedKV
    assert config._attn_implementation == ATTENTION_NAME
    return config


def _stream_inputs(device, dtype, heads, head_dim, prefill, steps, seed):
    """Per forward pass (a prefill of ``prefill`` tokens, then ``steps`` single tokens) and layer: (q, k, v), with 4
    query heads per KV head."""
    g = torch.Generator().manual_seed(seed)
    passes = []
    for n in [prefill] + [1] * steps:
        passes.append([tuple((torch.randn(1, h, n, head_dim, generator=g) * 2).to(device, dtype)
                             for h in (4 * heads, heads, heads)) for _ in range(2)])
    return passes


def _drive(cache, passes, window) -> list[torch.Tensor]:
    """Every pass through both layers: update, then attention over what the update returned."""
    outs = []
    for layer_inputs in passes:
        for layer_idx, (q, k, v) in enumerate(layer_inputs):
            kq, vq = cache.update(k, v, layer_idx)
            assert isinstance(kq, QuantizedKV)
            sliding = window if cache.layers[layer_idx].is_sliding else None
            outs.append(attend_quantized(q, kq, vq, None, sliding_window=sliding))
    return outs


def in_threads(jobs, device: torch.device) -> list:
    """Run each job in its own thread, on its own CUDA stream (on a GPU), all starting together; their results once
    all streams are done. An exception in a job is raised here."""
    on_gpu = device.type == "cuda"
    streams = [torch.cuda.Stream(device) if on_gpu else None for _ in jobs]
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def work(i):
        try:
            if on_gpu:
                streams[i].wait_stream(torch.cuda.current_stream(device))  # what the job reads was made there
            with torch.cuda.stream(streams[i]) if on_gpu else contextlib.nullcontext():
                start.wait()
                results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 -- raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if on_gpu:
        for s in streams:
            torch.cuda.current_stream(device).wait_stream(s)
        torch.cuda.synchronize(device)
    return results


def _buffers(cache) -> list[torch.Tensor]:
    return [t.view(torch.uint8) if t.element_size() == 1 else t for layer in cache.layers for t in layer.buffers]


@pytest.mark.parametrize("layout", list(STREAM_LAYOUTS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_two_caches_on_two_threads_and_streams_equal_one_after_the_other(device, layout, monkeypatch):
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    # GPU: long enough for the split-KV decode path and growth of its buffers; CPU: the threads alone, small
    heads, head_dim, prefill, steps, dtype = (2, 128, 1100, 300, torch.bfloat16) if on_gpu else (
        1, 64, 40, 30, torch.float32)
    make, sliding = STREAM_LAYOUTS[layout]
    window = prefill // 2 if sliding else None
    inputs = [_stream_inputs(device, dtype, heads, head_dim, prefill, steps, seed) for seed in (0, 1)]

    def new_caches():
        return [QuantizedPerTokenHeadCache(mode=mode, **make(heads, head_dim, prefill)) for mode in KVQuantMode]

    # one after the other, on the current stream (it also compiles every kernel the threads will launch)
    sequential_caches = new_caches()
    sequential = [_drive(c, x, window) for c, x in zip(sequential_caches, inputs)]
    for round_ in range(3 if on_gpu else 1):
        # shared per-stream state built afresh, concurrently: the slot ramps and the split counters
        monkeypatch.setattr(storage, "SLOT_RAMPS", {})
        if on_gpu:
            from hf_kvquant.ops import attention_kernel

            monkeypatch.setattr(attention_kernel, "_split_counters", {})
        caches = new_caches()
        results = in_threads([functools.partial(_drive, c, x, window) for c, x in zip(caches, inputs)], device)
        for got, want in zip(results, sequential):
            assert len(got) == len(want)
            for step, (g, w) in enumerate(zip(got, want)):
                assert torch.equal(g, w), f"round {round_}, output {step}"
        for c, s in zip(caches, sequential_caches):
            assert [t.shape for t in _buffers(c)] == [t.shape for t in _buffers(s)]
            assert all(torch.equal(t, u) for t, u in zip(_buffers(c), _buffers(s)))
            assert_same_state(state(c, live_only=True), state(s, live_only=True))


def test_fault_count():
    """Runs last in this file: prints how many faults were injected and survived (pytest -s shows it)."""
    print("\nfaults:", dict(sorted(FAULTS.items())))
    assert FAULTS["survived"] == FAULTS["injected"]
