"""What a soak run shows (eval/soak.py's markdown, written beside its JSON): the checks passed or failed, then the
figures and a sample of the chunks of (a) the long sequence and of the calls of (b) the many generate calls."""

from __future__ import annotations

from lib.environment import versions_line
from lib.generate_report import fmt

MIB = 1 << 20


def _verdict(value) -> str:
    return {True: "pass", False: "**FAIL**", None: "–"}[value]


def _mib(value) -> str:
    return fmt(value, ".1f", MIB)


def _table(header: list[str], align: list[str], rows) -> list[str]:
    """A markdown table, then a blank line."""
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |",
            *(f"| {' | '.join(str(v) for v in row)} |" for row in rows), ""]


def _every(items: list, most: int) -> list:
    """At most about ``most`` of ``items``, evenly spaced, the last one included."""
    step = max(1, len(items) // most)
    return [(i, item) for i, item in enumerate(items) if i % step == 0 or i == len(items) - 1]


def markdown(result: dict) -> str:
    s = result["settings"]
    memory_tolerance = f"{s['memory_tolerance_mib']:g} MiB"
    lines = [f"# Soak: {s['model']}, {s['mode']}, {s['dtype']}", "",
             f"{result['device']}; {versions_line(result['versions'])}", "",
             (f"Compiled with backend {s['compile_backend']}, mode {s['compile_mode']}. Elapsed "
              f"{result['elapsed_s']:.0f} s; complete: {result['complete']}."), ""]
    long, calls = result.get("long"), result.get("calls")
    checks = []
    if long:
        checks += [(f"(a) memory allocated flat over the chunks (within {memory_tolerance})",
                    _verdict(long.get("memory_flat"))),
                   (f"(a) ms/step within {s['time_tolerance']:.0%} of a line in the context length",
                    _verdict(long.get("step_time_flat")))]
    if calls:
        checks += [(f"(b) memory allocated after each call within {memory_tolerance} of the first's",
                    _verdict(calls.get("memory_flat"))),
                   ("(b) every call's tokens equal a fresh cache's", _verdict(calls.get("outputs_equal")))]
    lines += _table(["check", "result"], ["---", "---"], checks)
    if long:
        fit = long.get("fit", {})
        lines += [(f"## (a) one sequence of {long.get('tokens', 0)} tokens (target {long['target_tokens']}, prompt "
                   f"{long['prompt']}), batch 1"), ""]
        lines += _table(["figure", "value"], ["---", "---:"], [
            ("compile (the first step), s", fmt(long.get("compile_s"), ".1f")),
            ("cache, MiB", _mib(long.get("cache_nbytes"))),
            ("allocated after the prefill, MiB", _mib(long.get("allocated_after_prefill"))),
            ("allocated after each chunk but the first, MiB: least / most",
             f"{_mib(long.get('allocated_min'))} / {_mib(long.get('allocated_max'))}"),
            ("ms/step, first measured / last chunk",
             f"{fmt(long.get('ms_per_step_first_chunk'), '.3f')} / {fmt(long.get('ms_per_step_last_chunk'), '.3f')}"),
            ("fit: ms/step at no context + per 1k tokens of context",
             f"{fmt(fit.get('ms_at_zero'), '.3f')} + {fmt(fit.get('ms_per_1k_tokens'), '.4f')}"),
            ("the growth as a read of the cache, GB/s", fmt(fit.get("growth_gb_per_s"), ".0f")),
            ("largest deviation of a chunk from the line", fmt(fit.get("max_relative_deviation"), ".1%")),
            ("graphs compiled after the first step", long.get("graphs_compiled_after_first_step", "–")),
        ])
        lines += _table(["context", "ms/step", "allocated MiB"], ["---:"] * 3, [
            (c["context"], f"{c['ms_per_step']:.3f}", _mib(c["allocated"])) for _, c in _every(long["chunks"], 32)])
    if calls:
        done = calls["calls"]
        lines += [f"## (b) {len(done)} generate calls (target {calls['target_calls']}) reusing one cache", "",
                  (f"Prompts of {calls['prompts']} tokens in turn, {calls['new_tokens']} new tokens each, "
                   f"max_cache_len {calls['max_cache_len']}."), ""]
        lines += _table(["figure", "value"], ["---", "---:"], [
            ("allocated after the first call, MiB", _mib(calls.get("allocated_after_first"))),
            ("allocated after the others, most, MiB", _mib(calls.get("allocated_max_after"))),
            ("calls whose tokens equal a fresh cache's", f"{calls.get('calls_equal_to_fresh')} of {len(done)}"),
            ("graphs compiled / after the first call",
             f"{calls.get('graphs_compiled', '–')} / {calls.get('graphs_compiled_after_first_call', '–')}"),
        ])
        lines += _table(["call", "prompt", "s", "allocated MiB", "= fresh"], ["---:"] * 4 + ["---"], [
            (i + 1, c["prompt"], f"{c['seconds']:.3f}", _mib(c["allocated"]), c["equal_to_fresh"])
            for i, c in _every(done, 20)])
    return "\n".join(lines)
