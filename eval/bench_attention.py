"""GPU benchmark of attention over the quantized cache, side by side with its baselines in one run.

bf16 queries; Llama-3-8B heads (32 query / 8 KV heads, head_dim 128) unless a row says otherwise:
- decode (1 query token) at (batch, cache length) = (1, 32k), (8, 4k), (8, 32k), (32, 8k), and at (8, 32k) with
  head_dim 64 (Llama-3.2-1B, 32/8), head_dim 256 (Gemma, 8/4) and MHA (32/32): hf_kvquant INT8 and FP8 kernels,
  `scaled_dot_product_attention` over a bf16 cache (``enable_gqa=True``), and dequantize-then-SDPA over the INT8
  cache, timed as eager calls (host launch time included, as in eager decoding) and, for SDPA and the kernels, also
  as GPU time alone (replayed from a CUDA graph);
- causal prefill at (batch, tokens) = (1, 8k), (1, 32k), (4, 4k), and a chunk of 2k new tokens over a 30k past:
  `hf_kvquant.ops.attention` as the cache's attention calls it (long prefills go through SDPA over the window
  dequantized by hf_kvquant's kernel), hf_kvquant's attention kernel alone, and SDPA over the same bf16 keys and
  values as it picks by default and pinned to each fused backend;
- the device's copy bandwidth, to read the decode times against.
Within a row the candidates are timed in rounds of rotating order (`ROUNDS`), so none always runs after the others.

Writes ``bench_attention.json`` and ``.md`` into ``--out-dir`` (default: a new folder under the temporary directory;
``--out-dir eval/results`` rewrites the published ones).

    python eval/bench_attention.py [--out-dir DIR]   # prints each row's JSON as it is measured
"""

from __future__ import annotations

import functools
import json
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from hf_kvquant import KVQuantMode, QuantizedKV
from hf_kvquant.cache import token_minor_zeros
from hf_kvquant.ops import attention
from hf_kvquant.ops.attention_kernel import quantized_attention
from hf_kvquant.ops.quantize_kernel import quantize_into_triton

from lib.environment import copy_bandwidth, environment, versions_line
from lib.results import out_dir_argument, write_results

DTYPE = torch.bfloat16
LLAMA3_8B = ("Llama-3-8B", 32, 8, 128)  # (heads of, query heads, KV heads, head_dim)
# (heads, batch, cache length)
DECODE_ROWS = [(LLAMA3_8B, 1, 32768), (LLAMA3_8B, 8, 4096), (LLAMA3_8B, 8, 32768), (LLAMA3_8B, 32, 8192),
               (("Llama-3.2-1B", 32, 8, 64), 8, 32768), (("Gemma", 8, 4, 256), 8, 32768),
               (("MHA", 32, 32, 128), 8, 32768)]
# (batch, new tokens, past tokens)
PREFILL_ROWS = [(1, 8192, 0), (1, 32768, 0), (4, 4096, 0), (1, 2048, 30720)]
PREFILL_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


# Each row times its candidates in this many rounds, each round in another order, and keeps each one's median: a
# candidate timed always right after a long compute-bound one (the 32k prefills) would otherwise run on a hotter,
# lower-clocked GPU than one timed first.
ROUNDS = 3


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bench_graph(fn) -> float:
    """GPU time alone: ``fn`` captured in a CUDA graph and replayed, so no host launch time between calls."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def _bench_pinned(backend: SDPBackend, fn) -> float:
    with sdpa_kernel(backend):
        return _bench(fn)


def _time_in_rounds(candidates: dict) -> dict[str, float]:
    """``{name: (timer, fn)}`` -> ``{name: median ms over ROUNDS}``; round ``r`` starts at the ``r``-th candidate."""
    names = list(candidates)
    times = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            timer, fn = candidates[name]
            times[name].append(timer(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _quantized_cache(batch: int, length: int, mode: KVQuantMode, key: torch.Tensor, value: torch.Tensor):
    """QuantizedKV keys and values of a bf16 cache, quantized with the cache's own kernel."""
    kv_heads, head_dim = key.shape[1], key.shape[-1]
    shape = (batch, kv_heads, length)
    key_data = torch.empty(*shape, head_dim, device="cuda", dtype=mode.storage_dtype)
    value_data = token_minor_zeros(batch, kv_heads, length, head_dim, mode.storage_dtype, "cuda")  # as the cache does
    key_scale, value_scale = (torch.empty(*shape, device="cuda") for _ in range(2))
    slots = torch.arange(length, device="cuda")
    quantize_into_triton(key, value, slots, (key_data, key_scale, value_data, value_scale), mode)
    return (QuantizedKV(key_data, key_scale, 0, length, mode, DTYPE),
            QuantizedKV(value_data, value_scale, 0, length, mode, DTYPE))


