"""Perplexity with the KV cache in the loop: unquantized vs INT8 vs FP8 per-token-head caches, on one text.

    python eval/perplexity.py [--model smollm2] [--text wikitext|PATH|hf:DATASET[:CONFIG[:SPLIT]]]
        [--context-length 1024] [--stride N] [--max-tokens N] [--modes unquantized,int8,fp8] [--hadamard]
        [--dtype float32] [--device cpu] [--out-dir DIR] [--name NAME] [--no-progress]

The text (default: the local WikiText-2 raw test file, else the hub dataset) is tokenized once, with one
BOS token in front (EOS where the tokenizer has no BOS, as lm-eval does), and cut to ``--max-tokens``. It
is scored in windows of ``--context-length`` tokens moved by ``--stride`` (default: disjoint windows);
every window is one forward pass through a fresh cache of the mode, so each token attends to the
quantized keys and values of its window (`hf_kvquant.evaluation.perplexity`). Modes are named as everywhere
(``unquantized``, ``int8_per_token_head`` or ``int8``, ``fp8_per_token_head`` or ``fp8``); ``--hadamard`` builds
every quantized mode of the run with the Hadamard rotation (``hadamard=True``; the table names it
``int8_per_token_head+hadamard``). Prints a table and writes ``NAME.json`` and ``NAME.md`` (default NAME:
``perplexity_<model>``) into ``--out-dir``; without it, into a fresh folder under the system's temporary directory
(``hf_kvquant_results/NAME-<date>-<time>``), named on stderr once the first mode is written and on stdout at the
end. The published results in ``eval/results/`` are rewritten only when asked for: ``--out-dir eval/results``.

lm-eval's ``loglikelihood_rolling`` with ``max_length=L`` (``python -m hf_kvquant.evaluation.lm_eval_model``) scores the
same tokens from the same contexts as ``--context-length L+1 --stride L`` here, where the text is a whole
number of ``L``-token windows (tests/test_evaluation.py shows both agree).

Exits with status 2 and a one-line ``error:`` message for a missing text file, an unknown mode or a model
that cannot be loaded, before any result file or folder is written.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from hf_kvquant.evaluation import (
    ACCEPTED_MODES,
    ALL_MODES,
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    WIKITEXT,
    CacheMode,
    encode_text,
    load_model,
    load_text,
    parse_mode,
    perplexity,
    resolve_model,
)

from lib.environment import environment, versions_line
from lib.results import add_out_dir, resolve_out_dir, write_results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A user error: printed as one ``error:`` line, exit status 2."""


def parse_modes(spec: str, hadamard: bool = False) -> list[CacheMode]:
    """Comma-separated mode names -> the caches to score, each once, unquantized first (the reference), then in
    `ALL_MODES` order; ``hadamard`` rotates every quantized one."""
    modes = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            mode = parse_mode(name)
        except ValueError as e:
            raise CliError(str(e)) from None
        mode = mode._replace(hadamard=hadamard and mode.quantization is not None)
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise CliError("no modes given")
    return sorted(modes, key=lambda m: ALL_MODES.index(m._replace(hadamard=False).name))


