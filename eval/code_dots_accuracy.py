"""Accuracy of the decode kernel's dots on int8 codes, on a real model: `tests/test_accuracy.py`'s protocol with the
math of those dots in plain PyTorch.

On a GPU, decode steps over INT8 caches with heads of 128 channels compute Q.K^T and P.V on the stored int8 codes
(`hf_kvquant.ops.attention_kernel`): the query and P each become two int8 tiles, ``hi + lo / 254``, the query scaled
per row by its largest channel, P per 128-token tile by each row's largest p there and the tile's largest value
scale. The CPU has no such kernel, so this script computes that rounding in PyTorch and runs it in place of every
attention call of an INT8 cache: SmolLM2-135M in float32 (`attn_implementation="hf_kvquant"`), the first 2048
WikiText-2 tokens as a 256-token prefill and then 64-token chunks, against an unquantized DynamicCache run (mean
KL and top-1 agreement over every position), beside an INT8 cache whose attention is the plain reference. SmolLM2's
heads are 64 wide, so on a GPU it would not take these dots; the rounding is applied here to measure what it costs.

    python eval/code_dots_accuracy.py [--out-dir DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import hf_kvquant.ops
from hf_kvquant import ATTENTION_NAME, QuantizedPerTokenHeadCache
from hf_kvquant.evaluation.data import load_text
from hf_kvquant.evaluation.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/'s shared modules, however this script is started
from common import environment, out_dir_argument, versions_line, write_results

N_TOKENS, PREFILL, CHUNK = 2048, 256, 64  # as tests/test_accuracy.py
TILE = 128  # the decode kernel's tokens per tile at head_dim 128


def two_int8_tiles(x: torch.Tensor) -> torch.Tensor:
    """``x`` (within +-127) as the kernel's ``hi + lo / 254`` (`_as_codes`)."""
    hi = torch.floor(x + 0.5)
    return hi + torch.floor((x - hi) * 254 + 0.5) / 254


def code_dot_attention(query, key, value, padding_mask, scaling, sliding_window, softcap, sinks, own_workspace=False):
    """`hf_kvquant.ops._attention` with the rounding of the kernel's dots on int8 codes, for causal attention without
    window, soft-capping or sinks (SmolLM2's). Returns ``[batch, q_len, heads, head_dim]``."""
    if sliding_window is not None or softcap is not None or sinks is not None or key.length is not None:
        raise ValueError("code_dot_attention covers causal attention over a DynamicCache-like window only")
    window = slice(key.start, key.end)
    group = query.shape[1] // key.data.shape[1]
    k_codes, k_scale, v_codes, v_scale = (t[:, :, window].float().repeat_interleave(group, dim=1)
                                          for t in (key.data, key.scale, value.data, value.scale))
    q = query.float()
    q_unit = q.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = two_int8_tiles(q / q_unit) * q_unit
    q_len, kv_len = q.shape[2], k_codes.shape[2]
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (q @ k_codes.transpose(-1, -2)) * k_scale[:, :, None, :] * scaling
    visible = torch.arange(kv_len) <= torch.arange(kv_len - q_len, kv_len)[:, None]
    if padding_mask is not None:
        visible = visible & padding_mask[:, None, None, :kv_len].bool()
    scores = scores.masked_fill(~visible, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    out = torch.zeros(*p.shape[:3], v_codes.shape[-1])
    for start in range(0, kv_len, TILE):
        tile = slice(start, start + TILE)
        p_tile, vs_tile = p[..., tile], v_scale[:, :, None, tile]
        p_max = p_tile.amax(-1, keepdim=True)
        vs_max = vs_tile.amax(-1, keepdim=True)
        x = torch.where(p_max > 0, p_tile / p_max, 0.0) * (vs_tile / vs_max) * 127
        out += (two_int8_tiles(x) @ v_codes[:, :, tile]) * p_max * vs_max / 127
    return (out / p.sum(-1, keepdim=True)).transpose(1, 2).to(query.dtype)


def measure() -> dict:
    model, tokenizer = load_model("smollm2", dtype=torch.float32, attn_implementation=ATTENTION_NAME)
    text, source = load_text()
    ids = tokenizer(text[: 8 * N_TOKENS], return_tensors="pt").input_ids[:, :N_TOKENS]
    caches = {"dynamic": DynamicCache(config=model.config),
              "int8": QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head"),
              "int8_code_dots": QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head")}
    kl = {"int8": 0.0, "int8_code_dots": 0.0}
    agree = dict.fromkeys(kl, 0)
    positions = 0
    reference_attention = hf_kvquant.ops._attention
    bounds = [0, PREFILL, *range(PREFILL + CHUNK, N_TOKENS, CHUNK), N_TOKENS]
    with torch.no_grad():
        for start, end in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="chunks"):
            targets = ids[0, start + 1 : end + 1]
            logprobs = {}
            for name, cache in caches.items():
                hf_kvquant.ops._attention = code_dot_attention if name == "int8_code_dots" else reference_attention
                try:
                    logits = model(ids[:, start:end], past_key_values=cache, use_cache=True).logits
                finally:
                    hf_kvquant.ops._attention = reference_attention
                logprobs[name] = logits[0, : len(targets)].double().log_softmax(-1)
            reference = logprobs["dynamic"]
            for name in kl:
                kl[name] += float((reference.exp() * (reference - logprobs[name])).sum())
                agree[name] += int((reference.argmax(-1) == logprobs[name].argmax(-1)).sum())
            positions += len(targets)
    return {**environment("cpu"), "model": "smollm2", "text": source, "positions": positions,
            **{f"{name}_mean_kl": kl[name] / positions for name in kl},
            **{f"{name}_top1_agreement": agree[name] / positions for name in kl}}


def markdown(r: dict) -> str:
    growth = r["int8_code_dots_mean_kl"] / r["int8_mean_kl"] - 1
    return ("# INT8 decode dots on the codes: accuracy\n\n"
            f"Written by `eval/code_dots_accuracy.py` ({r['device']}; {versions_line(r['versions'])}). "
            f"SmolLM2-135M float32, {r['positions']} WikiText-2 positions, KL to an unquantized DynamicCache run.\n\n"
            "| INT8 cache attention | mean KL | top-1 agreement |\n| --- | --- | --- |\n"
            f"| reference (float32 dots) | {r['int8_mean_kl']:.6f} | {r['int8_top1_agreement']:.4f} |\n"
            f"| dots on int8 codes (rounding of the decode kernel) | {r['int8_code_dots_mean_kl']:.6f} | "
            f"{r['int8_code_dots_top1_agreement']:.4f} |\n\n"
            f"KL change: {growth:+.1%}.\n")


def main() -> None:
    out_dir = out_dir_argument(__doc__)
    result = measure()
    text = markdown(result)
    print(text)
    write_results(out_dir, "code_dots_accuracy", result, text)


if __name__ == "__main__":
    main()
