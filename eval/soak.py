"""GPU soak of hf_kvquant's cache: a 1B-shaped random-weight Llama in bf16 generating for a long time.

(a) **One long sequence.** A prompt of ``--prompt`` tokens, then greedy single-token decode steps at batch 1 until the
context holds ``--tokens`` tokens (default 131072), over one preallocated `QuantizedPerTokenHeadCache`
(``max_cache_len=--tokens``). Each step is compiled as `generate` compiles it: ``model.get_compiled_call(
CompileConfig(fullgraph=True, ...))`` (inductor + ``reduce-overhead``: CUDA graphs), fed what `generate` feeds it
(`lib.decoding.GenerateInputs`; here its 2D mask is a view of one row made up front, see `PreallocatedInputs`),
cold (`lib.decoding.compiling`: dynamo reset, a fresh inductor cache).
Every ``--chunk`` steps (1024): one synchronize, the chunk's ms/step and the memory allocated. Checks:

* memory: allocated after every chunk (the first excepted: it records the CUDA graphs) within
  ``--memory-tolerance-mib`` of the smallest;
* step time: attention reads every cached token, so a step costs more as the context grows: ms/step is fitted by a
  line in the context length (least squares, chunks after the first) and every chunk must lie within
  ``--time-tolerance`` (relative) of the line: no spike, no drift beyond that linear growth. The slope is also
  given as the bandwidth it implies for reading one more token of every layer's keys and values.

(b) **Many generate calls, one cache.** ``--calls`` calls of ``model.generate`` (greedy, ``--new-tokens`` tokens
each) reusing one preallocated cache with ``cache.reset()`` between them, cycling over prompts of
``--call-prompts`` lengths (a shorter prompt after a longer one runs over slots still holding the longer one's
tokens). Checks: the memory allocated after each call is within ``--memory-tolerance-mib`` of what it was after the
first (which compiles); every call's tokens equal those of a fresh cache for the same prompt; no graph compiled after
the first call.

(a) runs first; with ``--deadline-s`` it stops ``--reserve-s`` before the deadline to leave (b) its time, and (b)
stops at the deadline: whatever ran is written (``complete`` says whether everything did). Writes ``soak.json`` and
``soak.md`` (``--name``) after every chunk and every 10 calls into ``--out-dir``, by default a fresh folder under the
system's temporary directory (the published results in eval/results/ only when asked for).

    python eval/soak.py [--tokens 131072] [--calls 200] [--mode int8] [--deadline-s 540] [--out-dir DIR]
    python eval/soak.py --tiny      # CPU smoke run of the plumbing (2-layer model, dynamo's eager backend), seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time

import torch
from transformers import CompileConfig

from hf_kvquant.evaluation import ACCEPTED_MODES, parse_mode

from lib.caches import build_cache
from lib.decoding import (GenerateInputs, allocated_bytes, as_generate, compiled_call, compiling, decode, free_memory,
                          graphs_compiled, prefill, synchronize)
from lib.environment import environment, versions_line
from lib.generate_budget import past_deadline
from lib.models import SHAPES, build_model
from lib.results import add_out_dir, resolve_out_dir, write_results
from lib.soak_report import MIB, markdown

# The CPU smoke run: the 2-layer model, a short sequence in small chunks, a few short calls, dynamo's eager backend.
TINY = {"shape": "tiny", "device": "cpu", "dtype": "float32", "tokens": 192, "prompt": 32, "chunk": 32, "calls": 6,
        "call_prompts": "24,8", "new_tokens": 4, "compile_backend": "eager", "compile_mode": "none", "threads": 1}


class PreallocatedInputs(GenerateInputs):
    """`GenerateInputs` whose 2D mask is a growing view of one row of ones made up front. `generate` (and
    `GenerateInputs`) grows the mask by a ``torch.cat`` per step: 8 bytes per step and sequence, 1 MiB over 128k
    steps, which would blur whether the cache and the model keep their memory flat."""

    def __init__(self, model, forward, batch: int, length: int, device: torch.device, max_length: int):
        super().__init__(model, forward, batch, length, device)
        self.ones = torch.ones(batch, max_length, dtype=torch.long, device=device)
        self.mask = self.ones[:, :length]

    def __call__(self, model, cache, ids: torch.Tensor) -> torch.Tensor:
        self.mask = self.ones[:, : self.mask.shape[-1] + 1]
        self.positions = self.positions + 1
        inputs = self.model.prepare_inputs_for_generation(
            ids, next_sequence_length=1, cache=cache, attention_mask=self.mask, position_ids=self.positions,
            use_cache=True, logits_to_keep=1)
        return self.forward(**inputs).logits


def _within(values: list[int | None], tolerance: int) -> bool | None:
    """Whether ``values`` (bytes) stay within ``tolerance`` of their smallest; None where there is nothing to judge."""
    values = [v for v in values if v is not None]
    return None if len(values) < 2 else max(values) - min(values) <= tolerance


def out_of_time(args, keep_s: float = 0.0) -> bool:
    """Less than ``keep_s`` seconds are left before ``--deadline-s`` (never without one)."""
    return past_deadline(args) or bool(args.deadline_s) and time.perf_counter() - args.start_ > args.deadline_s - keep_s


def kv_bytes_per_token(config) -> int:
    """Bytes of one token's keys and values in every attention layer: one-byte codes and a float32 scale per KV head."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim + 4)


