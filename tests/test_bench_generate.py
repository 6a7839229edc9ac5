"""eval/bench_generate.py, the end-to-end generation benchmark, through its CPU smoke path (``--device cpu --tiny``):
the same code as the GPU run on a 2-layer model, one short row, every eager cache, and the memory-budget search; the
compiled caches (``--compiled``, dynamo's trace with the eager backend: fast on CPU); and its parts
(eval/lib/: the models, caches, decode loop and budget search) where a test needs them directly.

The GPU figures themselves come from running the script on an H100 (see `eval/results/bench_generate.md`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch

from hf_kvquant import ATTENTION_NAME, QuantizedPerTokenHeadCache

import bench_generate
from lib import caches, decoding, generate_budget, models

HAS_QUANTO = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
BATCH, PROMPT, STEPS, REPEATS, WARMUP_STEPS, MATCH_STEPS = 2, 256, 2, 2, 2, 4
SEARCH_CONTEXT = 128


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(result, out_dir) of one smoke run."""
    out = tmp_path_factory.mktemp("bench_generate")
    result = bench_generate.main([
        "--device", "cpu", "--tiny", "--rows", f"tiny:{BATCH}x{PROMPT}", "--steps", str(STEPS),
        "--repeats", str(REPEATS), "--warmup-steps", str(WARMUP_STEPS), "--search-context", str(SEARCH_CONTEXT),
        "--search-granularity", "4", "--no-progress", "--out-dir", str(out),
    ])
    return result, out


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_cache_runs_and_reports_positive_finite_numbers(run):
    result, _ = run
    assert result["complete"]
    (row,) = result["rows"]
    assert (row["shape"], row["batch"], row["prompt"]) == ("tiny", BATCH, PROMPT)
    expected = [key for key in caches.EAGER_CACHES if HAS_QUANTO or key != "hf_quanto_int4"]  # the default
    assert list(row["caches"]) == expected
    for key, entry in row["caches"].items():
        assert "error" not in entry, (key, entry.get("error"))
        for field in ("prefill_ms", "decode_tok_s", "ms_per_step_wall", "kv_bytes"):
            assert _positive(entry[field]), (key, field, entry[field])
        assert len(entry["ms_per_step_wall_all"]) == REPEATS
        assert entry["decode_tok_s"] == pytest.approx(BATCH / (entry["ms_per_step_wall"] / 1e3))
        # The loop ran exactly the steps it says: prompt, warm-up steps, timed steps (the profiled ones come after).
        assert entry["kv_tokens"] == PROMPT + WARMUP_STEPS + STEPS * REPEATS
        assert entry["gpu_ms_per_step"] is None and entry["peak_decode_kv_bytes"] is None  # no GPU here
        assert entry["top_cpu_ops"], key  # the profiler ran and was parsed


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """(result, out_dir) of the compiled preset on the tiny model: dynamo's whole trace (backend eager, fast on CPU),
    every compiled cache against eager INT8, one row."""
    out = tmp_path_factory.mktemp("bench_generate_compiled")
    result = bench_generate.main([
        "--device", "cpu", "--tiny", "--compiled", "--rows", f"tiny:{BATCH}x{PROMPT}", "--steps", str(STEPS),
        "--repeats", str(REPEATS), "--warmup-steps", str(WARMUP_STEPS), "--match-steps", str(MATCH_STEPS),
        "--compile-backend", "eager", "--no-progress", "--out-dir", str(out), "--name", "compiled",
    ])
    return result, out


