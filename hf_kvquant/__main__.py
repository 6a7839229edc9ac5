"""The main job: generate with the default cache and with the quantized caches, side by side.

    python -m hf_kvquant [--model smollm2|gemma3|PATH|HUB_ID] [--prompt TEXT] [--max-new-tokens N]

Prints, per cache, the bytes it holds after generation, the generation time and the text.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import DynamicCache

from . import KVQuantMode, QuantizedPerTokenHeadCache, kv_cache_nbytes
from .evaluation.models import DEFAULT_MODEL, load_model

DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years presses were running in "
    "more than two hundred European cities. Explain in a few sentences why this invention changed the way "
    "knowledge spread."
)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m hf_kvquant", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2, gemma3, a .gguf path, a folder or a hub id")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _generate(model, inputs, cache, max_new_tokens):
    start = time.perf_counter()
    output = model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    if output.is_cuda:
        torch.cuda.synchronize()
    return output, time.perf_counter() - start


def main(argv=None) -> int:
    args = _parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    except (FileNotFoundError, OSError) as e:
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(args.device)
    prompt_len = inputs["input_ids"].shape[1]

    caches = {"DynamicCache (default)": DynamicCache(config=model.config)}
    for mode in KVQuantMode:
        caches[f"QuantizedPerTokenHeadCache {mode.value}"] = QuantizedPerTokenHeadCache(config=model.config, mode=mode)

    print(f"model: {args.model} ({dtype}, {args.device}), prompt: {prompt_len} tokens, greedy, {args.max_new_tokens} new tokens\n")
    for cache in (DynamicCache(config=model.config), QuantizedPerTokenHeadCache(config=model.config)):
        _generate(model, inputs, cache, 2)  # warm-up: first calls pay for lazy initialisation
    results = []
    for name, cache in caches.items():
        output, seconds = _generate(model, inputs, cache, args.max_new_tokens)
        text = tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True)
        results.append((name, kv_cache_nbytes(cache), seconds, output.shape[1] - prompt_len, text))

    baseline_bytes = results[0][1]
    print(f"{'cache':<45} {'KV bytes held':>14} {'vs default':>10} {'time':>8}")
    for name, nbytes, seconds, new_tokens, _ in results:
        print(f"{name:<45} {nbytes:>14,} {nbytes / baseline_bytes:>10.2f} {seconds:>7.2f}s")
    print(f"\n(the default cache holds {dtype} keys and values; the quantized ones 1 byte + a float32 scale per token-head)")
    for name, _, _, _, text in results:
        print(f"\n--- {name}\n{text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