# -- (a) one long sequence -----------------------------------------------------------------------------------------


def long_sequence(model, args, result: dict, checkpoint) -> None:
    """Decode one sequence to ``args.tokens`` tokens over a preallocated cache, compiled, timing every chunk."""
    device = args.device
    part = result["long"] = {"prompt": args.prompt, "target_tokens": args.tokens, "chunk_steps": args.chunk,
                             "chunks": [], "complete": False}
    if out_of_time(args, keep_s=args.reserve_s if args.calls > 0 else 0.0):
        part["stopped"] = "deadline"
        return
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (1, args.prompt), device=device, generator=generator)
    free_memory(device, collect=True)
    with as_generate(), compiling(model):
        cache = build_cache(f"{args.mode_.short_name}_compiled", model, max_cache_len=args.tokens)
        next_ids = prefill(model, cache, ids)
        step = PreallocatedInputs(model, compiled_call(model, args), 1, args.prompt, device, args.tokens)
        synchronize(device)
        part["allocated_after_prefill"] = allocated_bytes(device)
        start = time.perf_counter()
        next_ids = decode(model, cache, next_ids, 1, step)  # compiles
        synchronize(device)
        part["compile_s"] = time.perf_counter() - start
        context = args.prompt + 1
        graphs = graphs_compiled()
        while context < args.tokens:
            if out_of_time(args, keep_s=args.reserve_s if args.calls > 0 else 0.0):
                part["stopped"] = "deadline"
                break
            steps = min(args.chunk, args.tokens - context)
            synchronize(device)
            start = time.perf_counter()
            next_ids = decode(model, cache, next_ids, steps, step)
            synchronize(device)
            seconds = time.perf_counter() - start
            context += steps
            part["chunks"].append({"context": context, "steps": steps, "ms_per_step": seconds / steps * 1e3,
                                   "allocated": allocated_bytes(device)})
            checkpoint()
        part["tokens"] = int(cache.get_seq_length())  # one host read, after the run
        if part["tokens"] != context:
            raise RuntimeError(f"the cache holds {part['tokens']} tokens after {context} were written")
        part["graphs_compiled_after_first_step"] = graphs_compiled() - graphs
        part["complete"] = context >= args.tokens
        part["cache_nbytes"] = cache.nbytes
        del cache, step, next_ids
    judge_long(part, args, model.config)
    free_memory(device, collect=True)


