"""GPU benchmark of attention over the quantized cache, side by side with its baselines in one run.

Llama-3-8B heads (32 query / 8 KV heads, head_dim 128), bf16 queries:
- decode (1 query token) at (batch, cache length) = (1, 32k), (8, 4k), (8, 32k), (32, 8k):
  hf_kvquant INT8 and FP8 kernels, `scaled_dot_product_attention` over a bf16 cache (``enable_gqa=True``),
  and dequantize-then-SDPA over the INT8 cache, timed as eager calls (host launch time included, as in eager
  decoding) and, for SDPA and the kernels, also as GPU time alone (replayed from a CUDA graph);
- prefill of 8k tokens, batch 1, causal: the same kernel against SDPA on bf16, pinned to each of its fused
  backends (the target is set against the flash backend) and as SDPA picks by default;
- the device's copy bandwidth, to read the decode times against.

    python eval/bench_attention.py [--out-dir eval/results]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_kvquant import KVQuantMode, QuantizedKV
from hf_kvquant.ops.attention_kernel import quantized_attention
from hf_kvquant.ops.quantize_kernel import quantize_into_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/'s shared modules, however this script is started
from common import copy_bandwidth, environment, out_dir_argument, versions_line, write_results

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
DECODE_SHAPES = [(1, 32768), (8, 4096), (8, 32768), (32, 8192)]
PREFILL_TOKENS = 8192
PREFILL_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bench_graph(fn) -> float:
    """GPU time alone: ``fn`` captured in a CUDA graph and replayed, so no host launch time between calls."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def _quantized_cache(batch: int, length: int, mode: KVQuantMode, key: torch.Tensor, value: torch.Tensor):
    """QuantizedKV keys and values of a bf16 cache, quantized with the cache's own kernel."""
    shape = (batch, KV_HEADS, length)
    key_data, value_data = (torch.empty(*shape, HEAD_DIM, device="cuda", dtype=mode.storage_dtype)
                            for _ in range(2))
    key_scale, value_scale = (torch.empty(*shape, device="cuda") for _ in range(2))
    slots = torch.arange(length, device="cuda")
    quantize_into_triton(key, value, slots, (key_data, key_scale, value_data, value_scale), mode)
    return (QuantizedKV(key_data, key_scale, 0, length, mode, DTYPE),
            QuantizedKV(value_data, value_scale, 0, length, mode, DTYPE))


def bench_decode(batch: int, length: int) -> dict:
    query = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE)
    key = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)

    def sdpa():
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    row = {"batch": batch, "cache_len": length, "sdpa_bf16_ms": _bench(sdpa), "sdpa_bf16_graph_ms": _bench_graph(sdpa)}
    reference = F.scaled_dot_product_attention(query, key, value, enable_gqa=True).transpose(1, 2).float()
    for mode in KVQuantMode:
        qk, qv = _quantized_cache(batch, length, mode, key, value)
        name = mode.short_name
        row[f"{name}_ms"] = _bench(lambda: quantized_attention(query, qk, qv))
        row[f"{name}_graph_ms"] = _bench_graph(lambda: quantized_attention(query, qk, qv))
        out = quantized_attention(query, qk, qv).float()
        row[f"{name}_max_error_vs_bf16"] = (out - reference).abs().max().item()
        if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
            row["dequant_sdpa_ms"] = _bench(lambda: F.scaled_dot_product_attention(
                query, qk.dequantize(), qv.dequantize(), enable_gqa=True))
            row["int8_bytes"] = sum(t.nbytes for t in (qk.data, qk.scale, qv.data, qv.scale))
        qk = qv = None  # this mode's cache goes before the next one's is built
    row["int8_tb_per_s"] = row["int8_bytes"] / row["int8_ms"] / 1e9
    row["int8_over_sdpa"] = row["int8_ms"] / row["sdpa_bf16_ms"]
    row["fp8_over_sdpa"] = row["fp8_ms"] / row["sdpa_bf16_ms"]
    row["fp8_over_int8"] = row["fp8_ms"] / row["int8_ms"]
    row["int8_over_sdpa_graph"] = row["int8_graph_ms"] / row["sdpa_bf16_graph_ms"]
    row["fp8_over_sdpa_graph"] = row["fp8_graph_ms"] / row["sdpa_bf16_graph_ms"]
    return row


