"""Accuracy of the decode kernel's Q.K^T on int8 key codes, on a real model: `tests/test_accuracy.py`'s protocol with
the math of those dots in plain PyTorch.

On a GPU, decode steps over INT8 caches with keys of 64, 128 or 256 channels compute Q.K^T on the stored int8 key
codes (`hf_kvquant.ops.attention_kernel`): the query becomes two int8 tiles, ``hi + lo / 254``, scaled per row by its
largest channel (P.V widens the value codes, as the reference's float32 dots do). The CPU has no such kernel, so this
script computes that rounding in PyTorch and runs it in place of every attention call of an INT8 cache: SmolLM2-135M
(head_dim 64) or Gemma-3-270M (head_dim 256, sliding windows) in float32 (`attn_implementation="hf_kvquant"`), the first
2048 WikiText-2 tokens as a 256-token prefill and then
64-token chunks, against an unquantized DynamicCache run (mean KL and top-1 agreement over every position), beside an
INT8 cache whose attention is the plain reference. The rounding is applied to every call, prefill and chunks too,
where the GPU applies it to decode steps only (at most 64 query rows per KV head): an upper bound on its cost.

    python eval/code_dots_accuracy.py [--model smollm2|gemma3] [--out-dir DIR]   # writes code_dots_accuracy[_gemma3]
"""

from __future__ import annotations


import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import hf_kvquant.ops
from hf_kvquant import ATTENTION_NAME, QuantizedPerTokenHeadCache
from hf_kvquant.evaluation.data import load_text
from hf_kvquant.evaluation.models import load_model

from lib.environment import environment, versions_line
from lib.results import resolve_out_dir, results_parser, write_results

N_TOKENS, PREFILL, CHUNK = 2048, 256, 64  # as tests/test_accuracy.py
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma-3-270M"}
# The control: the plain reference with each query element moved by this fraction of itself (a random sign). Far below
# the code dots' rounding, it still moves some keys and values across a rounding boundary of their codes in later
# layers, and so re-draws the cache's quantization noise: the spread of mean KL that any change of the arithmetic has.
JITTER = 1e-6
CONTROL_SEEDS = (0, 1, 2)
REFERENCE_ATTENTION = hf_kvquant.ops._attention  # on the CPU: dequantize, then the plain-PyTorch reference
def two_int8_tiles(x: torch.Tensor) -> torch.Tensor:
    """``x`` (within +-127) as the kernel's ``hi + lo / 254`` (`_as_codes`)."""
    hi = torch.floor(x + 0.5)
    return hi + torch.floor((x - hi) * 254 + 0.5) / 254


def code_dot_attention(query, *args, **kwargs):
    """`hf_kvquant.ops._attention` (the plain reference here) with the rounding of the kernel's Q.K^T on int8 key
    codes: the query as two int8 tiles per row, in units of its largest channel / 127 / 254. The kernel's
    ``(q_codes . k_codes) * q_unit * k_scale`` is ``q_rounded . (k_codes * k_scale)``: the same numbers up to float32
    summation order, so the reference's masks, windows, soft-capping and sinks all apply unchanged."""
    q = query.float()
    q_unit = q.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return REFERENCE_ATTENTION(two_int8_tiles(q / q_unit) * q_unit, *args, **kwargs)


def jittered_attention(generator: torch.Generator):
    """`hf_kvquant.ops._attention` (the plain reference here) with the query moved by ``JITTER`` of itself."""
    def attention(query, *args, **kwargs):
        sign = torch.randint(0, 2, query.shape, generator=generator).to(query.dtype) * 2 - 1
        return REFERENCE_ATTENTION(query * (1 + JITTER * sign), *args, **kwargs)
    return attention