def test_compiled_caches_run_compile_once_and_match_eager(compiled_run):
    result, out = compiled_run
    assert result["complete"] and not result["search"]
    assert result["settings"]["compile_backend"] == "eager" and result["settings"]["compile_mode"] is None
    assert _positive(result["compile_prewarm_s"])
    (row,) = result["rows"]
    assert list(row["caches"]) == ["static_compiled", "int8_compiled", "fp8_compiled", "int8"]
    for key, entry in row["caches"].items():
        assert "error" not in entry, (key, entry.get("error"))
        for field in ("prefill_ms", "decode_tok_s", "ms_per_step_wall", "kv_bytes"):
            assert _positive(entry[field]), (key, field, entry[field])
        assert entry["kv_tokens"] == PROMPT + WARMUP_STEPS + STEPS * REPEATS  # the compiled step is a warm-up step
        if key == "int8":
            assert "compile_s" not in entry and "tokens_match_eager" not in entry
            continue
        assert _positive(entry["compile_s"]) and entry["compile_warmup_s"] >= 0
        assert entry["graphs_compiled"] == 1, (key, entry["graphs_compiled"])  # no recompilation in any step
        assert entry["max_cache_len"] == PROMPT + WARMUP_STEPS + STEPS * REPEATS + 2 + MATCH_STEPS  # tiny: 2 profiled
        assert entry["tokens_match_eager"] is True and entry["tokens_matched_steps"] == MATCH_STEPS, key
        assert entry["tokens_agreement"] == 1.0 and entry["max_logit_gap"] == 0.0, key
        assert entry["median_top2_margin"] >= 0
    caches = row["caches"]
    assert caches["int8_compiled"]["kv_bytes"] < 0.6 * caches["static_compiled"]["kv_bytes"]  # same slots, 1 byte
    assert caches["int8_compiled"]["kv_bytes"] == caches["fp8_compiled"]["kv_bytes"]
    text = (out / "compiled.md").read_text()
    assert "## Compiled decoding vs StaticCache + compile" in text and "| tiny 2x256 |" in text
    assert "## Headline" not in text  # no eager baseline ran
    assert any(t["target"].startswith("compile s INT8 compiled") and t["met"] is not None for t in result["targets"])


def test_compiled_run_merges_with_another(compiled_run, run):
    """Two invocations (e.g. the 1B rows and the 8B rows) are merged into one report by --replot --merge."""
    (_, compiled_out), (eager, eager_out) = compiled_run, run
    (compiled_out / "eager.json").write_text((eager_out / "bench_generate.json").read_text())
    merged = bench_generate.main(["--replot", "--out-dir", str(compiled_out), "--merge", "compiled,eager",
                                  "--name", "merged"])
    assert len(merged["rows"]) == 2 and merged["search"] == eager["search"]
    text = (compiled_out / "merged.md").read_text()
    assert "## Headline" in text and "## Compiled decoding" in text and "## Memory budget" in text


def test_quantized_caches_hold_fewer_bytes_than_dynamic_cache(run):
    caches = run[0]["rows"][0]["caches"]
    dynamic = caches["dynamic"]["kv_bytes"]
    for key in ("hf_fp8", "int8", "fp8") + (("hf_quanto_int4",) if HAS_QUANTO else ()):
        assert caches[key]["kv_bytes"] < dynamic, key
    # INT8 per token-head: 1 byte + 4/64 of a scale per value against 2, plus buffer slack at this short length.
    assert caches["int8"]["kv_bytes"] < 0.7 * dynamic


def test_quanto_int4_cache(run):
    if not HAS_QUANTO:
        assert "optimum-quanto" in run[0]["skipped"]["hf_quanto_int4"]
        pytest.skip("optimum-quanto is not installed: the benchmark skips its QuantizedCache and says so")
    entry = run[0]["rows"][0]["caches"]["hf_quanto_int4"]
    assert entry["kv_bytes"] < 0.4 * run[0]["rows"][0]["caches"]["dynamic"]["kv_bytes"]  # 4 bits + the residual
    assert "plain-PyTorch unpack" in run[0]["quanto"]  # nothing was JIT-compiled


