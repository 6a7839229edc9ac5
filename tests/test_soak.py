"""eval/soak.py, the GPU soak, through its CPU smoke path (``--tiny``: the 2-layer model, a short sequence compiled with
dynamo's eager backend, a few generate calls): the same code as the GPU run end to end, its deadline, and its checks
on made-up measurements. The GPU figures come from running the script on an H200.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import soak
from lib.models import SHAPES

TOKENS, PROMPT, CHUNK, CALLS = 192, 32, 32, 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(result, out_dir) of one tiny run."""
    out = tmp_path_factory.mktemp("soak")
    result = soak.main(["--tiny", "--tokens", str(TOKENS), "--prompt", str(PROMPT), "--chunk", str(CHUNK),
                        "--calls", str(CALLS), "--out-dir", str(out)])
    return result, out


def test_tiny_run_goes_end_to_end_and_writes_its_results(run):
    result, out = run
    assert result["complete"]
    assert json.loads((out / "soak.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "soak.md").read_text()
    assert "## (a) one sequence of 192 tokens" in md and "## (b) 6 generate calls" in md
    assert result["device"] == "cpu" and "torch" in result["versions"]
    long = result["long"]
    assert long["tokens"] == TOKENS
    # the compile step writes token PROMPT + 1; the chunks cover the rest, CHUNK steps each
    steps = [c["steps"] for c in long["chunks"]]
    assert sum(steps) == TOKENS - PROMPT - 1 and max(steps) == CHUNK
    assert [c["context"] for c in long["chunks"]][-1] == TOKENS
    assert all(c["ms_per_step"] > 0 for c in long["chunks"])
    assert long["graphs_compiled_after_first_step"] == 0  # one graph serves every step
    assert set(long["fit"]) >= {"ms_at_zero", "ms_per_1k_tokens", "max_relative_deviation"}
    assert long["memory_flat"] is None  # no allocator figures on the CPU: not judged, not passed
    calls = result["calls"]
    assert len(calls["calls"]) == CALLS and calls["complete"]
    assert [c["prompt"] for c in calls["calls"]] == [24, 8] * 3
    assert calls["outputs_equal"] and calls["calls_equal_to_fresh"] == CALLS
    assert calls["graphs_compiled"] >= 1 and calls["graphs_compiled_after_first_call"] == 0  # generate compiled, once


def test_deadline_stops_cleanly_and_writes_what_ran(tmp_path):
    result = soak.main(["--tiny", "--calls", "2", "--deadline-s", "1e-6", "--out-dir", str(tmp_path)])
    assert not result["complete"]
    assert result["long"]["stopped"] == "deadline" and result["long"]["chunks"] == []
    assert result["calls"]["stopped"] == "deadline" and result["calls"]["calls"] == []
    assert json.loads((tmp_path / "soak.json").read_text())["complete"] is False


def _chunks(ms, allocated=None):
    return [{"context": 1024 * (i + 1), "steps": 1024, "ms_per_step": v,
             "allocated": None if allocated is None else allocated[i]} for i, v in enumerate(ms)]


def _judge(chunks, memory_tolerance_mib=1.0, time_tolerance=0.1):
    part = {"chunks": chunks}
    args = SimpleNamespace(memory_tolerance_mib=memory_tolerance_mib, time_tolerance=time_tolerance)
    soak.judge_long(part, args, SimpleNamespace(**SHAPES["1b"].config))
    return part


def test_step_time_check_allows_linear_growth_and_catches_spikes_and_drift():
    linear = [1.8 + 0.006 * i for i in range(64)]  # attention reading more context: on a line
    part = _judge(_chunks([5.0] + linear))  # the first chunk (graph recording) is not judged
    assert part["step_time_flat"] and part["fit"]["max_relative_deviation"] < 1e-9
    assert part["fit"]["ms_per_1k_tokens"] == pytest.approx(0.006)
    # 16 layers x 8 KV heads x (64 + 4) bytes x keys and values per token, read in 0.006 ms per 1024 tokens
    assert part["fit"]["growth_gb_per_s"] == pytest.approx(17408 * 1024 / 0.006e-3 / 1e9)
    spiked = list(linear)
    spiked[40] *= 1.2
    assert not _judge(_chunks([5.0] + spiked))["step_time_flat"]
    curved = [1.8 + 0.0005 * i * i for i in range(64)]  # a growth that accelerates (to 3.8 ms): not a line
    assert not _judge(_chunks([5.0] + curved))["step_time_flat"]
    assert _judge(_chunks([5.0, 1.8]))["step_time_flat"] is None  # too few chunks to judge


def test_memory_check_uses_the_tolerance():
    mib = 1 << 20
    ms = [2.0] * 5
    assert _judge(_chunks(ms, [9 * mib, 5 * mib, 5 * mib + 100, 5 * mib, 5 * mib]))["memory_flat"]
    assert not _judge(_chunks(ms, [5 * mib, 5 * mib, 7 * mib, 5 * mib, 5 * mib]))["memory_flat"]


def test_results_go_to_a_fresh_temporary_folder_unless_told():
    args = soak.parse_args(["--tiny"])
    assert Path(tempfile.gettempdir()) in args.out_dir.parents and not args.out_dir.exists()
    with pytest.raises(SystemExit):
        soak.parse_args(["--mode", "int4"])
    with pytest.raises(SystemExit):
        soak.parse_args(["--tokens", "16", "--prompt", "16"])
