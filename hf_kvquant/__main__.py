"""Generate a continuation of one prompt with transformers' default KV cache and with hf_kvquant's INT8 and FP8
caches, and print side by side the memory each cache holds, the time each generation took and the texts.

    python -m hf_kvquant [--model smollm2|gemma3|PATH|HUB_ID] [--mode MODE [MODE ...]] [--hadamard]
        [--max-cache-len N] [--attention sdpa|eager|hf_kvquant] [--device DEVICE] [--dtype float32|bfloat16|float16]
        [--prompt TEXT] [--max-new-tokens N]

Mistakes in the arguments (an unknown mode, a device that is not there, no model at the path given, a
``--max-cache-len`` shorter than the prompt and the new tokens) end the run before the model's weights are loaded,
with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

import torch
from transformers import DynamicCache, StaticCache

from . import ATTENTION_NAME, kv_cache_nbytes
from .evaluation.caches import ACCEPTED_MODES, ALL_MODES, CacheMode, make_cache, parse_mode
from .evaluation.extras import MissingExtraError
from .evaluation.models import DEFAULT_MODEL, PACKAGED_MODELS, check_loadable, load_model, load_tokenizer

DEFAULT_PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years presses were running in "
    "more than two hundred European cities. Explain in a few sentences why this invention changed the way "
    "knowledge spread."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTIONS = ("sdpa", "eager", ATTENTION_NAME)
WARM_UP_TOKENS = 2  # the first calls pay for lazy initialisation (and, compiled, for the compilation)

_EXAMPLES = f"""examples:
  python -m hf_kvquant                               # SmolLM2: default cache vs INT8 vs FP8
  python -m hf_kvquant --mode int8 --hadamard        # the INT8 cache with the Hadamard rotation only
  python -m hf_kvquant --device cuda --attention {ATTENTION_NAME} --max-cache-len 1024
                                                     # on a GPU: hf_kvquant's kernels, decode step compiled
"""
# What the quantized caches cost on CPU, beside the default cache: said under the table of a CPU run.
CPU_NOTE = (
    "(on CPU the quantized caches run in plain PyTorch: every step quantizes the new keys and values and "
    "dequantizes each layer's whole cache for attention; on a GPU with --attention "
    f"{ATTENTION_NAME} its kernels read them in place)"
)


class CliError(Exception):
    """A mistake in the arguments: printed as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (a bad number, an unknown choice): one line, no usage block
        raise CliError(f"{message} (see python -m hf_kvquant --help)")