def judge_long(part: dict, args, config) -> None:
    """The checks of (a): flat memory; ms/step on a line in the context length, every chunk within tolerance of it
    (None: too few chunks to judge, or no allocator figures on the CPU)."""
    measured = part["chunks"][1:]  # the first chunk records the CUDA graphs
    part["memory_flat"] = _within([c["allocated"] for c in measured], round(args.memory_tolerance_mib * MIB))
    if measured:
        part["allocated_min"] = min((c["allocated"] for c in measured if c["allocated"] is not None), default=None)
        part["allocated_max"] = max((c["allocated"] for c in measured if c["allocated"] is not None), default=None)
        part["ms_per_step_first_chunk"] = measured[0]["ms_per_step"]
        part["ms_per_step_last_chunk"] = measured[-1]["ms_per_step"]
    if len(measured) < 3:
        part["step_time_flat"] = None
        return
    x = [c["context"] for c in measured]
    y = [c["ms_per_step"] for c in measured]
    slope, intercept = statistics.linear_regression(x, y)
    deviations = [abs(v - (intercept + slope * c)) / (intercept + slope * c) for c, v in zip(x, y)]
    part["fit"] = {"ms_at_zero": intercept, "ms_per_1k_tokens": slope * 1024,
                   "max_relative_deviation": max(deviations), "tolerance": args.time_tolerance}
    if slope > 0:  # the growth as a read of one more token of every layer per step
        part["fit"]["growth_gb_per_s"] = kv_bytes_per_token(config) / (slope * 1e-3) / 1e9
    part["step_time_flat"] = max(deviations) <= args.time_tolerance


# -- (b) many generate calls, one cache ------------------------------------------------------------------------------


def many_calls(model, args, result: dict, checkpoint) -> None:
    """``args.calls`` generate calls reusing one preallocated cache; each compared with a fresh cache's tokens."""
    device = args.device
    lengths = args.call_prompts_
    max_cache_len = max(lengths) + args.new_tokens
    part = result["calls"] = {"prompts": lengths, "new_tokens": args.new_tokens, "max_cache_len": max_cache_len,
                              "target_calls": args.calls, "calls": [], "complete": False}
    generator = torch.Generator(device=device).manual_seed(1)
    prompts = [torch.randint(model.config.vocab_size, (1, n), device=device, generator=generator) for n in lengths]
    # generate's own compile (CUDA: by itself over a compileable cache; the CPU smoke run asks for it, eager backend)
    compile_config = CompileConfig(backend=args.compile_backend, mode=args.compile_mode)
    compile_config._compile_all_devices = device.type != "cuda"
    # A random-weight model may draw its end-of-sequence token: every call generates exactly new_tokens.
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "pad_token_id": model.generation_config.eos_token_id or 0, "compile_config": compile_config}
    key = f"{args.mode_.short_name}_compiled"

    def generate(cache, prompt):
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=cache, **options)
        return out[:, prompt.shape[1]:].cpu()

    free_memory(device, collect=True)
    with as_generate(), compiling(model):  # generate compiles its own call: nothing of (a)'s graphs is reused
        graphs_before = graphs_compiled()
        fresh = []
        for prompt in prompts:
            if past_deadline(args):
                part["stopped"] = "deadline"
                return
            fresh.append(generate(build_cache(key, model, max_cache_len=max_cache_len), prompt))
        free_memory(device, collect=True)
        cache = build_cache(key, model, max_cache_len=max_cache_len)
        graphs = None
        for call in range(args.calls):
            if past_deadline(args):
                part["stopped"] = "deadline"
                break
            index = call % len(prompts)
            if call:
                cache.reset()
            start = time.perf_counter()
            tokens = generate(cache, prompts[index])  # .cpu(): synchronised
            seconds = time.perf_counter() - start
            part["calls"].append({"prompt": lengths[index], "seconds": seconds, "allocated": allocated_bytes(device),
                                  "equal_to_fresh": torch.equal(tokens, fresh[index])})
            if call == 0:
                graphs = graphs_compiled()
            if call % 10 == 9:
                checkpoint()
        part["complete"] = len(part["calls"]) == args.calls
        part["graphs_compiled"] = graphs_compiled() - graphs_before  # > 0: generate did compile
        part["graphs_compiled_after_first_call"] = None if graphs is None else graphs_compiled() - graphs
        del cache
    calls = part["calls"]
    part["allocated_after_first"] = calls[0]["allocated"] if calls else None
    part["allocated_max_after"] = max((c["allocated"] for c in calls[1:] if c["allocated"] is not None), default=None)
    part["memory_flat"] = None if part["allocated_max_after"] is None else (
        part["allocated_max_after"] - part["allocated_after_first"] <= round(args.memory_tolerance_mib * MIB))
    part["calls_equal_to_fresh"] = sum(c["equal_to_fresh"] for c in calls)
    part["outputs_equal"] = bool(calls) and part["calls_equal_to_fresh"] == len(calls)
    free_memory(device, collect=True)


