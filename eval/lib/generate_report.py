"""What a bench_generate run shows (eval/bench_generate.py's outputs): the issue's targets checked against the
measurements, the markdown tables and the plot, written beside the JSON (``--replot`` redraws them from it).

Two sets of targets: the eager ones (INT8 against DynamicCache and transformers' QuantizedCache fp8, and what fits in
a memory budget), and the compiled ones (INT8 + compile against transformers' StaticCache + compile, the anchor: wall
ms/step, the speed-up over eager INT8, FP8 against INT8, peak KV memory, compile time; StaticCache is the faster of
its cuDNN and no-cuDNN SDPA runs in each row). A target whose caches did not run in this run is listed by name only.
The compiled comparison has its own tables.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lib.caches import CACHES, COMPILED
from lib.environment import GIB, versions_line
from lib.generate_row import REPEATED_PREFILL_TOKENS
from lib.results import write_results


def _row_label(row: dict) -> str:
    return f"{row['shape']} {row['batch']}x{row['prompt'] // 1024 if row['prompt'] >= 1024 else row['prompt']}" + (
        "k" if row["prompt"] >= 1024 else "")


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _get(row: dict, key: str, field: str):
    entry = row["caches"].get(key) or {}
    return entry.get(field)


# Rows (shape, batch, prompt) of the compiled targets: INT8 + compile no slower than StaticCache + compile where the
# cache is small, and well faster where reading it dominates.
COMPILED_PARITY = {("1b", 1, 2048): 1.0, ("1b", 16, 32768): 0.6, ("8b", 8, 16384): 0.6}
COMPILED_SPEEDUP_ROW = ("1b", 1, 2048)  # where INT8 + compile must be >= 5x eager INT8


def targets(result: dict) -> list[dict]:
    """The issue's targets, each checked where its data exist: INT8 against DynamicCache and QuantizedCache fp8
    (eager), INT8 + compile against StaticCache + compile."""
    checks = []

    def check(name, where, value, limit, higher_is_better):
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        checks.append({"target": name, "where": where, "value": value, "limit": limit, "met": met})

    for row in result["rows"]:
        where = _row_label(row)
        check("wall tok/s INT8 / DynamicCache >= 0.95", where,
              _ratio(_get(row, "int8", "decode_tok_s"), _get(row, "dynamic", "decode_tok_s")), 0.95, True)
        if row["prompt"] >= 8192:
            check("wall tok/s INT8 / QuantizedCache fp8 >= 1.5", where,
                  _ratio(_get(row, "int8", "decode_tok_s"), _get(row, "hf_fp8", "decode_tok_s")), 1.5, True)
        if (row["shape"], row["batch"], row["prompt"]) == ("8b", 8, 16384):
            check("GPU ms/step INT8 / DynamicCache <= 0.8", where,
                  _ratio(_get(row, "int8", "gpu_ms_per_step"), _get(row, "dynamic", "gpu_ms_per_step")), 0.8, False)
        check("peak decode KV memory INT8 / DynamicCache <= 0.55", where,
              _ratio(_get(row, "int8", "peak_decode_kv_bytes"), _get(row, "dynamic", "peak_decode_kv_bytes")),
              0.55, False)
        _compiled_targets(row, where, check)
    for search in result["search"]:
        for field, what in (("max_batch", f"largest batch at {search['context']}"),
                            ("max_context", "longest context at batch 1")):
            check(f"{what} INT8 / DynamicCache >= 1.8", f"{search['shape']}, {search['budget_gib']:g} GiB",
                  _ratio(_get(search, "int8", field), _get(search, "dynamic", field)), 1.8, True)
    return checks


def _anchor(row: dict) -> str:
    """The StaticCache + compile of a row that the compiled targets use: the faster of cuDNN SDPA (the default) and
    the other SDPA kernels."""
    runs = [k for k in ("static_compiled", "static_compiled_no_cudnn") if _get(row, k, "ms_per_step_wall")]
    return min(runs, key=lambda k: _get(row, k, "ms_per_step_wall")) if runs else "static_compiled"


def _compiled_targets(row: dict, where: str, check) -> None:
    """The compiled targets of one row (wall ms/step: lower is better), against the faster StaticCache + compile."""
    wall = functools.partial(_get, row, field="ms_per_step_wall")
    shape, anchor = (row["shape"], row["batch"], row["prompt"]), _anchor(row)
    if anchor != "static_compiled":
        where += " (vs no cuDNN SDPA)"
    if shape in COMPILED_PARITY:
        limit = COMPILED_PARITY[shape]
        check(f"wall ms/step INT8 compiled / StaticCache compiled <= {limit:g}", where,
              _ratio(wall(key="int8_compiled"), wall(key=anchor)), limit, False)
    if shape == COMPILED_SPEEDUP_ROW:
        check("wall speed-up INT8 compiled over eager INT8 >= 5", where,
              _ratio(wall(key="int8"), wall(key="int8_compiled")), 5.0, True)
    check("wall ms/step FP8 compiled / INT8 compiled <= 1.1", where,
          _ratio(wall(key="fp8_compiled"), wall(key="int8_compiled")), 1.1, False)
    peak = functools.partial(_get, row, field="peak_decode_kv_bytes")
    check("peak decode KV memory INT8 compiled / StaticCache compiled <= 0.55", where,
          _ratio(peak(key="int8_compiled"), peak(key=anchor)), 0.55, False)
    check("compile s INT8 compiled / StaticCache compiled <= 1.5 (aim)", where,
          _ratio(_get(row, "int8_compiled", "compile_s"), _get(row, anchor, "compile_s")), 1.5, False)


def _one_line(text: str, limit: int = 160) -> str:
    """An error message fit for a table cell."""
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt(value, fmt: str = ".2f", scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return format(value, fmt) if fmt == "d" else format(value / scale, fmt)


def _compiled_table(result: dict) -> list[str]:
    """The compiled comparison: wall ms/step of StaticCache + compile (cuDNN SDPA and not), INT8 and FP8 + compile,
    eager INT8, their ratios (against the faster StaticCache), compile seconds, peak KV memory, and how compiled tokens
    compare with eager ones."""
    rows = [r for r in result["rows"] if any(k in r["caches"] for k in COMPILED)]
    if not rows:
        return []
    s = result["settings"]
    keys = ("static_compiled", "int8_compiled", "fp8_compiled")

    def arrow(row, field, form=".2f", scale=1.0, keys=keys):
        return " → ".join(fmt(_get(row, k, field), form, scale) for k in keys)

    def match(row, key):
        entry = row["caches"].get(key) or {}
        if "tokens_match_eager" not in entry:
            return "–"
        return ("yes" if entry["tokens_match_eager"] else f"{entry['tokens_matched_steps']}") + (
            f", {entry['tokens_agreement']:.0%}, {entry['max_logit_gap']:.2f}/{entry['median_top2_margin']:.2f}")

    lines = ["## Compiled decoding vs StaticCache + compile", "",
             "Each decode step through `model.get_compiled_call(CompileConfig(fullgraph=True))` as `generate` runs it "
             f"(backend {s.get('compile_backend')}, mode {s.get('compile_mode') or 'default'}), fed what `generate` "
             "feeds it, over a cache preallocated for the prompt + the row's decode steps; prefill eager. Wall ms/step "
             "as above (GPU ms/step: the table of every row; the profiler sees the kernels inside CUDA graphs). "
             "StaticCache runs with PyTorch's default SDPA choice (cuDNN on torch 2.11 + Hopper) and, where run, "
             "without cuDNN (`no cuDNN`); the ratios and targets use the faster. Compile s: the first compiled step "
             "(synchronised), "
             "compilation included, each cache compiled cold (dynamo reset, fresh inductor/Triton cache dir, the "
             f"process's one-time costs paid before the first row: {fmt(result.get('compile_prewarm_s'), '.0f')} s).",
             "",
             "| row | StaticCache + compile ms/step | no cuDNN | INT8 + compile | FP8 + compile | INT8 eager "
             "| INT8c / Static | FP8c / INT8c | INT8 eager / INT8c | compile s Static → INT8 → FP8 "
             "| peak KV GiB Static → INT8 → FP8 |", "|" + " --- |" * 11]
    for row in rows:
        wall = functools.partial(_get, row, field="ms_per_step_wall")
        anchor = _anchor(row)
        lines.append(
            f"| {_row_label(row)} | {fmt(wall(key='static_compiled'))} | {fmt(wall(key='static_compiled_no_cudnn'))} "
            f"| {fmt(wall(key='int8_compiled'))} | {fmt(wall(key='fp8_compiled'))} | {fmt(wall(key='int8'))} "
            f"| {fmt(_ratio(wall(key='int8_compiled'), wall(key=anchor)))} "
            f"| {fmt(_ratio(wall(key='fp8_compiled'), wall(key='int8_compiled')))} "
            f"| {fmt(_ratio(wall(key='int8'), wall(key='int8_compiled')), '.1f')} "
            f"| {arrow(row, 'compile_s', '.1f', keys=(anchor, *keys[1:]))} "
            f"| {arrow(row, 'peak_decode_kv_bytes', '.2f', GIB, keys=(anchor, *keys[1:]))} |")
    shown = [k for k in COMPILED if any(k in r["caches"] for r in rows)]
    lines += ["", f"Compiled tokens against the same cache decoded eagerly over {s.get('match_steps')} greedy steps, "
              "eager fed the compiled tokens: `yes` (all equal), or the leading steps equal in every sequence (eager "
              "greedy decoding matches that long); then the share of (sequence, step) equal, and the largest logit "
              "gap where eager prefers another token / the median gap between eager's top two logits (random "
              "weights: near-ties are common, and inductor's fused bf16 arithmetic rounds differently from eager's; "
              "a broken step would disagree almost everywhere).", "",
              "| row | " + " | ".join(CACHES[k][0] for k in shown) + " |", "|" + " --- |" * (len(shown) + 1)]
    lines += [f"| {_row_label(row)} | " + " | ".join(match(row, k) for k in shown) + " |" for row in rows]
    return [*lines, ""]


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# End-to-end generation: DynamicCache vs transformers' QuantizedCache vs hf_kvquant",
        "",
        f"Device: {result['device']}; {versions_line(result['versions'])}. Written by `eval/bench_generate.py` "
        f"({result.get('elapsed_s', 0):.0f} s{', incomplete' if not result.get('complete') else ''}).",
        "",
        f"Random-weight Llama models in {s['dtype']}. Prefill: median of up to {s['prefill_repeats']} runs (one run "
        f"above {REPEATED_PREFILL_TOKENS} prompt tokens), after a warm-up. Decode: greedy steps, {s['warmup_steps']} "
        f"warm-up, then wall time of {s['steps']} steps / {s['steps']} (one synchronize), median of {s['repeats']}; "
        f"tokens/s = batch / that. GPU ms/step: kernel time summed by `torch.profiler` over {s['profile_steps']} "
        "steps; host gap = wall − GPU. Peak KV = peak allocated during decode − allocated before the cache existed "
        "(the cache plus what a step adds). KV held = the cache's bytes at the end (capacity; QuantizedCache: "
        "quantized storage + scales + full-precision residual). quanto: " + result.get("quanto", "not run") + ".",
        "",
    ]
    headline = ["| row | DynamicCache tok/s | QC fp8 tok/s | INT8 tok/s | FP8 tok/s | INT8 / Dynamic | INT8 / QC fp8 "
                "| GPU ms/step Dynamic → INT8 | peak KV GiB Dynamic → INT8 |", "|" + " --- |" * 9]
    for row in result["rows"]:
        headline.append(
            f"| {_row_label(row)} | {fmt(_get(row, 'dynamic', 'decode_tok_s'), '.1f')} "
            f"| {fmt(_get(row, 'hf_fp8', 'decode_tok_s'), '.1f')} | {fmt(_get(row, 'int8', 'decode_tok_s'), '.1f')} "
            f"| {fmt(_get(row, 'fp8', 'decode_tok_s'), '.1f')} "
            f"| {fmt(_ratio(_get(row, 'int8', 'decode_tok_s'), _get(row, 'dynamic', 'decode_tok_s')))} "
            f"| {fmt(_ratio(_get(row, 'int8', 'decode_tok_s'), _get(row, 'hf_fp8', 'decode_tok_s')))} "
            f"| {fmt(_get(row, 'dynamic', 'gpu_ms_per_step'))} → {fmt(_get(row, 'int8', 'gpu_ms_per_step'))} "
            f"| {fmt(_get(row, 'dynamic', 'peak_decode_kv_bytes'), '.2f', GIB)} → "
            f"{fmt(_get(row, 'int8', 'peak_decode_kv_bytes'), '.2f', GIB)} |")
    if any("dynamic" in row["caches"] or "hf_fp8" in row["caches"] for row in result["rows"]):
        lines += ["## Headline (wall-clock decode, for the README)", "", *headline, ""]
    lines += _compiled_table(result)

    lines += ["## Every row and cache", "",
              "| row | cache | prefill ms | decode tok/s | ms/step wall | GPU ms/step | host gap ms | peak decode GiB "
              "| peak KV GiB | KV held GiB | tok/s vs Dynamic | tok/s vs QC fp8 |", "|" + " --- |" * 12]
    for row in result["rows"]:
        for key, entry in row["caches"].items():
            label = CACHES[key][0]
            if "error" in entry or "skipped" in entry:
                lines.append(f"| {_row_label(row)} | {label} | {_one_line(entry.get('error') or entry['skipped'])} |"
                             + " |" * 9)
                continue
            lines.append(
                f"| {_row_label(row)} | {label} | {fmt(entry['prefill_ms'], '.1f')} "
                f"| {fmt(entry['decode_tok_s'], '.1f')} "
                f"| {fmt(entry['ms_per_step_wall'])} | {fmt(entry['gpu_ms_per_step'])} "
                f"| {fmt(entry['host_gap_ms_per_step'])} | {fmt(entry['peak_decode_bytes'], '.2f', GIB)} "
                f"| {fmt(entry['peak_decode_kv_bytes'], '.3f', GIB)} | {fmt(entry['kv_bytes'], '.3f', GIB)} "
                f"| {fmt(_ratio(entry['decode_tok_s'], _get(row, 'dynamic', 'decode_tok_s')))} "
                f"| {fmt(_ratio(entry['decode_tok_s'], _get(row, 'hf_fp8', 'decode_tok_s')))} |")
    lines.append("")

    if result["search"]:
        enforced = ("under `torch.cuda.set_per_process_memory_fraction`" if result["device"] != "cpu" else
                    "(CPU smoke run: fits = weights + bytes held within the budget)")
        lines += ["## Memory budget", "",
                  "Weights included in the budget; the context is written through each cache's `update` (random keys "
                  f"and values, no prefill), then decoded for {s['search_steps']} steps {enforced}; bisection to "
                  f"1/{s['search_granularity']}.", "",
                  "| model | budget GiB | cache | largest batch at context | × Dynamic | longest context at batch 1 "
                  "| × Dynamic |", "|" + " --- |" * 7]
        for search in result["search"]:
            for key, entry in search["caches"].items():
                note = _one_line(entry.get("error") or entry.get("skipped") or "")
                batch, ctx = entry.get("max_batch"), entry.get("max_context")
                lines.append(
                    f"| {search['model']} | {search['budget_gib']:g} "
                    f"| {CACHES[key][0]}{' (' + note + ')' if note else ''} "
                    f"| {fmt(batch, 'd')}{'+' if entry.get('batch_capped') else ''} at {search['context']} "
                    f"| {fmt(_ratio(batch, _get(search, 'dynamic', 'max_batch')))} "
                    f"| {fmt(ctx, 'd')}{'+' if entry.get('context_capped') else ''} "
                    f"| {fmt(_ratio(ctx, _get(search, 'dynamic', 'max_context')))} |")
        lines.append("")

    checks = targets(result)
    lines += ["## Targets (issue 5)", "", "| target | where | measured | met |", "| --- | --- | --- | --- |"]
    for c in checks:
        if c["value"] is not None:
            lines.append(f"| {c['target']} | {c['where']} | {fmt(c['value'], '.3f')} "
                         f"| {'yes' if c['met'] else '**no**'} |")
    unmeasured = list(dict.fromkeys(c["target"] for c in checks if c["value"] is None))
    if unmeasured:
        lines += ["", "Without data in this run (their caches did not run, or failed): " + "; ".join(unmeasured) + "."]
    lines.append("")

    missed = {c["where"] for c in checks if c["met"] is False and ("tok/s" in c["target"] or "GPU" in c["target"])}
    if missed:
        lines += ["## Where the time goes (rows with a missed time target)", "",
                  "Per decode step, from the profiled steps: the top GPU kernels and the top CPU-side operators "
                  "(self time; Python time of transformers and of the caches is in the host gap, not here).", ""]
    for row in result["rows"]:
        if _row_label(row) not in missed:
            continue
        lines += [f"### {_row_label(row)}", ""]
        for key in ("dynamic", "hf_fp8", "int8"):
            entry = row["caches"].get(key)
            if not entry or "top_kernels" not in entry:
                continue
            lines += [f"**{CACHES[key][0]}**: wall {fmt(entry['ms_per_step_wall'])} ms/step, GPU "
                      f"{fmt(entry['gpu_ms_per_step'])} ms, host gap {fmt(entry['host_gap_ms_per_step'])} ms.", ""]
            for title, top in (("GPU kernel", entry["top_kernels"]), ("CPU operator (self)", entry["top_cpu_ops"])):
                if top:
                    lines += [f"| {title} | ms/step | calls/step |", "| --- | --- | --- |"]
                    lines += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.3f} | {k['calls_per_step']:g} |" for k in top]
                    lines.append("")
    seen = [entry["hf_kvquant_kernels_seen"] for row in result["rows"] for entry in row["caches"].values()
            if "hf_kvquant_kernels_seen" in entry]
    if seen:
        lines += [f"hf_kvquant's Triton attention kernel in the profile of {sum(seen)} of the {len(seen)} INT8/FP8 "
                  "runs (each also checked at warm-up to receive the quantized buffers in every layer).", ""]
    if result.get("skipped"):
        lines += ["Not run: " + "; ".join(f"{CACHES[k][0]}: {why}" for k, why in result["skipped"].items()), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Four panels: decode tokens/s, wall vs GPU ms per step, KV memory, and what fits in the budget."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grouped(groups: int, keys: list[str]):
        """(cache, x of its bar in each group, bar width, colour): bars side by side, one colour per cache."""
        width = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(groups)]
            yield key, xs, width, f"C{list(CACHES).index(key)}"

    rows = [r for r in result["rows"] if r["caches"]]
    keys = [k for k in CACHES if any(k in r["caches"] for r in rows)]
    on_gpu = any(_get(r, k, "peak_decode_kv_bytes") is not None for r in rows for k in keys)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    for key, xs, width, color in grouped(len(rows), keys):
        axes[0].bar(xs, [_get(r, key, "decode_tok_s") or 0 for r in rows], width, label=CACHES[key][0], color=color)
        axes[1].bar(xs, [_get(r, key, "ms_per_step_wall") or 0 for r in rows], width, color=color, alpha=0.45)
        axes[1].bar(xs, [_get(r, key, "gpu_ms_per_step") or 0 for r in rows], width * 0.5, color=color, hatch="//",
                    edgecolor="black", linewidth=0.3)
        field = "peak_decode_kv_bytes" if on_gpu else "kv_bytes"
        axes[2].bar(xs, [(_get(r, key, field) or 0) / GIB for r in rows], width, color=color)
    titles = ("decode tokens/s (wall clock)", "ms per decode step: wall (light), GPU (hatched)",
              "peak decode memory of the KV cache, GiB" if on_gpu else "KV cache held, GiB")
    for ax, title in zip(axes[:3], titles):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)), [_row_label(r) for r in rows], fontsize=8)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)

    searches = [s for s in result["search"] if s["caches"]]
    groups = [(s, f) for s in searches for f in ("max_batch", "max_context")]
    skeys = [k for k in CACHES if any(k in s["caches"] for s in searches)]
    ax = axes[3]
    for key, xs, width, color in grouped(len(groups), skeys):
        values = [_ratio(_get(s, key, f), _get(s, "dynamic", f)) or 0 for s, f in groups]
        for x, value, (s, f) in zip(xs, values, groups):
            ax.bar(x, value, width, color=color)
            ax.annotate(fmt(_get(s, key, f), "d"), (x, value), ha="center", va="bottom", fontsize=7)
    if groups:
        ax.set_xticks(range(len(groups)), [f"{s['shape']}, {s['budget_gib']:g} GiB:\n" + (
            f"batch at {s['context']}" if f == "max_batch" else "context at batch 1") for s, f in groups], fontsize=8)
        ax.axhline(1.8, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title("what fits in the budget, x DynamicCache (labels: absolute)", fontsize=10)
    else:
        ax.axis("off")
    fig.suptitle(f"{result['device']}: {versions_line(result['versions'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save(result: dict, out_dir: Path, with_plot: bool = False, name: str = "bench_generate") -> None:
    result["targets"] = targets(result)
    write_results(out_dir, name, result, markdown(result))
    if with_plot and not plot(result, Path(out_dir) / f"{name}.png"):
        print("matplotlib is not installed: no plot (draw it elsewhere with --replot)")
