"""GPU benchmark of decode speed under tensor parallelism (transformers' ``tp_plan="auto"``), 1 GPU against 2.

A Llama-3.1-8B-shaped model with random bf16 weights (hidden 4096, 32 layers, 32 query / 8 KV heads, head_dim 128,
intermediate 14336, vocab 128256), batch 8, a 16k-token random prompt. For each cache: the reference (`DynamicCache`,
bf16, SDPA) and `QuantizedPerTokenHeadCache` INT8 and FP8 with hf_kvquant's attention:

- a warm-up on a throwaway cache (a short prefill and a few decode steps: kernels compiled, GEMM algorithms chosen);
- the prompt's prefill, timed once (logits of the last position only);
- warm-up decode steps at that length, then ``repeats`` x ``steps`` greedy single-token steps under inference_mode,
  one synchronize per repeat; the median repeat gives ms/step and tokens/s (batch / step time);
- the bytes the cache holds on each rank at the end, and each rank's peak GPU memory.

One command does everything: a single process on cuda:0 builds the random model (saved once with save_pretrained,
the checkpoint that ``tp_plan="auto"`` needs) and runs world size 1; then ``torch.distributed.run`` runs world size
2 (NCCL, each rank loads its shard of that checkpoint); the two are merged side by side into
``OUT_DIR/bench_tensor_parallel.{json,md}`` (``--out-dir``; default: a new folder under the temporary directory,
``--out-dir eval/results`` rewrites the published ones).

    python eval/bench_tensor_parallel.py [--out-dir DIR] [--model-dir DIR]
    python eval/bench_tensor_parallel.py --tiny   # the plumbing on CPU: tiny model, short prompt, 2 gloo ranks
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_kvquant import ATTENTION_NAME, KVQuantMode, kv_cache_nbytes

from lib.caches import CACHES as GENERATE_CACHES
from lib.caches import build_cache, cache_keys
from lib.decoding import decode, free_memory, prefill, synchronize, time_decode
from lib.environment import device_name, versions, versions_line
from lib.results import add_out_dir, resolve_out_dir, write_results

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZES = (1, 2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, vocab_size=1024),
}
SHAPE_KEYS = tuple(SHAPES["tiny"])  # what a saved checkpoint must match to be reused
# cache name -> (label, attention implementation), as eval/bench_generate.py builds them: DynamicCache and ours
CACHES = {name: GENERATE_CACHES[name] for name in ("dynamic", *(m.short_name for m in KVQuantMode))}
STAGE_TIMEOUT_S = 420


@dataclass(frozen=True)
class Run:
    shape: str
    dtype: str
    batch: int
    prompt: int
    steps: int
    repeats: int
    warmup_steps: int  # >= 16 on GPU: the decode kernels specialise on the cache length mod 16
    warmup_prompt: int


RUNS = {
    "full": Run("llama-3.1-8b", "bfloat16", batch=8, prompt=16384, steps=16, repeats=3, warmup_steps=16,
                warmup_prompt=1024),
    "tiny": Run("tiny", "float32", batch=2, prompt=64, steps=4, repeats=2, warmup_steps=2, warmup_prompt=16),
}


def _config(run: Run) -> LlamaConfig:
    return LlamaConfig(**SHAPES[run.shape], max_position_embeddings=131072, rope_parameters=dict(LLAMA3_ROPE),
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


# -- worker: one process (world size 1) or one rank under torch.distributed.run ---------------------------------------


def _log(*parts) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*parts, flush=True)


def _is_saved(path: Path, config: LlamaConfig) -> bool:
    config_file = path / "config.json"
    if not config_file.is_file() or not any(path.glob("*.safetensors")):
        return False
    saved = json.loads(config_file.read_text())
    return all(saved.get(key) == getattr(config, key) for key in SHAPE_KEYS)


def _load_model(run: Run, model_dir: Path):
    """World size 2: each rank loads its shard of the checkpoint. World size 1: the checkpoint if saved, else a random
    model built on the device and saved (atomically) for the ranks that follow."""
    dtype = getattr(torch, run.dtype)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=dtype,
                                                    attn_implementation=ATTENTION_NAME).eval()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    config = _config(run)
    if _is_saved(model_dir, config):
        _log(f"loading {model_dir}")
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device),
                                                    attn_implementation=ATTENTION_NAME).eval()
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME).eval()
    _log(f"built a random {run.shape} model on {device} in {time.perf_counter() - start:.1f} s; saving to {model_dir}")
    start = time.perf_counter()
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(partial)
    partial.rename(model_dir)
    _log(f"saved in {time.perf_counter() - start:.1f} s")
    return model


def _prompt(run: Run, vocab_size: int, device: torch.device) -> torch.Tensor:
    # The same tokens on every rank (a CPU generator), as tensor parallelism requires.
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (run.batch, run.prompt), generator=generator).to(device)


def _bench_cache(model, name: str, run: Run, device: torch.device) -> dict:
    attention = CACHES[name][1]
    prompt = _prompt(run, model.config.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        cache = build_cache(name, model)  # switches the model to the cache's attention first
        decode(model, cache, prefill(model, cache, prompt[:, : run.warmup_prompt]), run.warmup_steps)
        del cache
        free_memory(device, collect=True)

        cache = build_cache(name, model)
        synchronize(device)
        start = time.perf_counter()
        token = prefill(model, cache, prompt)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        token = decode(model, cache, token, run.warmup_steps)
        token, step_s = time_decode(model, cache, token, run.steps, run.repeats, device)
    decode_s = statistics.median(step_s)
    row = {
        "cache": name, "attention": attention, "prefill_ms": prefill_s * 1e3, "decode_ms_per_step": decode_s * 1e3,
        "decode_ms_per_step_repeats": [s * 1e3 for s in step_s], "tokens_per_s": run.batch / decode_s,
        "cache_bytes": kv_cache_nbytes(cache), "cache_tokens": cache.get_seq_length(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    del cache, token
    free_memory(device, collect=True)
    return row


def worker(args, run: Run) -> None:
    model = _load_model(run, Path(args.model_dir))
    distributed = dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    device = model.device
    part = {"world_size": world_size, "backend": dist.get_backend() if distributed else None,
            "device": device_name(device),
            "rows": []}
    for name in args.caches:
        _log(f"[{world_size} x {device.type}] {name}: running")
        try:
            row = _bench_cache(model, name, run, device)
        except Exception as e:  # one cache failing (e.g. out of memory) still leaves the others measured
            free_memory(device, collect=True)
            row = {"cache": name, "attention": CACHES[name][1], "error": f"{type(e).__name__}: {e}"[:500]}
        if distributed:  # every rank's figures (the ranks run in lockstep: collectives in every layer)
            ranks = [None] * world_size
            dist.all_gather_object(ranks, row)
        else:
            ranks = [row]
        merged = {**ranks[0], "per_rank": [{k: r.get(k) for k in ("decode_ms_per_step", "cache_bytes",
                                                                  "peak_memory_bytes", "error")} for r in ranks]}
        part["rows"].append(merged)
        if "error" in merged:
            _log(f"[{world_size} x {device.type}] {name}: FAILED {merged['error']}")
        else:
            _log(f"[{world_size} x {device.type}] {name}: prefill {merged['prefill_ms']:.1f} ms, decode "
                 f"{merged['decode_ms_per_step']:.2f} ms/step = {merged['tokens_per_s']:.1f} tokens/s, cache "
                 f"{merged['cache_bytes'] / 2**20:.1f} MiB per rank")
        if not distributed or dist.get_rank() == 0:  # written after every cache: a later failure keeps these
            Path(args.part).write_text(json.dumps(part, indent=1) + "\n")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


# -- driver: both world sizes, then the merged table ----------------------------------------------------------------


def _run_stage(command: list[str], env: dict, timeout_s: float) -> int:
    print(f"$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    # Its own process group, so that a timeout (or a SIGTERM to this driver) ends torchrun's ranks too.
    process = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True)

    def stop(*_):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def on_sigterm(*_):
        stop()
        sys.exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout_s:.0f} s: stopping it", flush=True)
        stop()
        code = -1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"(exit {code}, {time.perf_counter() - start:.0f} s)", flush=True)
    return code


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _markdown(result: dict) -> str:
    run = result["run"]
    by = {(p["world_size"], row["cache"]): row for p in result["parts"].values() for row in p["rows"]}
    lines = [
        f"# Decode under tensor parallelism: {run['shape']}-shaped random {run['dtype']} model, batch {run['batch']}, "
        f"{run['prompt']}-token prompt",
        "",
        f"Devices: {', '.join(sorted({p['device'] for p in result['parts'].values()}))}; "
        + versions_line(result["versions"]) + ".",
        f"Prefill timed once after a warm-up; decode: median of {run['repeats']} x {run['steps']} greedy steps "
        f"(after {run['warmup_steps']} warm-up steps). Tokens/s = batch / step time. Cache MiB per rank: the bytes the "
        "cache holds on one rank after the run; peak: torch.cuda.max_memory_allocated per rank (max over ranks).",
        "",
        "| cache | attention | prefill ms, 1 GPU | 2 GPUs | decode ms/step, 1 GPU | 2 GPUs | tokens/s, 1 GPU | 2 GPUs "
        "| speed-up | cache MiB/rank, 1 GPU | 2 GPUs | peak MiB/rank, 1 GPU | 2 GPUs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (_, attention) in CACHES.items():
        if not any((ws, name) in by for ws in WORLD_SIZES):
            continue
        cells = {ws: by.get((ws, name), {"error": "not run"}) for ws in WORLD_SIZES}

        def cell(ws, key, fmt):
            row = cells[ws]
            return ("not run" if row["error"] == "not run" else "failed") if "error" in row else fmt(row[key])

        def peak(ws):
            values = [r["peak_memory_bytes"] for r in cells[ws].get("per_rank", []) if r.get("peak_memory_bytes")]
            return _mib(max(values)) if values else ""

        ok = all("error" not in cells[ws] for ws in WORLD_SIZES)
        speedup = f"{cells[2]['tokens_per_s'] / cells[1]['tokens_per_s']:.2f} x" if ok else ""
        lines.append(" | ".join([
            f"| {name}", attention,
            *(cell(ws, "prefill_ms", lambda v: f"{v:.1f}") for ws in WORLD_SIZES),
            *(cell(ws, "decode_ms_per_step", lambda v: f"{v:.2f}") for ws in WORLD_SIZES),
            *(cell(ws, "tokens_per_s", lambda v: f"{v:.1f}") for ws in WORLD_SIZES),
            speedup,
            *(cell(ws, "cache_bytes", _mib) for ws in WORLD_SIZES),
            *(peak(ws) for ws in WORLD_SIZES),
        ]) + " |")
    errors = [f"- {ws} GPU(s), {name}: {row['error']}" for (ws, name), row in sorted(by.items()) if "error" in row]
    if errors:
        lines += ["", "Failures:", *errors]
    return "\n".join(lines) + "\n"


def drive(args, run: Run) -> int:
    stem = "bench_tensor_parallel" + ("_tiny" if args.tiny else "")
    out_dir = resolve_out_dir(args.out_dir, stem)
    parts_dir = Path(tempfile.mkdtemp(prefix="bench_tp_parts_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # tp_plan="auto" takes the GPUs (and NCCL) whenever it sees them
    elif torch.cuda.device_count() < max(WORLD_SIZES):
        print(f"needs {max(WORLD_SIZES)} CUDA devices, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    worker_args = [str(Path(__file__).resolve()), *sys.argv[1:], "--worker", "--part"]
    launchers = {1: [sys.executable],
                 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]}
    codes = {}
    for ws in WORLD_SIZES:
        try:
            codes[ws] = _run_stage([*launchers[ws], *worker_args, str(parts_dir / f"ws{ws}.json")], env,
                                   args.stage_timeout)
        except SystemExit:  # SIGTERM: keep what the stage measured before it was stopped
            codes[ws] = "terminated"
            _write_results(out_dir, stem, run, codes, parts_dir)
            raise
        table = _write_results(out_dir, stem, run, codes, parts_dir)
    print(table, flush=True)
    return 0 if all(c == 0 for c in codes.values()) and len(codes) == len(WORLD_SIZES) else 1


def _write_results(out_dir: Path, stem: str, run: Run, codes: dict, parts_dir: Path) -> str:
    """The merged JSON and table of what has run so far (rewritten after each world size)."""
    parts = {ws: json.loads((parts_dir / f"ws{ws}.json").read_text())
             for ws in WORLD_SIZES if (parts_dir / f"ws{ws}.json").is_file()}
    result = {"run": {**run.__dict__, "config": SHAPES[run.shape]}, "versions": versions(),
              "exit_codes": {str(ws): c for ws, c in codes.items()}, "parts": {str(ws): p for ws, p in parts.items()}}
    table = _markdown(result)
    write_results(out_dir, stem, result, table)
    print(f"wrote {out_dir / stem}.json and .md", flush=True)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU plumbing check: tiny model, short prompt, gloo")
    add_out_dir(parser)
    parser.add_argument("--model-dir", help="the random checkpoint, saved once and reused "
                                            "(default: a folder under the system temp dir)")
    parser.add_argument("--caches", default=",".join(CACHES),
                        help=f"comma-separated, of {', '.join(CACHES)} (or their mode names: int8_per_token_head, ...)")
    parser.add_argument("--stage-timeout", type=float, default=STAGE_TIMEOUT_S, help="seconds per world size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = RUNS["tiny" if args.tiny else "full"]
    try:
        args.caches = cache_keys(args.caches, CACHES)
    except ValueError as error:
        parser.error(str(error))
    if args.model_dir is None:
        args.model_dir = str(Path(tempfile.gettempdir()) / "hf_kvquant_bench_tp" / f"{run.shape}-{run.dtype}-random")
    Path(args.model_dir).parent.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args, run)
        return 0
    return drive(args, run)


if __name__ == "__main__":
    sys.exit(main())