# -- the command line ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the 2-layer model on the CPU, short runs (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="1b", help=f"the random-weight model: one of {', '.join(SHAPES)}")
    parser.add_argument("--mode", default="int8", help=f"the cache's quantization, one of {', '.join(ACCEPTED_MODES)}")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=131072, help="(a): context length to reach (max_cache_len)")
    parser.add_argument("--prompt", type=int, default=1024, help="(a): prompt tokens before decoding")
    parser.add_argument("--chunk", type=int, default=1024, help="(a): decode steps per timed chunk")
    parser.add_argument("--calls", type=int, default=200, help="(b): generate calls reusing one cache (0: skip)")
    parser.add_argument("--call-prompts", default="512,64", help="(b): prompt lengths, used in turn")
    parser.add_argument("--new-tokens", type=int, default=16, help="(b): tokens each call generates")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode ('none': its default)")
    parser.add_argument("--memory-tolerance-mib", type=float, default=1.0)
    parser.add_argument("--time-tolerance", type=float, default=0.10,
                        help="(a): largest relative deviation of a chunk's ms/step from the fitted line")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="stop cleanly after this many seconds (0: none)")
    parser.add_argument("--reserve-s", type=float, default=90.0,
                        help="with --deadline-s: (a) stops this long before the deadline, leaving (b) its time")
    add_out_dir(parser)
    parser.add_argument("--name", default="soak", help="the outputs' name: NAME.json, NAME.md")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch during the run (0: unchanged; --tiny: 1, fastest for its tensors)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tiny" in argv:
        parser.set_defaults(**TINY)  # explicit options still win
    args = parser.parse_args(argv)
    if args.shape not in SHAPES:
        parser.error(f"unknown --shape {args.shape!r}; accepted: {', '.join(SHAPES)}")
    try:
        args.mode_ = parse_mode(args.mode).quantization
    except ValueError as e:
        parser.error(str(e))
    if args.mode_ is None:
        parser.error("--mode must be a quantized mode (the soak is of hf_kvquant's cache)")
    args.call_prompts_ = [int(n) for n in args.call_prompts.split(",") if n.strip()]
    if args.prompt < 1 or args.chunk < 1 or args.tokens <= args.prompt or not args.call_prompts_ or min(
            args.call_prompts_) < 1 or args.new_tokens < 1 or args.calls < 0:
        parser.error("need 1 <= --prompt < --tokens, --chunk >= 1, --calls >= 0, --new-tokens >= 1 and prompt "
                     "lengths >= 1")
    args.device = torch.device(args.device)
    args.dtype_ = getattr(torch, args.dtype)
    args.compile_mode = None if args.compile_mode.lower() == "none" else args.compile_mode
    args.out_dir = resolve_out_dir(args.out_dir, args.name)
    return args


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's CPU threads set to ``count`` inside the block (0: unchanged)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args, argv)


def run(args, argv) -> dict:
    args.start_ = time.perf_counter()
    shape = SHAPES[args.shape]
    result = {**environment(args.device), "settings": {
        "model": shape.model, "mode": args.mode_.value, "dtype": args.dtype, "tokens": args.tokens,
        "prompt": args.prompt, "chunk": args.chunk, "calls": args.calls, "call_prompts": args.call_prompts_,
        "new_tokens": args.new_tokens, "compile_backend": args.compile_backend, "compile_mode": args.compile_mode,
        "memory_tolerance_mib": args.memory_tolerance_mib, "time_tolerance": args.time_tolerance,
        "deadline_s": args.deadline_s, "argv": sys.argv[1:] if argv is None else list(argv)},
        "complete": False, "elapsed_s": 0.0}
    print(f"{result['device']}; {versions_line(result['versions'])}; writing to {args.out_dir}")

    def checkpoint() -> None:
        result["elapsed_s"] = time.perf_counter() - args.start_
        write_results(args.out_dir, args.name, result, markdown(result))

    model = build_model(shape, args.device, args.dtype_)
    long_sequence(model, args, result, checkpoint)
    checkpoint()
    if args.calls > 0:
        many_calls(model, args, result, checkpoint)
    del model
    gc.collect()
    result["complete"] = result["long"]["complete"] and (args.calls == 0 or result["calls"]["complete"])
    checkpoint()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