def _load(model: str, dtype: torch.dtype, device: str):
    try:
        resolve_model(model)  # no model at a path: said as such, before anything is read
    except FileNotFoundError as e:
        raise CliError(f"cannot load model {model!r}: {e}") from None
    try:
        return load_model(model, dtype=dtype, device=device)
    except Exception as e:  # noqa: BLE001 - any load failure is reported as one clear line
        tried = (
            f"a packaged model ({', '.join(PACKAGED_MODELS)})" if model in PACKAGED_MODELS
            else "a GGUF file" if model.endswith(".gguf")
            else "a local folder" if Path(model).is_dir()
            else f"a local folder (none at {model!r}) or a hub model id"
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(
            f"cannot load model {model!r} as {tried}: {type(e).__name__}: {reason}. Accepted: "
            f"{', '.join(PACKAGED_MODELS)}, a .gguf path, a model folder or a hub id"
        ) from e


def _slug(model: str) -> str:
    name = Path(model).stem if model.endswith(".gguf") or Path(model).exists() else model
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"Perplexity of `{report['model']}` on {report['text']['source']} ({report['text']['tokens']} tokens "
        f"used), context {s['context_length']}, stride {s['stride']}, {s['dtype']} on {report['device']}; "
        f"{versions_line(report['versions'])}.",
        "",
        "Every window is one forward pass through a fresh cache of the mode: each token attends to the stored "
        "(quantized) keys and values of its window, its own included.",
        "",
        "| mode | tokens scored | NLL / token | perplexity | vs unquantized | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        rel = "" if r["relative_increase"] is None else f"{100 * r['relative_increase']:+.4f} %"
        lines.append(
            f"| {r['mode']} | {r['tokens']} | {r['nll']:.6f} | {r['perplexity']:.4f} | {rel} | {r['seconds']:.0f} |"
        )
    lines += ["", "Command:", "", "```bash", report["command"], "```", ""]
    return "\n".join(lines)


def _table(report: dict) -> str:
    rows = [("mode", "tokens", "perplexity", "vs unquantized")]
    for r in report["results"]:
        rel = "-" if r["relative_increase"] is None else f"{100 * r['relative_increase']:+.4f} %"
        rows.append((r["mode"], str(r["tokens"]), f"{r['perplexity']:.4f}", rel))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Defaults are spelled out in the help where they mean something (argparse's own would print "None").
    parser = argparse.ArgumentParser(prog="python eval/perplexity.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"{', '.join(PACKAGED_MODELS)}, a .gguf file, a model folder or a hub id "
                             "(default: %(default)s)")
    parser.add_argument("--text", default=WIKITEXT,
                        help="'wikitext' (the local WikiText-2 raw test file, else the hub dataset), a text file, "
                             "or hf:DATASET[:CONFIG[:SPLIT]] (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=1024, help="tokens per window (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=None, help="window step (default: the context length)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="use the first N tokens of the text, prefix token included (default: all)")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help=f"comma-separated, from: {', '.join(ACCEPTED_MODES)} (default: %(default)s)")
    parser.add_argument("--hadamard", action="store_true",
                        help="build every quantized mode with the Hadamard rotation")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="model weights and activations (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="(default: %(default)s)")
    add_out_dir(parser)
    parser.add_argument("--name", default=None, help="result file name without suffix (default: perplexity_<model>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str], save=None) -> dict:
    """Everything but the printing: checks the arguments (modes, text) before the slow model load, then scores the
    modes in turn, calling ``save(report)`` after each one (a long run that is stopped keeps the modes it finished)."""
    modes = parse_modes(args.modes, args.hadamard)
    if args.context_length < 2:
        raise CliError(f"--context-length must be at least 2; got {args.context_length}")
    stride = args.context_length if args.stride is None else args.stride
    if not 0 < stride <= args.context_length:
        raise CliError(f"--stride must be in [1, --context-length={args.context_length}]; got {stride}")
    try:
        text, text_source = load_text(args.text)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a hub dataset that cannot be reached, datasets not installed, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CliError(f"cannot read the text {args.text!r}: {type(e).__name__}: {reason}") from e
    model, tokenizer = _load(args.model, DTYPES[args.dtype], args.device)
    ids = encode_text(tokenizer, text, args.max_tokens)
    if ids.numel() < 2:
        raise CliError(f"the text has {ids.numel()} token(s); at least 2 are needed")
    report = {
        "model": args.model,
        "text": {"source": text_source, "characters": len(text), "tokens": ids.numel()},
        "settings": {"context_length": args.context_length, "stride": stride, "max_tokens": args.max_tokens,
                     "hadamard": args.hadamard, "dtype": args.dtype, "device": args.device,
                     "prefix_token_id": int(ids[0]), "torch_threads": torch.get_num_threads()},
        **environment(args.device),
        "command": shlex.join(["python", "eval/perplexity.py", *argv]),
        "results": [],
    }
    reference = None
    for mode in modes:
        start = time.perf_counter()
        r = perplexity(model, ids, mode, context_length=args.context_length, stride=stride,
                       progress=not args.no_progress)
        seconds = time.perf_counter() - start
        reference = r if mode.quantization is None else reference
        report["results"].append({
            "mode": r.mode, "tokens": r.tokens, "nll_sum": r.nll_sum, "nll": r.nll, "perplexity": r.perplexity,
            "relative_increase": (
                None if reference is None or r is reference else r.perplexity / reference.perplexity - 1
            ),
            "seconds": seconds,
        })
        print(f"{r.mode}: perplexity {r.perplexity:.4f} over {r.tokens} tokens ({seconds:.0f} s)", file=sys.stderr)
        if save is not None:
            save(report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    name = args.name or f"perplexity_{_slug(args.model)}"
    out_dir = resolve_out_dir(args.out_dir, name)
    stem = out_dir / name
    saved = []

    def save(report: dict) -> None:
        write_results(out_dir, name, report, _markdown(report))
        if not saved and args.out_dir is None:  # said once, when the folder first exists
            print(f"results go to {out_dir} (choose with --out-dir)", file=sys.stderr)
        saved.append(True)

    try:
        report = run(args, argv, save)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_table(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
