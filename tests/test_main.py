"""The main job's command line, ``python -m hf_kvquant`` (`hf_kvquant.__main__.main`).

Every mistake in the arguments is one ``error:`` line on stderr and exit status 2, found before the model's weights are
loaded (the tests make loading them fail). The runs use a tiny random Llama written to a temporary folder (2 layers,
head_dim 64, its own word-level tokenizer), so they take a second or two; one slow test runs the real SmolLM2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_kvquant.__main__ as cli
from hf_kvquant import ATTENTION_NAME
from hf_kvquant.evaluation import ACCEPTED_MODES

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of a to and in is was for on that by with as at from it an be this which or are".split()
PROMPT = "the history of the press is a history of the book"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A folder holding a tiny random Llama and a word-level tokenizer (no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights fails the test: the errors must come before."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the error")

    monkeypatch.setattr(cli, "load_model", load_model)


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory: a run that stops on an error must leave it empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""  # no half-printed table
    return lines[0]


def _run(capsys, argv) -> str:
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


# -- errors at the door ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1; got 0"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens must be at least 1; got -5"]),
    (["--max-new-tokens", "x"], ["--max-new-tokens", "invalid int value: 'x'"]),
    (["--max-cache-len", "0"], ["--max-cache-len must be", "got 0"]),
    (["--mode", "int4"], ["--mode: unknown mode 'int4'", *map(repr, ACCEPTED_MODES)]),
    (["--mode", "int8,int4"], ["unknown mode 'int4'"]),
    (["--mode", "int8+hadamard"], ["unknown mode 'int8+hadamard'"]),  # the rotation is the --hadamard switch
    (["--mode", "unquantized", "--hadamard"], ["--hadamard", "add int8 or fp8"]),
    (["--dtype", "half"], ["--dtype", "invalid choice: 'half'"]),
    (["--attention", "flash"], ["--attention", "invalid choice: 'flash'"]),
    (["--device", "toaster"], ["--device 'toaster' is not a device"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
])
def test_argument_errors(capsys, no_weights, empty_cwd, argv, expected):
    line = _error(capsys, argv)
    for text in expected:
        assert text in line, line
    assert not list(empty_cwd.iterdir())


def test_cuda_without_a_gpu(capsys, no_weights, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        line = _error(capsys, ["--device", device])
        assert f"--device {device}: " in line and "--device cpu" in line
        assert ("CPU build" in line) == (torch.version.cuda is None)


def test_default_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cli._check(cli._parser().parse_args(["--model", "gpt2"]))  # a hub id: not looked up before the load
    assert args.device == torch.device("cpu") and args.dtype == "float32"
    assert [m.name for m in args.modes] == ["unquantized", "int8_per_token_head", "fp8_per_token_head"]


@pytest.mark.parametrize("kind", ["empty folder", "missing folder", "missing .gguf", "file", "not a hub id"])
def test_no_model_at_the_path(capsys, no_weights, empty_cwd, tmp_path, kind):
    path = {
        "empty folder": tmp_path / "empty",
        "missing folder": tmp_path / "nowhere" / "model",
        "missing .gguf": tmp_path / "model.gguf",
        "file": tmp_path / "notes.txt",
        "not a hub id": "./no/such/model",
    }[kind]
    if kind == "empty folder":
        path.mkdir()
    if kind == "file":
        path.write_text("not a model")
    line = _error(capsys, ["--model", str(path)])
    assert line.startswith(f"error: no model found at {path}"), line
    assert "sentencepiece" not in line and "tiktoken" not in line
    assert not list(empty_cwd.iterdir())


def test_max_cache_len_too_small(capsys, no_weights, tiny_model):
    """Needs the prompt's length, so the tokenizer is read; the weights are not."""
    prompt_len = len(PROMPT.split())
    line = _error(capsys, ["--model", tiny_model, "--prompt", PROMPT, "--max-new-tokens", "8",
                           "--max-cache-len", str(prompt_len + 7)])
    needed = prompt_len + 8
    assert f"--max-cache-len {prompt_len + 7} is too small" in line
    assert f"the prompt has {prompt_len} tokens and --max-new-tokens is 8" in line
    assert f"pass --max-cache-len {needed} or more" in line


def test_error_in_a_real_process(tmp_path):
    """As the command, in a fresh process: status 2, one ``error:`` line, no traceback."""
    (tmp_path / "empty").mkdir()
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "hf_kvquant", "--model", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: no model found at {tmp_path / 'empty'}: the folder holds neither config.json nor a .gguf file "
        "(accepted: smollm2, gemma3, a .gguf file, a model folder (with config.json) or a hub id)"
    ]
    assert proc.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# -- the help ----------------------------------------------------------------------------------------------------


def test_help(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())
    assert description.startswith("Generate a continuation of one prompt with transformers' default KV cache and "
                                  "with hf_kvquant's INT8 and FP8 caches"), description
    flat = " ".join(text.split())
    for option in ("--model", "--mode", "--hadamard", "--max-cache-len", "--attention", "--device", "--dtype",
                   "--prompt", "--max-new-tokens"):
        assert option in flat
    assert "(default: None)" not in flat
    for default in ("(default: smollm2)", "(default: unquantized int8_per_token_head fp8_per_token_head)",
                    "(default: sdpa)", "(default: 48)", "(default: bfloat16 on a GPU, float32 on CPU)"):
        assert flat.count(default) == 1, default