def _dequantize_then_sdpa(query, key: QuantizedKV, value: QuantizedKV) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key.dequantize(), value.dequantize(), enable_gqa=True)


def bench_decode(heads: tuple, batch: int, length: int) -> dict:
    name, num_heads, kv_heads, head_dim = heads
    query = torch.randn(batch, num_heads, 1, head_dim, device="cuda", dtype=DTYPE)
    key = torch.randn(batch, kv_heads, length, head_dim, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)

    def sdpa():
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    row = {"heads": f"{name} {num_heads}/{kv_heads}, d{head_dim}", "batch": batch, "cache_len": length}
    reference = F.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2).float()
    candidates = {"sdpa_bf16_ms": (_bench, sdpa), "sdpa_bf16_graph_ms": (_bench_graph, sdpa)}
    for mode in KVQuantMode:
        qk, qv = _quantized_cache(batch, length, mode, key, value)
        name = mode.short_name
        kernel = functools.partial(quantized_attention, query, qk.data, qk.scale, qv.data, qv.scale)
        candidates[f"{name}_ms"] = (_bench, kernel)
        candidates[f"{name}_graph_ms"] = (_bench_graph, kernel)
        row[f"{name}_max_error_vs_bf16"] = (kernel().float() - reference).abs().max().item()
        if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
            candidates["dequant_sdpa_ms"] = (_bench, functools.partial(_dequantize_then_sdpa, query, qk, qv))
            row["int8_bytes"] = sum(t.nbytes for t in (qk.data, qk.scale, qv.data, qv.scale))
    row.update(_time_in_rounds(candidates))
    row["int8_tb_per_s"] = row["int8_bytes"] / row["int8_ms"] / 1e9
    row["int8_over_sdpa"] = row["int8_ms"] / row["sdpa_bf16_ms"]
    row["fp8_over_sdpa"] = row["fp8_ms"] / row["sdpa_bf16_ms"]
    row["fp8_over_int8"] = row["fp8_ms"] / row["int8_ms"]
    row["int8_over_sdpa_graph"] = row["int8_graph_ms"] / row["sdpa_bf16_graph_ms"]
    row["fp8_over_sdpa_graph"] = row["fp8_graph_ms"] / row["sdpa_bf16_graph_ms"]
    return row


