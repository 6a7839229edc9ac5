"""Tensor parallelism (transformers' tp_plan="auto") with the quantized cache: each of 2 ranks quantizes and attends
over its own KV heads, and the result matches one process. Always on 2 CPU processes over gloo; where 2 CUDA devices
are visible, also on cuda:0 and cuda:1 over NCCL against one process on cuda:0, so both sides run the Triton kernels.

Each rank also generates over a preallocated cache with the decode step compiled by `generate` (fullgraph) and
without: the tokens must be equal.

The float32 variants assert everything: teacher-forced next-token KL <= 5e-3 at every position, the 16 greedy tokens
equal, each rank holding its half of the KV heads and of the bytes. The bfloat16 variant asserts the same but the
greedy tokens, which it only records: this tiny model's logits come out of a bfloat16 lm_head, so exact top-1 ties
(measured on CPU) make the first greedy token that differs a matter of rounding, not of the cache.

With HF_KVQUANT_TP_RESULTS=DIR set, the figures of every case are (re)written to DIR/tensor_parallel_match.json before
its assertions run; `pytest -s` prints them too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_kvquant
from hf_kvquant import KVQuantMode

sys.path.insert(0, str(Path(__file__).parent))
from tp_worker import teacher_forced_and_greedy  # noqa: E402

KL_LIMIT = 5e-3
WORLD_SIZE = 2
RESULTS_ENV = "HF_KVQUANT_TP_RESULTS"
# (device, dtype, whether the greedy tokens must be equal)
VARIANTS = {
    "cpu-float32": ("cpu", "float32", True),
    "cuda-float32": ("cuda", "float32", True),
    "cuda-bfloat16": ("cuda", "bfloat16", False),
}
_figures: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    # Large initial weights give a peaked, varied next-token distribution, so greedy tokens mean something.
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("tp_model")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, model_dir, tmp_path_factory):
    """One torchrun of 2 ranks for all modes, and the single-process model on the same kind of device."""
    device, dtype, greedy_must_match = VARIANTS[request.param]
    if device == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} CUDA devices")
    out = tmp_path_factory.mktemp(request.param) / "rank0.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD_SIZE),
               str(Path(__file__).parent / "tp_worker.py"), str(model_dir), dtype, str(out)]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # tp_plan="auto" takes the accelerator (and NCCL) whenever it sees one
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = json.loads(out.read_text())
    single = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation=hf_kvquant.ATTENTION_NAME,
                                              dtype=getattr(torch, dtype)).to(device).eval()
    return request.param, parallel, single, greedy_must_match


def _record(name: str, figures: dict) -> None:
    _figures[name] = figures
    print(f"\n{name}: {json.dumps(figures)}")
    if directory := os.environ.get(RESULTS_ENV):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tensor_parallel_match.json").write_text(json.dumps(_figures, indent=2) + "\n")


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_two_ranks_match_one_process(variant, mode):
    name, parallel_run, model, greedy_must_match = variant
    parallel = parallel_run["modes"][mode.value]
    single = teacher_forced_and_greedy(model, mode)
    device = model.device.type

    p, q = torch.tensor(single["logprobs"]), torch.tensor(parallel["logprobs"])
    kl = (p.exp() * (p - q)).sum(-1)
    same = [a == b for a, b in zip(single["greedy"], parallel["greedy"])]
    _record(f"{name}/{mode.value}", {
        "backend": parallel_run["backend"], "world_size": parallel_run["world_size"],
        "max_kl": kl.max().item(), "mean_kl": kl.mean().item(), "positions": len(kl),
        "greedy_equal": all(same), "greedy_equal_prefix": same.index(False) if not all(same) else len(same),
        "greedy_single": single["greedy"], "greedy_parallel": parallel["greedy"],
        "single_nbytes": single["nbytes"], "single_kv_heads": single["kv_heads"],
        "per_rank": parallel["per_rank"], "single_cache_device": single["cache_device"],
    })

    assert parallel_run["backend"] == ("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        # Each rank's cache lives on its own GPU, the single-process one on cuda:0.
        assert [r["cache_device"] for r in parallel["per_rank"]] == [f"cuda:{i}" for i in range(WORLD_SIZE)]
        assert single["cache_device"] == "cuda:0"
    assert kl.max().item() <= KL_LIMIT, kl.max().item()
    if greedy_must_match:
        assert parallel["greedy"] == single["greedy"]
    assert len(set(single["greedy"])) > 1  # not a degenerate repetition
    # Each rank holds its own half of the KV heads, and half the bytes.
    assert [r["kv_heads"] for r in parallel["per_rank"]] == [2, 2] and single["kv_heads"] == 4
    for rank in parallel["per_rank"]:
        assert rank["nbytes"] == pytest.approx(single["nbytes"] / 2, rel=0.01)
    # The compiled decode under tensor parallelism: generate compiles it (fullgraph, no graph break) and its greedy
    # tokens are the eager ones over the same kind of preallocated cache.
    preallocated = parallel["preallocated"]
    assert preallocated["graphs"] >= 1
    assert preallocated["compiled"] == preallocated["eager"]