def _parser() -> argparse.ArgumentParser:
    description = textwrap.fill(" ".join(__doc__.split("\n\n")[0].split()), width=79)
    parser = _Parser(prog="python -m hf_kvquant", description=description, epilog=_EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{' or '.join(PACKAGED_MODELS)} (packaged on PyPI), a .gguf file, a model folder or a "
                             "hub id (default: %(default)s)")
    parser.add_argument("--mode", nargs="+", metavar="MODE", default=None,
                        help="the caches to compare, by name (several, or comma-separated): "
                             f"{', '.join(ACCEPTED_MODES)} (default: {' '.join(ALL_MODES)})")
    parser.add_argument("--hadamard", action="store_true",
                        help="rotate keys and values by a Hadamard matrix before quantizing (every quantized mode)")
    parser.add_argument("--max-cache-len", type=int, metavar="N", default=None,
                        help="preallocate N slots per layer (at least prompt + new tokens): a compileable cache, "
                             "whose decode step generate compiles on a GPU; the default cache becomes transformers' "
                             "StaticCache (default: caches that grow as tokens arrive)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                        help=f"attention implementation; {ATTENTION_NAME} reads the quantized cache in place with "
                             "its kernels on a GPU (plain PyTorch on CPU), and the default cache keeps sdpa "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, ... (default: cuda where a GPU is visible, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="the user message (through the chat template, where the model has one) "
                             "(default: a question about the printing press)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=48,
                        help="tokens to generate, greedily (default: %(default)s)")
    return parser


def _modes(names: list[str] | None, hadamard: bool) -> list[CacheMode]:
    """The caches to run, each once, in `ALL_MODES` order (the default cache first: the others are compared to it)."""
    names = ALL_MODES if names is None else [n.strip() for spec in names for n in spec.split(",") if n.strip()]
    modes = []
    for name in names:
        try:
            mode = parse_mode(name)
        except ValueError as e:
            raise CliError(f"--mode: {e}") from None
        mode = mode._replace(hadamard=hadamard and mode.quantization is not None)
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise CliError(f"--mode needs at least one of: {', '.join(ACCEPTED_MODES)}")
    if hadamard and all(m.quantization is None for m in modes):
        raise CliError("--hadamard rotates the quantized caches, and --mode names none: add int8 or fp8")
    return sorted(modes, key=lambda m: ALL_MODES.index(m._replace(hadamard=False).name))


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU build" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise CliError(f"--device {name}: {why}; run on the CPU with --device cpu (or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: {torch.cuda.device_count()} CUDA GPU(s) visible, "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise CliError(f"--device {name}: use cpu, cuda or cuda:N")
    return device


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments that need no model, checked in the order given on the help."""
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}")
    if args.max_cache_len is not None and args.max_cache_len < 1:
        raise CliError(f"--max-cache-len must be a number of tokens, at least prompt + new tokens; "
                       f"got {args.max_cache_len}")
    args.modes = _modes(args.mode, args.hadamard)
    args.device = _device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    try:
        check_loadable(args.model)
    except (FileNotFoundError, MissingExtraError) as e:
        raise CliError(str(e)) from None
    return args


def _inputs(tokenizer, prompt: str):
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def _cache(model, mode: CacheMode, max_cache_len: int | None):
    if mode.quantization is None and max_cache_len is not None:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    return make_cache(model, mode, max_cache_len=max_cache_len)


def _label(mode: CacheMode, max_cache_len: int | None) -> str:
    if mode.quantization is None:
        return f"{DynamicCache.__name__ if max_cache_len is None else StaticCache.__name__} (default)"
    return f"QuantizedPerTokenHeadCache {mode.name}"


def _generate(model, inputs, cache, max_new_tokens: int):
    start = time.perf_counter()
    output = model.generate(**inputs, cache=cache, max_new_tokens=max_new_tokens, do_sample=False)
    if output.is_cuda:
        torch.cuda.synchronize(output.device)
    return output, time.perf_counter() - start


def _run_mode(model, inputs, mode: CacheMode, args: argparse.Namespace):
    """Warm up, then generate through one cache: ``(output ids, cache, seconds)``."""
    # The default cache is transformers' own path: under --attention hf_kvquant it keeps sdpa.
    attention = "sdpa" if mode.quantization is None and args.attention == ATTENTION_NAME else args.attention
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    if args.max_cache_len is None:
        _generate(model, inputs, _cache(model, mode, None), WARM_UP_TOKENS)
        cache = _cache(model, mode, None)
    else:  # one cache, warmed up (compiled, on a GPU), then emptied: later calls reuse what was compiled for it
        cache = _cache(model, mode, args.max_cache_len)
        _generate(model, inputs, cache, WARM_UP_TOKENS)
        cache.reset()
    output, seconds = _generate(model, inputs, cache, args.max_new_tokens)
    return output, cache, seconds


def run(args: argparse.Namespace) -> int:
    try:
        tokenizer = load_tokenizer(args.model)
    except Exception as e:  # noqa: BLE001 - any failure to read the model is reported as one line
        raise CliError(f"cannot load the tokenizer of {args.model!r}: {_first_line(e)}") from e
    inputs = _inputs(tokenizer, args.prompt)
    prompt_len = inputs["input_ids"].shape[1]
    needed = prompt_len + args.max_new_tokens
    if args.max_cache_len is not None and args.max_cache_len < needed:
        raise CliError(
            f"--max-cache-len {args.max_cache_len} is too small: the prompt has {prompt_len} tokens and "
            f"--max-new-tokens is {args.max_new_tokens}, so the cache needs {needed} slots; pass --max-cache-len "
            f"{needed} or more (or fewer --max-new-tokens)"
        )
    try:
        model, _ = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, tokenizer=tokenizer,
                              attn_implementation=args.attention)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot load model {args.model!r}: {_first_line(e)}") from e
    inputs = inputs.to(args.device)

    cache_kind = "growing caches" if args.max_cache_len is None else f"caches preallocated for {args.max_cache_len}"
    print(f"model: {args.model} ({args.dtype} on {args.device}, {args.attention} attention, {cache_kind}), "
          f"prompt: {prompt_len} tokens, greedy, {args.max_new_tokens} new tokens\n")
    rows = []
    for mode in args.modes:
        output, cache, seconds = _run_mode(model, inputs, mode, args)
        text = tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True)
        rows.append((mode, _label(mode, args.max_cache_len), kv_cache_nbytes(cache), seconds, text))

    default_bytes = rows[0][2] if rows[0][0].quantization is None else None
    width = max(45, *(len(label) + 1 for _, label, *_ in rows))
    print(f"{'cache':<{width}} {'KV bytes held':>14}{' vs default' if default_bytes else ''} {'time':>8}")
    for _, label, nbytes, seconds, _ in rows:
        ratio = f" {nbytes / default_bytes:>10.2f}" if default_bytes else ""
        print(f"{label:<{width}} {nbytes:>14,}{ratio} {seconds:>7.2f}s")
    quantized = any(mode.quantization is not None for mode, *_ in rows)
    notes = []
    if default_bytes:
        notes.append(f"(the default cache holds {args.dtype} keys and values"
                     f"{'; the quantized ones 1 byte + a float32 scale per token-head' if quantized else ''})")
    if quantized and args.device.type == "cpu":
        notes.append(CPU_NOTE)
    if notes:
        print("\n" + "\n".join(notes))
    for _, label, _, _, text in rows:
        print(f"\n--- {label}\n{text.strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2, with one ``error:`` line on stderr, for a mistake in the
    arguments)."""
    try:
        args = _check(_parser().parse_args(argv))
        return run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
