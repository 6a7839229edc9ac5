"""A command whose extra is not installed stops with one line naming the extra (`hf_kvquant.evaluation.extras`)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import hf_kvquant.__main__ as cli
from hf_kvquant.evaluation import extras, load_text

REPO = Path(__file__).resolve().parents[1]
# Run a module as `python -m` would, with some top-level packages made unimportable.
BLOCKED_RUN = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _run_blocked(blocked: str, module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, blocked, module, *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=False)


def _without(monkeypatch, module: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))


def test_the_main_job_without_gguf_names_the_demo_extra(monkeypatch, capsys, tmp_path):
    _without(monkeypatch, "gguf")
    (tmp_path / "model.gguf").write_bytes(b"")
    assert cli.main(["--model", str(tmp_path / "model.gguf"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs gguf" in err[0] and 'pip install -e ".[demo]"' in err[0], err


def test_hub_text_without_datasets_names_the_eval_extra(monkeypatch):
    _without(monkeypatch, "datasets")
    with pytest.raises(extras.MissingExtraError, match=r'needs datasets, .*`eval` extra installs: pip install -e "\.\[eval\]"'):
        load_text("hf:Salesforce/wikitext:wikitext-2-raw-v1:test")


def test_lm_eval_command_without_lm_eval_is_one_line():
    proc = _run_blocked("lm_eval", "hf_kvquant.evaluation.lm_eval_model", "--help")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf_kvquant.evaluation.lm_eval_model needs lm-eval"), lines
    assert 'pip install -e ".[eval]"' in lines[0]


def test_importing_lm_eval_model_without_lm_eval_raises_the_same_message(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval...` then fails as if not installed
    monkeypatch.delitem(sys.modules, "hf_kvquant.evaluation.lm_eval_model", raising=False)
    with pytest.raises(extras.MissingExtraError, match=r"^hf_kvquant\.evaluation\.lm_eval_model needs lm-eval, .*"
                                                       r'`eval` extra installs: pip install -e "\.\[eval\]"'):
        importlib.import_module("hf_kvquant.evaluation.lm_eval_model")
