"""The package as a user installs it: the public API it declares, and a CPU machine without Triton (macOS, Windows,
CPU-only images), where `hf_kvquant` must import and generate through its plain-PyTorch path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_kvquant

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter where `import triton` raises ImportError, as where Triton is not installed.
WITHOUT_TRITON = r"""
import json, sys
sys.modules["triton"] = None
import hf_kvquant
from hf_kvquant.evaluation import load_model
model, tok = load_model("smollm2")
cache = hf_kvquant.QuantizedPerTokenHeadCache(config=model.config, mode="int8")
inputs = tok(sys.argv[1], return_tensors="pt")
out = model.generate(**inputs, cache=cache, max_new_tokens=12, do_sample=False)
print(json.dumps({"tokens": out[0].tolist(), "nbytes": cache.nbytes, "triton": sys.modules["triton"] is not None}))
"""
PROMPT = "The history of the printing press begins in"


def test_public_api_is_declared_importable_and_documented():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in hf_kvquant.__all__:
        assert getattr(hf_kvquant, name) is not None
        assert f"`{name}`" in readme, f"{name} is public but the README does not document it"
    import hf_kvquant.evaluation as evaluation

    for name in evaluation.__all__:
        assert getattr(evaluation, name) is not None


@pytest.mark.slow
def test_imports_and_generates_without_triton(smollm2):
    """Greedy tokens in a process that cannot import Triton equal this process's (both on the CPU reference path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, PROMPT], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["triton"] is False

    model, tok = smollm2
    cache = hf_kvquant.QuantizedPerTokenHeadCache(config=model.config, mode="int8")
    with torch.no_grad():
        expected = model.generate(**tok(PROMPT, return_tensors="pt"), cache=cache, max_new_tokens=12, do_sample=False)
    assert result["tokens"] == expected[0].tolist()
    assert result["nbytes"] == cache.nbytes > 0
