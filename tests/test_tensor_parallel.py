"""Tensor parallelism (transformers' tp_plan="auto") with the quantized cache, 2 CPU processes over gloo: each rank
quantizes and attends over its own KV heads, and the result matches one process. (On GPUs the same code runs
over NCCL.)"""

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    # Large initial weights give a peaked, varied next-token distribution, so greedy tokens mean something.
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("tp_model")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_two_ranks_match_one_process(model_dir, tmp_path, mode):
    out = tmp_path / "rank0.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).parent / "tp_worker.py"), str(model_dir), mode.value, str(out)]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = json.loads(out.read_text())

    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation=hf_kvquant.ATTENTION_NAME).eval()
    single = teacher_forced_and_greedy(model, mode)

    p, q = torch.tensor(single["logprobs"]), torch.tensor(parallel["logprobs"])
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max().item() <= 5e-3, kl.max().item()
    assert parallel["greedy"] == single["greedy"]
    assert len(set(single["greedy"])) > 1  # not a degenerate repetition
    # Each rank holds its own half of the KV heads, and half the bytes.
    assert [r["kv_heads"] for r in parallel["per_rank"]] == [2, 2] and single["kv_heads"] == 4
    for rank in parallel["per_rank"]:
        assert rank["nbytes"] == pytest.approx(single["nbytes"] / 2, rel=0.01)
