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


def _imports(path: Path, module: str, is_package: bool) -> set[str]:
    """The hf_kvquant modules ``module`` imports anywhere in its source (deferred imports inside functions included,
    ``if TYPE_CHECKING:`` blocks left out: they never run)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # drop the bodies of `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import ops` imports a module
    return {name for name in found if name.split(".")[0] == "hf_kvquant"}


def test_no_import_cycles():
    """No module of hf_kvquant imports, directly or through others, a module that imports it back (deferred imports
    inside functions count). A package's own ``__init__`` importing its submodules is its job, not a cycle."""
    root = REPO / "hf_kvquant"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        edges = {m for m in _imports(path, name, is_package) if m in modules and m != name}
        if is_package:  # the package's own submodules
            edges = {m for m in edges if not m.startswith(name + ".")}
        graph[name] = {m for m in edges if not name.startswith(m + ".")}  # a submodule's own packages: loaded first

    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