def bench_prefill() -> dict:
    query = torch.randn(1, HEADS, PREFILL_TOKENS, HEAD_DIM, device="cuda", dtype=DTYPE)
    key = torch.randn(1, KV_HEADS, PREFILL_TOKENS, HEAD_DIM, device="cuda", dtype=DTYPE)
    value = torch.randn_like(key)

    def sdpa():
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)

    row = {"batch": 1, "tokens": PREFILL_TOKENS, "sdpa_default_ms": _bench(sdpa)}
    # SDPA's default pick depends on the torch build and GPU (on an H100 with torch 2.11 it is not the flash
    # backend): time each fused backend pinned as well; None where it does not take these inputs.
    for backend in PREFILL_SDPA_BACKENDS:
        field = f"sdpa_{backend.name.lower()}_ms"
        try:
            with sdpa_kernel(backend):
                row[field] = _bench(sdpa)
        except RuntimeError:
            row[field] = None
    for mode in KVQuantMode:
        qk, qv = _quantized_cache(1, PREFILL_TOKENS, mode, key, value)
        name = mode.short_name
        row[f"{name}_ms"] = _bench(lambda: quantized_attention(query, qk, qv))
        row[f"{name}_over_sdpa_flash"] = row[f"{name}_ms"] / row["sdpa_flash_attention_ms"]
        row[f"{name}_over_sdpa_default"] = row[f"{name}_ms"] / row["sdpa_default_ms"]
    return row


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device']}; {versions_line(result['versions'])}. Copy bandwidth "
        f"{result['copy_tb_per_s']:.2f} TB/s (read + written). Times are medians of `triton.testing.do_bench` (eager "
        "calls: host launch time included, as in eager decoding), in ms; the last two columns are GPU time alone, "
        "calls replayed from a CUDA graph (`do_bench_cudagraph`).",
        "",
        "Decode, 1 query token, 32 query / 8 KV heads, head_dim 128, bf16 queries; SDPA as it picks its backend by "
        "default:",
        "",
        "| batch | cache len | SDPA bf16 | dequant + SDPA | INT8 | FP8 | INT8 / SDPA | FP8 / SDPA | FP8 / INT8 "
        "| INT8 TB/s | INT8 / SDPA, graphs | FP8 / SDPA, graphs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['batch']} | {r['cache_len']} | {r['sdpa_bf16_ms']:.3f} | {r['dequant_sdpa_ms']:.3f} | "
            f"{r['int8_ms']:.3f} | {r['fp8_ms']:.3f} | {r['int8_over_sdpa']:.2f} | {r['fp8_over_sdpa']:.2f} | "
            f"{r['fp8_over_int8']:.2f} | {r['int8_tb_per_s']:.2f} | {r['int8_over_sdpa_graph']:.2f} | "
            f"{r['fp8_over_sdpa_graph']:.2f} |")
    p = result["prefill"]

    def ms(t):
        return "n/a" if t is None else f"{t:.3f}"

    lines += [
        "",
        f"Prefill, {p['tokens']} tokens, batch 1, causal, times in ms. The target (<= 1.5 x) is set against SDPA's "
        "flash backend; SDPA's default pick and its other fused backends are timed beside it (n/a: the backend "
        "does not take these inputs):",
        "",
        "| SDPA flash | SDPA cuDNN | SDPA efficient | SDPA default | INT8 | FP8 | INT8 / flash | FP8 / flash "
        "| INT8 / default | FP8 / default |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {ms(p['sdpa_flash_attention_ms'])} | {ms(p['sdpa_cudnn_attention_ms'])} | "
        f"{ms(p['sdpa_efficient_attention_ms'])} | {ms(p['sdpa_default_ms'])} | {p['int8_ms']:.3f} | "
        f"{p['fp8_ms']:.3f} | "
        f"{p['int8_over_sdpa_flash']:.2f} | {p['fp8_over_sdpa_flash']:.2f} | {p['int8_over_sdpa_default']:.2f} | "
        f"{p['fp8_over_sdpa_default']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    out_dir = out_dir_argument(__doc__)
    result = {
        **environment("cuda"),
        "copy_tb_per_s": copy_bandwidth()["tb_per_s"],
        "decode": [bench_decode(b, n) for b, n in DECODE_SHAPES],
        "prefill": bench_prefill(),
    }
    text = markdown(result)
    print(text)
    write_results(out_dir, "bench_attention", result, text)


if __name__ == "__main__":
    main()
