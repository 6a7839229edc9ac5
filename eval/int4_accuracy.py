"""Which 4-bit KV-cache scheme, and what it costs in perplexity (issue 33): fake-quant caches, WikiText-2.

    python eval/int4_accuracy.py [--model smollm2] [--max-tokens 67584] [--context-length 1024]
        [--schemes unquantized,int8+H,...] [--out-dir DIR] [--name NAME] [--threads 1]

The perplexity protocol of eval/perplexity.py (`hf_kvquant.evaluation.perplexity`), replicated because that function
builds its cache from a mode name and cannot take a cache factory: the text tokenized once with one prefix token
(`encode_text`), cut to ``--max-tokens``, scored in disjoint windows of ``--context-length`` tokens, each window one
forward pass through a fresh cache, the first token of every window unscored. Same tokens, same windows, same sums:
the unquantized row reproduces eval/results/perplexity_<model>.md's.

Every cache is a `FakeQuantKVCache` (eval/lib/int4_variants.py): new keys and values rotated, rounded per token-head
by the scheme, rotated back, kept in float32; the numbers a quantized cache of the scheme holds. ``+H`` names a scheme
with the Hadamard rotation. ``--list`` prints the schemes. Writes NAME.json and NAME.md into ``--out-dir`` after each
scheme, in the order given; the relative increases are against the ``unquantized`` row wherever it stands (default NAME ``int4_accuracy_<model>``, default folder a fresh one under the temporary directory).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

from hf_kvquant.evaluation import encode_text, load_model, load_text

from lib.environment import environment, versions_line
from lib.int4_variants import FakeQuantKVCache, Rounding, Scheme
from lib.results import add_out_dir, resolve_out_dir, write_results

NONE, INT8, FP8 = Rounding("none"), Rounding("int8"), Rounding("fp8")
INT4 = Rounding("int4")
F16 = torch.float16


def _schemes() -> dict[str, Scheme]:
    s = [
        Scheme("unquantized", NONE, NONE, "none"),
        Scheme("int8", INT8, INT8, "none"),
        Scheme("int8+H", INT8, INT8),
        Scheme("fp8+H", FP8, FP8),
        Scheme("int4sym+H", Rounding("int4sym"), Rounding("int4sym")),
        Scheme("int4", INT4, INT4, "none"),
        Scheme("int4+H", INT4, INT4),
        Scheme("k8v4", INT8, INT4, "none"),
        Scheme("k8v4+H", INT8, INT4),
        Scheme("k4v8+H", INT4, INT8),
        Scheme("int4-intzp+H", Rounding(zero="int"), Rounding(zero="int")),
        Scheme("int4-fp16params+H", Rounding(params=F16), Rounding(params=F16)),
        Scheme("int4-clip-center+H", Rounding(clip="center"), Rounding(clip="center")),
        Scheme("int4-clip-grid+H", Rounding(clip="grid"), Rounding(clip="grid")),
        Scheme("int4-kclip-grid+H", Rounding(clip="grid"), INT4),
        Scheme("int4-clip-grid-fp16params+H", Rounding(clip="grid", params=F16), Rounding(clip="grid", params=F16)),
        Scheme("k8v4-vclip-grid+H", INT8, Rounding(clip="grid")),
        Scheme("int4-g32+H", Rounding(group=32), Rounding(group=32)),
        Scheme("int4-g32-fp16params+H", Rounding(group=32, params=F16), Rounding(group=32, params=F16)),
        Scheme("int4-kg32-fp16params+H", Rounding(group=32, params=F16), Rounding(params=F16)),
        Scheme("int4-kg32-clip-grid-fp16params+H", Rounding(group=32, params=F16, clip="grid"),
               Rounding(params=F16, clip="grid")),
    ]
    s += [
        Scheme("int4-ksub+H", INT4, INT4, key_offset=True),
        Scheme("int4-ksub-clip-grid+H", Rounding(clip="grid"), Rounding(clip="grid"), key_offset=True),
        Scheme("k8v4-ksub+H", INT8, INT4, key_offset=True),
        Scheme("int4-ksub", INT4, INT4, "none", key_offset=True),
    ]
    s += [Scheme(f"int4+RH{seed}", INT4, INT4, f"rh{seed}") for seed in (1, 2, 3)]
    s += [Scheme(f"int4-clip-grid+RH{seed}", Rounding(clip="grid"), Rounding(clip="grid"), f"rh{seed}")
          for seed in (1, 2)]
    return {x.name: x for x in s}


SCHEMES = _schemes()
DEFAULT = "unquantized,int8+H,fp8+H,int4,int4+H,k8v4+H,int4-clip-grid+H"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, make_cache, context_length: int) -> tuple[float, int]:
    """(NLL sum, tokens scored) of ``ids`` in disjoint windows, as `hf_kvquant.evaluation.perplexity` scores them."""
    total, nll_sum, scored, scored_until = ids.numel(), 0.0, 0, 1
    for begin in range(0, total - 1, context_length):
        end = min(begin + context_length, total)
        window = ids[begin:end]
        logits = model(window[None], cache=make_cache(), use_cache=True).logits[0].float()
        first = max(scored_until - begin - 1, 0)
        targets = window[first + 1:]
        logprobs = torch.log_softmax(logits[first:-1], dim=-1)
        nll_sum -= logprobs.gather(-1, targets[:, None]).sum().item()
        scored += targets.numel()
        scored_until = end
        if end == total:
            break
    return nll_sum, scored


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"INT4 KV-cache schemes: perplexity of `{report['model']}` on {report['text']['source']} "
        f"({report['text']['tokens']} tokens used), context {s['context_length']}, disjoint windows, float32 on "
        f"{report['device']}, {s['torch_threads']} thread(s); {versions_line(report['versions'])}; {report['date']}.",
        "",
        "Fake-quant caches (eval/lib/int4_variants.py): every new key and value is rotated (+H: Hadamard; +RHn: "
        "randomised Hadamard of seed n), rounded per token-head by the scheme, rotated back and kept in float32 - "
        "the numbers the quantized cache would hand attention. Bytes: keys + values per token-head over bf16's, at "
        f"this model's head_dim {report['head_dim']}. `-ksub`: the keys are stored minus one mean key per (layer, "
        "kv-head), the mean of the window's first write (the prefill), which leaves attention unchanged (softmax is "
        "invariant to a shift common to all keys) and costs no bytes per token. `clip-grid`: per row, the 4-bit "
        "range [lo, hi] shrunk at each end (25 candidates) to the least squared error. `clip-center`: shrunk about "
        "its middle (9 ratios). `intzp`: integer zero point. `fp16params`: float16 scale and zero. `gN`: a scale and "
        "zero per N channels. `int4sym`: symmetric (absmax / 7).",
        "",
        "| scheme | keys | values | bytes vs bf16 | tokens scored | NLL / token | perplexity | vs unquantized | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        rel = "" if r["relative_increase"] is None else f"{100 * r['relative_increase']:+.3f} %"
        lines.append(f"| {r['scheme']} | {r['key']} | {r['value']} | {r['bytes_ratio']:.3f} | {r['tokens']} | "
                     f"{r['nll']:.6f} | {r['perplexity']:.4f} | {rel} | {r['seconds']:.0f} |")
    lines += ["", "Command:", "", "```bash", report["command"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python eval/int4_accuracy.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="a packaged model (default: %(default)s)")
    parser.add_argument("--text", default="wikitext")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=67584, help="prefix token included (default: %(default)s)")
    parser.add_argument("--schemes", default=DEFAULT, help="comma-separated (default: %(default)s); --list names all")
    parser.add_argument("--list", action="store_true", help="print the schemes and exit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    add_out_dir(parser)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.list:
        for name, sc in SCHEMES.items():
            print(f"{name}: keys {sc.key.label()}, values {sc.value.label()}, rotation {sc.rotation}")
        return 0
    names = [n.strip() for n in args.schemes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        print(f"error: unknown scheme(s) {unknown}; --list names them", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    name = args.name or f"int4_accuracy_{args.model}"
    out_dir = resolve_out_dir(args.out_dir, name)

    text, source = load_text(args.text)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = encode_text(tokenizer, text, args.max_tokens)
    report = {
        "model": args.model, "head_dim": head_dim,
        "text": {"source": source, "characters": len(text), "tokens": ids.numel()},
        "settings": {"context_length": args.context_length, "stride": args.context_length,
                     "max_tokens": args.max_tokens, "dtype": "float32", "torch_threads": torch.get_num_threads(),
                     "prefix_token_id": int(ids[0])},
        **environment("cpu"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "eval/int4_accuracy.py", *argv]),
        "results": [],
    }
    for n in names:
        scheme = SCHEMES[n]
        start = time.perf_counter()
        nll_sum, tokens = perplexity(model, ids, lambda sc=scheme: FakeQuantKVCache(model.config, sc),
                                     args.context_length)
        seconds = time.perf_counter() - start
        ppl = math.exp(nll_sum / tokens)
        report["results"].append({
            "scheme": n, "key": scheme.key.label() + ("-ksub" if scheme.key_offset else ""),
            "value": scheme.value.label(), "rotation": scheme.rotation,
            "bytes_ratio": scheme.bytes_ratio(head_dim), "tokens": tokens, "nll_sum": nll_sum,
            "nll": nll_sum / tokens, "perplexity": ppl,
            "relative_increase": None, "seconds": seconds,
        })
        # Against the unquantized row wherever it stands in the list (it may be scored last).
        reference = next((r["perplexity"] for r in report["results"] if r["scheme"] == "unquantized"), None)
        for r in report["results"]:
            r["relative_increase"] = (None if reference is None or r["scheme"] == "unquantized"
                                      else r["perplexity"] / reference - 1)
        rel = "" if reference is None or n == "unquantized" else f" ({100 * (ppl / reference - 1):+.3f} %)"
        print(f"{n}: perplexity {ppl:.4f}{rel} over {tokens} tokens ({seconds:.0f} s)", file=sys.stderr, flush=True)
        write_results(out_dir, name, report, _markdown(report))
    print(f"wrote {out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
