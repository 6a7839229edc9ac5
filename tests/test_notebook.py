"""notebooks/explore_quantized_cache.ipynb: it runs top to bottom on CPU (real SmolLM2-135M, WikiText-2) and shows what
it promises; the copy in git keeps its outputs and uses only hf_kvquant's public API.

The execution test runs a copy of the notebook (never writing into notebooks/) in a kernel of the interpreter that runs
pytest, from the notebooks/ folder as a user would, with this checkout first on the kernel's path.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "explore_quantized_cache.ipynb"
PUBLIC_MODULES = {"hf_kvquant", "hf_kvquant.evaluation"}
MODES = ("unquantized", "int8_per_token_head", "fp8_per_token_head")
CELL_TIMEOUT_S = 600


def _skip_unless_ci(reason: str) -> None:
    if os.environ.get("CI"):
        raise RuntimeError(reason)  # CI installs everything: a missing piece is a broken install, not a skip
    pytest.skip(reason)


def _code_cells(nb) -> list:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def _source(cell) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def _text(cell) -> str:
    """A code cell's printed output: streams and plain-text results."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"] if isinstance(output["text"], str) else "".join(output["text"]))
        elif "text/plain" in output.get("data", {}):
            plain = output["data"]["text/plain"]
            parts.append(plain if isinstance(plain, str) else "".join(plain))
    return "".join(parts)


def _images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def _tagged(nb, tag: str):
    cells = [cell for cell in _code_cells(nb) if tag in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one code cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


@pytest.fixture(scope="module")
def saved_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def test_saved_notebook_keeps_its_outputs(saved_notebook):
    """The version in git reads well on its own: executed top to bottom, no errors, its figures included."""
    cells = _code_cells(saved_notebook)
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"not executed once top to bottom: execution counts {counts}"
    errors = [o for cell in cells for o in cell.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"saved with errors: {[e['ename'] + ': ' + e['evalue'] for e in errors]}"
    assert sum(_images(cell) for cell in cells) >= 6
    for tag in ("generation", "memory-ratio", "perplexity-table"):
        assert _text(_tagged(saved_notebook, tag)).strip(), f"the cell tagged {tag!r} was saved without output"


def test_notebook_uses_the_public_api_only(saved_notebook):
    for cell in _code_cells(saved_notebook):
        tree = ast.parse(_source(cell))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules, names = [alias.name for alias in node.names], []
            elif isinstance(node, ast.ImportFrom):
                modules, names = [node.module or ""], [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hf_kvquant":
                assert not node.attr.startswith("_"), f"private attribute hf_kvquant.{node.attr}"
                continue
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("tests", "conftest"), f"the notebook imports {module}"
                if module.split(".")[0] == "hf_kvquant":
                    assert module in PUBLIC_MODULES, f"the notebook imports {module}, not a public module"
                    public = importlib.import_module(module).__all__
                    assert all(name in public for name in names), f"{names} from {module}: not all in its __all__"


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch, wikitext):
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        _skip_unless_ci(f"executing the notebook needs nbclient, nbformat and ipykernel (the dev extra): {e}")
    from hf_kvquant.evaluation import resolve_model

    try:
        resolve_model("smollm2")
    except FileNotFoundError as e:
        _skip_unless_ci(str(e))

    # The kernel is this interpreter (a kernel spec of that name found first on JUPYTER_PATH), importing this checkout.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into outputs

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # run from notebooks/, as a user would
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    finally:
        nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed copy, to look at after a failure

    cells = _code_cells(nb)
    assert all(cell.get("execution_count") for cell in cells)
    everything = "".join(_text(cell) for cell in cells)

    generation = _text(_tagged(nb, "generation"))
    for name in ("DynamicCache (default)", "INT8 per token-head", "FP8 per token-head"):
        text = re.search(rf"^--- {re.escape(name)}\n(.*)$", generation, re.M)
        assert text and text.group(1).strip(), f"no generated text for {name}"

    memory = _tagged(nb, "memory-ratio")
    ratio = re.search(r"INT8 / bf16 at 4096 tokens: ([0-9.]+)", _text(memory))
    assert ratio, "memory ratio not printed"
    assert 0.5 < float(ratio.group(1)) < 0.6
    assert "INT8 and FP8 hold the same bytes: True" in _text(memory)
    assert _images(memory) == 1

    # What the error section states about the cache must hold.
    assert "update returned exactly what it stores (int8 × scale): True" in everything
    assert "= bytes of the random fill in section 2: True" in everything
    assert "FP8 scales = INT8 scales × 127/448: True" in everything

    table = _tagged(nb, "perplexity-table")
    rows = re.findall(r"^\| (\S+) +\| +(\d+) \| +([0-9.]+) \|", _text(table), re.M)
    assert [mode for mode, _, _ in rows] == list(MODES), rows
    ppl = {mode: float(value) for mode, _, value in rows}
    assert all(math.isfinite(p) and p > 1 for p in ppl.values()), ppl
    for mode in MODES[1:]:
        assert ppl[mode] / ppl["unquantized"] < 1.05, ppl
    assert _images(table) == 1

    assert sum(_images(cell) for cell in cells) >= 6