# -- runs --------------------------------------------------------------------------------------------------------


def test_default_comparison(capsys, tiny_model):
    # --device cpu: the CPU's defaults (float32, the CPU note); without it the CLI takes a GPU where there is one
    out = _run(capsys, ["--model", tiny_model, "--prompt", PROMPT, "--max-new-tokens", "4", "--device", "cpu"])
    lines = out.splitlines()
    assert lines[0].startswith(f"model: {tiny_model} (float32 on cpu, sdpa attention, growing caches), prompt: ")
    table = lines[lines.index(next(line for line in lines if line.startswith("cache "))):]
    assert "KV bytes held" in table[0] and "vs default" in table[0] and "time" in table[0]
    assert [row.split()[0:2] for row in table[1:4]] == [
        ["DynamicCache", "(default)"], ["QuantizedPerTokenHeadCache", "int8_per_token_head"],
        ["QuantizedPerTokenHeadCache", "fp8_per_token_head"]]
    assert cli.CPU_NOTE in lines
    for label in ("DynamicCache (default)", "QuantizedPerTokenHeadCache int8_per_token_head",
                  "QuantizedPerTokenHeadCache fp8_per_token_head"):
        assert f"--- {label}" in lines and lines[lines.index(f"--- {label}") + 1].strip()  # its text


def test_preallocated_caches(capsys, tiny_model, monkeypatch):
    """``--max-cache-len``: transformers' StaticCache beside QuantizedPerTokenHeadCache(max_cache_len=N), each warmed
    up and then reset (the compiled decode step, on a GPU, is reused), holding N slots per layer."""
    resets = []
    from hf_kvquant import QuantizedPerTokenHeadCache

    original = QuantizedPerTokenHeadCache.reset
    monkeypatch.setattr(QuantizedPerTokenHeadCache, "reset", lambda self: (resets.append(self), original(self))[1])
    out = _run(capsys, ["--model", tiny_model, "--prompt", PROMPT, "--max-new-tokens", "4", "--max-cache-len", "48",
                        "--mode", "unquantized", "int8", "--device", "cpu"])
    assert "caches preallocated for 48" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("StaticCache ", "Quant"))}
    # 2 layers x (keys + values) x 48 slots x 1 KV head: float32 x 64 values, or 64 bytes + a float32 scale
    assert int(rows["StaticCache"][2].replace(",", "")) == 2 * 2 * 48 * 64 * 4
    assert int(rows["QuantizedPerTokenHeadCache"][2].replace(",", "")) == 2 * 2 * 48 * (64 + 4)
    assert len(resets) == 1


def test_hadamard_and_hf_kvquant_attention(capsys, tiny_model):
    """The rotated INT8 cache through hf_kvquant's attention (its plain-PyTorch path on CPU); the default cache keeps
    sdpa, and only the modes asked for run."""
    out = _run(capsys, ["--model", tiny_model, "--prompt", PROMPT, "--max-new-tokens", "3", "--mode", "int8",
                        "--hadamard", "--attention", ATTENTION_NAME, "--device", "cpu"])
    assert f"{ATTENTION_NAME} attention" in out.splitlines()[0]
    assert "QuantizedPerTokenHeadCache int8_per_token_head+hadamard" in out
    assert "DynamicCache" not in out and "fp8" not in out and "vs default" not in out


@pytest.mark.slow
def test_the_main_job_on_smollm2(capsys, smollm2, monkeypatch):
    """The README's main job (``python -m hf_kvquant``), with the session's SmolLM2 and fewer tokens: memory and text
    of the default cache and of both quantized caches, side by side."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: smollm2)
    out = _run(capsys, ["--max-new-tokens", "6", "--device", "cpu"])  # the session's model is on the CPU
    assert out.startswith("model: smollm2 (float32 on cpu, sdpa attention, growing caches)")
    held = {line.split()[1]: int(line.split()[2].replace(",", "")) for line in out.splitlines()
            if line.startswith("QuantizedPerTokenHeadCache ")}
    default = next(int(line.split()[2].replace(",", "")) for line in out.splitlines()
                   if line.startswith("DynamicCache (default)"))
    assert set(held) == {"int8_per_token_head", "fp8_per_token_head"}
    assert all(n < default / 2 for n in held.values())  # 1 byte + a scale per value against float32's 4 bytes
    assert out.count("\n--- ") == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_is_the_default_device_where_there_is_one(capsys, tiny_model):
    """Without --device the CLI takes the GPU, in bfloat16, and says so (no CPU note)."""
    out = _run(capsys, ["--model", tiny_model, "--prompt", PROMPT, "--max-new-tokens", "3", "--mode", "int8"])
    assert out.splitlines()[0].startswith(f"model: {tiny_model} (bfloat16 on cuda")
    assert cli.CPU_NOTE not in out.splitlines()
