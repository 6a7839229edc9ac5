"""GPU benchmark of the quantize-on-write path (foundation issue).

1. One decode-step ``update`` (quantize 1 token per head + write + hand-over) of one layer at 1k and
   at 32k cached tokens, Llama-3-8B KV shape (8 KV heads, head_dim 128), batch 8, bf16: the per-step
   cost must not grow with the cached length. Wall time per step, back to back (host included: at one
   token per head the update is launch-bound), and the kernel's own time.
2. The quantize kernel on a 32k-token prefill of that shape against the device's copy bandwidth,
   measured in the same run.

Writes ``bench_update.json`` into ``--out-dir`` (default: a new folder under the temporary directory; ``--out-dir
eval/results`` rewrites the published one).

    python eval/bench_update.py [--out-dir DIR]
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
from transformers import LlamaConfig

from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedPerTokenHeadCache
from hf_kvquant.ops.quantize_kernel import quantize_into_triton

from lib.environment import copy_bandwidth, environment, versions_line
from lib.results import out_dir_argument, write_results

BATCH, KV_HEADS, HEAD_DIM, DTYPE = 8, 8, 128, torch.bfloat16
DECODE_LENGTHS = (1024, 32768)
PREFILL_TOKENS = 32768


def _kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    # As transformers makes them: [batch, tokens, heads, head_dim] projections viewed as
    # [batch, heads, tokens, head_dim].
    shape = (BATCH, tokens, KV_HEADS, HEAD_DIM)
    return (torch.randn(shape, device="cuda", dtype=DTYPE).transpose(1, 2) for _ in range(2))


def _config() -> LlamaConfig:
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         hidden_size=4096)
    config._attn_implementation = ATTENTION_NAME  # the cache hands over its buffers, as with hf_kvquant's attention
    return config


def bench_decode_update(mode: KVQuantMode, rounds: int = 30, burst: int = 50) -> list[dict]:
    """Wall time per decode-step update, the cache lengths interleaved burst by burst so that host noise and
    clock drift hit both alike; growth of the buffers is included (amortised), as in real decoding."""
    caches = {}
    for cached in DECODE_LENGTHS:
        caches[cached] = QuantizedPerTokenHeadCache(config=_config(), mode=mode)
        caches[cached].update(*_kv(cached), 0)
    k1, v1 = _kv(1)
    per_step = {cached: [] for cached in DECODE_LENGTHS}
    for round_idx in range(rounds + 2):  # the first two rounds warm up (compilation, allocator)
        for cached, cache in caches.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(burst):
                cache.update(k1, v1, 0)
            torch.cuda.synchronize()
            if round_idx >= 2:
                per_step[cached].append((time.perf_counter() - start) / burst)
    rows = []
    for cached, cache in caches.items():
        layer = cache.layers[0]
        # The kernel alone for one new token at this position (do_bench: CUDA events over many launches).
        slots = torch.tensor([layer.stored], device="cuda")
        kernel_ms = triton.testing.do_bench(
            lambda: quantize_into_triton(k1, v1, slots, layer.buffers, mode), warmup=20, rep=100)
        rows.append({"mode": mode.value, "cached_tokens": cached,
                     "median_step_us": statistics.median(per_step[cached]) * 1e6,
                     "min_step_us": min(per_step[cached]) * 1e6, "kernel_us": kernel_ms * 1e3})
    return rows


def bench_prefill_quantize(mode: KVQuantMode) -> dict:
    key, value = _kv(PREFILL_TOKENS)
    data = [torch.empty(BATCH, KV_HEADS, PREFILL_TOKENS, HEAD_DIM, device="cuda", dtype=mode.storage_dtype)
            for _ in range(2)]
    scales = [torch.empty(BATCH, KV_HEADS, PREFILL_TOKENS, device="cuda") for _ in range(2)]
    slots = torch.arange(PREFILL_TOKENS, device="cuda")
    ms = triton.testing.do_bench(
        lambda: quantize_into_triton(key, value, slots, (data[0], scales[0], data[1], scales[1]), mode),
        warmup=50, rep=300)
    moved = 2 * key.numel() * key.element_size() + sum(t.nbytes for t in data + scales)
    return {"mode": mode.value, "ms": ms, "bytes": moved, "tb_per_s": moved / ms / 1e9}


def main() -> None:
    out_dir = out_dir_argument(__doc__, "bench_update")
    result = {
        **environment("cuda"),
        "shape": {"batch": BATCH, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE)},
        "copy": copy_bandwidth(),
        "decode_update": [row for m in KVQuantMode for row in bench_decode_update(m)],
        "prefill_quantize": [bench_prefill_quantize(m) for m in KVQuantMode],
    }
    print(f"{result['device']}; {versions_line(result['versions'])}")
    print(f"copy bandwidth: {result['copy']['tb_per_s']:.2f} TB/s (bytes read + written)\n")
    print("decode-step update of one layer (batch 8, 8 KV heads, head_dim 128, bf16)")
    print(f"{'mode':<22}{'cached':>8}{'median us/step':>16}{'min us/step':>13}{'kernel us':>11}")
    rows = result["decode_update"]
    for r in rows:
        print(f"{r['mode']:<22}{r['cached_tokens']:>8}{r['median_step_us']:>16.1f}{r['min_step_us']:>13.1f}"
              f"{r['kernel_us']:>11.1f}")
    for mode in KVQuantMode:
        short, long = (r for r in rows if r["mode"] == mode.value)
        ratio = long["median_step_us"] / short["median_step_us"]
        result.setdefault("decode_ratio_32k_over_1k", {})[mode.value] = ratio
        print(f"  {mode.value}: per-step time at 32k / at 1k = {ratio:.2f}")
    print(f"\nquantize kernel, {PREFILL_TOKENS}-token prefill (keys + values)")
    for r in result["prefill_quantize"]:
        r["fraction_of_copy"] = r["tb_per_s"] / result["copy"]["tb_per_s"]
        print(f"{r['mode']:<22}{r['ms']:>8.3f} ms {r['tb_per_s']:>6.2f} TB/s = {r['fraction_of_copy']:.0%} of copy")
    print(f"\nwrote {write_results(out_dir, 'bench_update', result)}.json")


if __name__ == "__main__":
    main()