def measure(model_name: str) -> dict:
    model, tokenizer = load_model(model_name, dtype=torch.float32, attn_implementation=ATTENTION_NAME)
    text, source = load_text()
    ids = tokenizer(text[: 8 * N_TOKENS], return_tensors="pt").input_ids[:, :N_TOKENS]
    caches = {"dynamic": DynamicCache(config=model.config),
              "int8": QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head"),
              "int8_code_dots": QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head"),
              **{f"int8_jittered_{seed}": QuantizedPerTokenHeadCache(config=model.config, mode="int8_per_token_head")
                 for seed in CONTROL_SEEDS}}
    kl = dict.fromkeys(list(caches)[1:], 0.0)
    agree = dict.fromkeys(kl, 0)
    positions = 0
    attention = {"int8_code_dots": code_dot_attention,
                 **{f"int8_jittered_{seed}": jittered_attention(torch.Generator().manual_seed(seed))
                    for seed in CONTROL_SEEDS}}
    bounds = [0, PREFILL, *range(PREFILL + CHUNK, N_TOKENS, CHUNK), N_TOKENS]
    with torch.no_grad():
        for start, end in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="chunks"):
            targets = ids[0, start + 1 : end + 1]
            logprobs = {}
            for name, cache in caches.items():
                hf_kvquant.ops._attention = attention.get(name, REFERENCE_ATTENTION)
                try:
                    logits = model(ids[:, start:end], past_key_values=cache, use_cache=True).logits
                finally:
                    hf_kvquant.ops._attention = REFERENCE_ATTENTION
                logprobs[name] = logits[0, : len(targets)].double().log_softmax(-1)
            reference = logprobs["dynamic"]
            for name in kl:
                kl[name] += float((reference.exp() * (reference - logprobs[name])).sum())
                agree[name] += int((reference.argmax(-1) == logprobs[name].argmax(-1)).sum())
            positions += len(targets)
    return {**environment("cpu"), "model": model_name, "text": source, "positions": positions,
            **{f"{name}_mean_kl": kl[name] / positions for name in kl},
            **{f"{name}_top1_agreement": agree[name] / positions for name in kl}}


def markdown(r: dict) -> str:
    growth = r["int8_code_dots_mean_kl"] / r["int8_mean_kl"] - 1
    controls = [r[f"int8_jittered_{seed}_mean_kl"] / r["int8_mean_kl"] - 1 for seed in CONTROL_SEEDS]
    return ("# INT8 decode Q.K^T on the key codes: accuracy\n\n"
            f"Written by `eval/code_dots_accuracy.py` ({r['device']}; {versions_line(r['versions'])}). "
            f"{MODEL_NAMES[r['model']]} float32, {r['positions']} WikiText-2 positions, KL to an unquantized "
            "DynamicCache run.\n\n"
            "| INT8 cache attention | mean KL | top-1 agreement |\n| --- | --- | --- |\n"
            f"| reference (float32 dots) | {r['int8_mean_kl']:.6f} | {r['int8_top1_agreement']:.4f} |\n"
            f"| Q.K^T on int8 key codes (rounding of the decode kernel) | {r['int8_code_dots_mean_kl']:.6f} | "
            f"{r['int8_code_dots_top1_agreement']:.4f} |\n"
            + "".join(f"| control (seed {seed}): reference, query moved by {JITTER:g} of itself | "
                      f"{r[f'int8_jittered_{seed}_mean_kl']:.6f} | {r[f'int8_jittered_{seed}_top1_agreement']:.4f} |\n"
                      for seed in CONTROL_SEEDS)
            + f"\nKL change: {growth:+.1%} with the code dots; "
            f"{', '.join(f'{c:+.1%}' for c in controls)} with the controls (the spread that re-drawing the cache's "
            "rounding gives).\n")


def main() -> None:
    parser = results_parser(__doc__)
    parser.add_argument("--model", choices=list(MODEL_NAMES), default="smollm2")
    args = parser.parse_args()
    result = measure(args.model)
    text = markdown(result)
    print(text)
    name = "code_dots_accuracy" + ("" if args.model == "smollm2" else f"_{args.model}")
    print(f"wrote {write_results(resolve_out_dir(args.out_dir, name), name, result, text)}.json and .md")


if __name__ == "__main__":
    main()