def test_budget_search_finds_more_room_for_the_quantized_caches(run):
    (search,) = run[0]["search"]
    assert search["context"] == SEARCH_CONTEXT and list(search["caches"]) == list(generate_budget.SEARCH_CACHES)
    for key, entry in search["caches"].items():
        assert "error" not in entry, (key, entry.get("error"))
        for field in ("max_batch", "max_context"):
            answer, attempts = entry[field], entry[field.replace("max", "").strip("_") + "_attempts"]
            assert answer >= 1
            assert [answer, True] in attempts and any(n > answer and not ok for n, ok in attempts)
            assert all(ok for n, ok in attempts if n <= answer), (key, field, attempts)
    dynamic, int8 = search["caches"]["dynamic"], search["caches"]["int8"]
    assert int8["max_batch"] > dynamic["max_batch"] and int8["max_context"] > dynamic["max_context"]


def test_files_are_written(run):
    result, out = run
    saved = json.loads((out / "bench_generate.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["targets"] and all({"target", "where", "value", "met"} <= set(t) for t in saved["targets"])
    text = (out / "bench_generate.md").read_text()
    assert "## Headline" in text and "## Memory budget" in text and "## Targets" in text
    for key in result["rows"][0]["caches"]:
        assert f"| {caches.CACHES[key][0]} |" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench_generate.png").stat().st_size > 10_000


def test_replot_rewrites_the_outputs_from_the_json(run):
    _, out = run
    (out / "bench_generate.md").unlink()
    bench_generate.main(["--replot", "--out-dir", str(out)])
    assert "## Headline" in (out / "bench_generate.md").read_text()


def test_largest_fitting_doubles_then_bisects():
    class Counter:
        def update(self):
            pass

    answer, attempts, capped = generate_budget.largest_fitting(lambda n: n <= 37, 1, 1, 1000, 1 << 20, Counter())
    assert (answer, capped) == (37, False)
    assert [n for n, _ in attempts][:7] == [1, 2, 4, 8, 16, 32, 64]
    answer, _, capped = generate_budget.largest_fitting(lambda n: n <= 3000, 256, 256, 1000, 1 << 20, Counter())
    assert (answer, capped) == (2816, False)  # the largest multiple of the quantum that fits
    answer, _, capped = generate_budget.largest_fitting(lambda n: True, 1, 1, 32, 100, Counter())
    assert (answer, capped) == (100, True)
    assert generate_budget.largest_fitting(lambda n: False, 1, 1, 32, 100, Counter())[0] == 0


def test_a_silent_fallback_is_caught():
    """A hf_kvquant cache built without the model's config hands attention dequantized tensors: the call counter the
    benchmark checks at warm-up sees it."""
    model = models.build_model(models.SHAPES["tiny"], torch.device("cpu"), torch.float32)
    model.set_attn_implementation(ATTENTION_NAME)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with torch.inference_mode():
        with caches.count_hf_kvquant_calls() as calls:
            decoding.prefill(model, QuantizedPerTokenHeadCache(mode="int8_per_token_head"), ids)
        assert calls == {"calls": 2, "quantized": 0}
        with caches.count_hf_kvquant_calls() as calls:
            decoding.prefill(model, caches.build_cache("int8", model), ids)
        assert calls == {"calls": 2, "quantized": 2}


def test_cache_names_are_the_baselines_keys_and_the_mode_vocabulary():
    keys = caches.cache_keys("hf_fp8, unquantized,int8_per_token_head,int8,fp8,none")
    assert keys == ["hf_fp8", "dynamic", "int8", "fp8"]  # each once, in the order given
    for bad in ("int8+hadamard", "int4", "dynamic_fp8"):
        with pytest.raises(ValueError, match=re.escape(f"unknown cache '{bad}'") + ".*int8_per_token_head"):
            caches.cache_keys(bad)
    with pytest.raises(ValueError, match="unknown cache 'hf_fp8'"):  # a cache not offered there
        caches.cache_keys("hf_fp8", {"dynamic": None})
    with pytest.raises(SystemExit, match="unknown cache 'int4'"):
        bench_generate.parse_args(["--caches", "int8,int4"])