def bench_prefill(batch: int, new: int, past: int) -> dict:
    _, num_heads, kv_heads, head_dim = LLAMA3_8B
    # The query as a model hands it over ([batch, tokens, heads, head_dim] memory, viewed as [batch, heads, ...]), and
    # SDPA's output made [batch, tokens, heads, head_dim] contiguous, as transformers' sdpa_attention_forward does:
    # the layout every attention function returns.
    query = torch.randn(batch, new, num_heads, head_dim, device="cuda", dtype=DTYPE).transpose(1, 2)
    key = torch.randn(batch, kv_heads, past + new, head_dim, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)
    causal = causal_lower_right(new, past + new)  # the new tokens are the last: what the cache's attention computes

    def sdpa():
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    row = {"batch": batch, "tokens": new, "past": past}
    candidates = {"sdpa_default_ms": (_bench, sdpa)}
    # SDPA's default pick depends on the torch build and GPU: each fused backend pinned as well; None where it does
    # not take these inputs.
    for backend in PREFILL_SDPA_BACKENDS:
        field = f"sdpa_{backend.name.lower()}_ms"
        try:
            with sdpa_kernel(backend):
                sdpa()
            candidates[field] = (functools.partial(_bench_pinned, backend), sdpa)
        except RuntimeError:
            row[field] = None
    reference = sdpa().float()
    for mode in KVQuantMode:
        qk, qv = _quantized_cache(batch, past + new, mode, key, value)
        name = mode.short_name
        route = functools.partial(attention, query, qk.data, qk.scale, qv.data, qv.scale)
        kernel = functools.partial(quantized_attention, query, qk.data, qk.scale, qv.data, qv.scale)
        candidates[f"{name}_ms"] = (_bench, route)
        candidates[f"{name}_kernel_ms"] = (_bench, kernel)
        row[f"{name}_max_error_vs_bf16"] = (route().float() - reference).abs().max().item()
        row[f"{name}_kernel_max_error_vs_bf16"] = (kernel().float() - reference).abs().max().item()
    row.update(_time_in_rounds(candidates))
    for mode in KVQuantMode:
        name = mode.short_name
        row[f"{name}_over_sdpa_default"] = row[f"{name}_ms"] / row["sdpa_default_ms"]
        row[f"{name}_kernel_over_sdpa_default"] = row[f"{name}_kernel_ms"] / row["sdpa_default_ms"]
    return row


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device']}; {versions_line(result['versions'])}. Copy bandwidth "
        f"{result['copy_tb_per_s']:.2f} TB/s (read + written). Times are medians of `triton.testing.do_bench` (eager "
        "calls: host launch time included, as in eager decoding), in ms; the decode columns marked graphs are GPU "
        "time alone, calls replayed from a CUDA graph (`do_bench_cudagraph`). Each row times its candidates in "
        f"{ROUNDS} rounds, each round in another order, and gives each one's median round.",
        "",
        "Decode, 1 query token, bf16 queries; SDPA as it picks its backend by default:",
        "",
        "| heads | batch | cache len | SDPA bf16 | dequant + SDPA | INT8 | FP8 | INT8 / SDPA | FP8 / SDPA | FP8 / INT8 "
        "| INT8 TB/s | INT8 / SDPA, graphs | FP8 / SDPA, graphs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['heads']} | {r['batch']} | {r['cache_len']} | {r['sdpa_bf16_ms']:.3f} | "
            f"{r['dequant_sdpa_ms']:.3f} | "
            f"{r['int8_ms']:.3f} | {r['fp8_ms']:.3f} | {r['int8_over_sdpa']:.2f} | {r['fp8_over_sdpa']:.2f} | "
            f"{r['fp8_over_int8']:.2f} | {r['int8_tb_per_s']:.2f} | {r['int8_over_sdpa_graph']:.2f} | "
            f"{r['fp8_over_sdpa_graph']:.2f} |")

    def ms(t):
        return "n/a" if t is None else f"{t:.3f}"

    lines += [
        "",
        "Prefill, causal, Llama-3-8B heads (32/8, head_dim 128), times in ms. INT8 / FP8: `hf_kvquant.ops.attention` "
        "as the cache's attention calls it; kernel: hf_kvquant's attention kernel alone. SDPA over the same keys and "
        "values in bf16, by default and pinned to each fused backend (n/a: it does not take these inputs). Max error: "
        "largest absolute difference from SDPA's bf16 output.",
        "",
        "| batch | new tokens | past | SDPA default | flash | cuDNN | efficient | INT8 | FP8 | INT8 kernel "
        "| FP8 kernel | INT8 / default | FP8 / default | INT8 kernel / default | max error INT8 / kernel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["prefill"]:
        lines.append(
            f"| {p['batch']} | {p['tokens']} | {p['past']} | {ms(p['sdpa_default_ms'])} | "
            f"{ms(p['sdpa_flash_attention_ms'])} | {ms(p['sdpa_cudnn_attention_ms'])} | "
            f"{ms(p['sdpa_efficient_attention_ms'])} | {p['int8_ms']:.3f} | {p['fp8_ms']:.3f} | "
            f"{p['int8_kernel_ms']:.3f} | {p['fp8_kernel_ms']:.3f} | {p['int8_over_sdpa_default']:.2f} | "
            f"{p['fp8_over_sdpa_default']:.2f} | {p['int8_kernel_over_sdpa_default']:.2f} | "
            f"{p['int8_max_error_vs_bf16']:.3f} / {p['int8_kernel_max_error_vs_bf16']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out_dir = out_dir_argument(__doc__, "bench_attention")
    result = {**environment("cuda"), "copy_tb_per_s": copy_bandwidth()["tb_per_s"], "decode": [], "prefill": []}
    for kind, bench, rows in (("decode", bench_decode, DECODE_ROWS), ("prefill", bench_prefill, PREFILL_ROWS)):
        for row in rows:
            result[kind].append(bench(*row))
            print(json.dumps(result[kind][-1]), flush=True)  # each row as it comes: a cut run keeps what it measured
    text = markdown(result)
    print(text)
    print(f"wrote {write_results(out_dir, 'bench_attention', result, text)}.json and .md")


if __name__ == "__main__":
    main()
