"""Perplexity with the cache in the loop (`hf_kvquant.evaluation`, `eval/perplexity.py`) and the lm-eval model type
(`hf_kvquant.lm_eval_model`), on the real SmolLM2-135M (float32, CPU) and small slices of WikiText-2 test.

The small slices keep the module at about a minute on two CPU cores; the 64k-token figures of the README come from
`eval/perplexity.py` (see `eval/results/perplexity_*.md`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hf_kvquant import KVQuantMode, QuantizedPerTokenHeadCache
from hf_kvquant.evaluation import (
    ACCEPTED_MODES,
    ALL_MODES,
    UNQUANTIZED,
    CacheMode,
    encode_text,
    make_cache,
    parse_mode,
    perplexity,
)
from hf_kvquant.evaluation.data import is_document_title, wikitext_documents
from lib.results import default_out_dir

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "eval" / "tasks"
INT8, FP8 = "int8_per_token_head", "fp8_per_token_head"

# The slice: the first 4 x 256 tokens of WikiText-2 test after the BOS prefix, scored in 4 windows of 256 tokens
# (`perplexity` with context 257 and stride 256 scores exactly what lm-eval's rolling windows of max_length 256 score:
# see `test_lm_eval_rolling_matches_runner`).
WINDOW, WINDOWS = 256, 4
# Accuracy guard: |perplexity / unquantized - 1| on the slice (see `test_quantized_perplexity_close_to_unquantized`).
MAX_RELATIVE_CHANGE = {INT8: 0.0035, FP8: 0.02}
# lm-eval vs the standalone runner, relative difference of the total NLL.
MAX_PATH_DISAGREEMENT = 0.005


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_perplexity", REPO / "eval" / "perplexity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slice_text(smollm2, wikitext) -> str:
    _, tok = smollm2
    ids = encode_text(tok, wikitext[: 8 * WINDOW * WINDOWS])
    return tok.decode(ids[1 : WINDOW * WINDOWS + 1])


@pytest.fixture(scope="module")
def slice_ids(smollm2, slice_text) -> torch.Tensor:
    """``[BOS] + tokens``, 1 + 4 x 256 tokens."""
    ids = encode_text(smollm2[1], slice_text)
    assert ids.numel() == WINDOW * WINDOWS + 1, "decode/encode round trip changed the slice"
    return ids


@pytest.fixture(scope="module")
def guard_results(smollm2, slice_ids):
    model, _ = smollm2
    return {
        mode: perplexity(model, slice_ids, mode, context_length=WINDOW + 1, stride=WINDOW, progress=False)
        for mode in (UNQUANTIZED, INT8, FP8)
    }


# -- accuracy regression guard --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", [INT8, FP8])
def test_quantized_perplexity_close_to_unquantized(guard_results, mode):
    """With the cache in the loop (every token attends to the quantized K/V of its window), perplexity over the
    1024 scored tokens of the slice moves by at most 0.35 % (INT8) / 2 % (FP8).

    Measured on this slice (torch 2.13 CPU, transformers 5.24): INT8 +0.22 %, FP8 +0.62 %. Quantizers broken on
    purpose (`quantize_reference` monkeypatched, same slice) fail: INT8 truncating instead of rounding +0.49 %,
    FP8 rounding toward zero +2.6 %, the key scale dropped (keys stored as unscaled codes) > +10,000 %, the value
    scale dropped more still. INT8's limit is tighter than 0.5 % because truncation stays just under that.
    """
    ref, r = guard_results[UNQUANTIZED], guard_results[mode]
    assert r.tokens == ref.tokens == WINDOW * WINDOWS
    change = r.perplexity / ref.perplexity - 1
    print(f"\n{mode}: perplexity {r.perplexity:.4f} vs unquantized {ref.perplexity:.4f} ({100 * change:+.3f} %)")
    assert math.isfinite(r.perplexity) and 5 < ref.perplexity < 100, (ref.perplexity, r.perplexity)
    assert abs(change) <= MAX_RELATIVE_CHANGE[mode], (
        f"{mode}: perplexity {r.perplexity:.4f} vs unquantized {ref.perplexity:.4f} ({100 * change:+.3f} %, "
        f"limit ±{100 * MAX_RELATIVE_CHANGE[mode]:.2f} %) over {r.tokens} tokens"
    )


@pytest.mark.slow
def test_quantized_cache_really_in_the_loop(guard_results):
    """A quantized run that scored exactly the unquantized numbers would mean the quantizer never ran."""
    ref = guard_results[UNQUANTIZED].nll_sum
    assert guard_results[INT8].nll_sum != ref and guard_results[FP8].nll_sum != ref


# -- mode names, the Hadamard-rotated modes included ---------------------------------------------------------


def test_mode_names_round_trip():
    assert ALL_MODES == (UNQUANTIZED, INT8, FP8)  # the default comparison
    assert ACCEPTED_MODES == (UNQUANTIZED, INT8, FP8, "int8", "fp8")  # one vocabulary: KVQuantMode's names
    for name in ACCEPTED_MODES:
        assert parse_mode(parse_mode(name)) == parse_mode(name)
        assert parse_mode(name).name in ALL_MODES
    assert parse_mode(None) == parse_mode(UNQUANTIZED) == CacheMode(None)
    assert parse_mode("fp8") == parse_mode(KVQuantMode.FP8_PER_TOKEN_HEAD) == CacheMode(KVQuantMode.FP8_PER_TOKEN_HEAD)
    # The rotation is switched on one way: the hadamard argument, never a name.
    rotated = parse_mode("int8", hadamard=True)
    assert rotated == CacheMode(KVQuantMode.INT8_PER_TOKEN_HEAD, hadamard=True) and rotated.name == INT8 + "+hadamard"
    assert parse_mode(rotated) == rotated


@pytest.mark.parametrize("bad", ["int4", "int8_per_token_head+hadamard", "int8+hadamard", "hadamard", "", 8])
def test_unknown_mode_lists_the_accepted_names(bad):
    with pytest.raises(ValueError, match=f"unknown mode {bad!r}".replace("+", r"\+")) as excinfo:
        parse_mode(bad)
    for name in ACCEPTED_MODES:
        assert repr(name) in str(excinfo.value)


@pytest.mark.parametrize("mode, hadamard, message", [
    (UNQUANTIZED, True, "hadamard=True needs a quantized mode"),
    (None, True, "hadamard=True needs a quantized mode"),
    (INT8, "yes", "hadamard must be True or False; got 'yes'"),
])
def test_bad_hadamard_is_refused(mode, hadamard, message):
    with pytest.raises(ValueError, match=message):
        parse_mode(mode, hadamard)


def test_make_cache_builds_the_rotated_cache():
    from transformers import DynamicCache, LlamaConfig

    class Model:  # make_cache reads only the config
        config = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=64, intermediate_size=32, vocab_size=100)

    assert type(make_cache(Model, UNQUANTIZED)) is DynamicCache
    for name in ACCEPTED_MODES[1:]:
        for hadamard in (False, True):
            cache = make_cache(Model, name, hadamard=hadamard)
            assert isinstance(cache, QuantizedPerTokenHeadCache)
            assert cache.mode is KVQuantMode.parse(name) and cache.hadamard == hadamard
    assert make_cache(Model, "int8", max_cache_len=64).max_cache_len == 64


@pytest.mark.slow
def test_perplexity_runner_runs_the_rotated_mode(smollm2, slice_ids, monkeypatch):
    # Only that the name reaches the runner's cache and result; the rotation's accuracy is tested in test_accuracy.py.
    built = []
    monkeypatch.setattr(QuantizedPerTokenHeadCache, "__init__", _spy_init(built))
    rotated = parse_mode(INT8, hadamard=True)
    r = perplexity(smollm2[0], slice_ids[:65], rotated, context_length=33, stride=32, progress=False)
    assert r.mode == INT8 + "+hadamard" and r.tokens == 64 and 1 < r.perplexity < 1000
    assert built == [(KVQuantMode.INT8_PER_TOKEN_HEAD, True)] * 2  # one fresh cache per window


def _spy_init(built):
    original = QuantizedPerTokenHeadCache.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append((self.mode, self.hadamard))

    return init


# -- lm-eval model type ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kvquant_lm(smollm2):
    """A factory of `KVQuantLM` around the already loaded SmolLM2 (no second load)."""
    pytest.importorskip("lm_eval")
    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM

    model, tok = smollm2

    def make(mode: str, max_length: int = WINDOW):
        return KVQuantLM(pretrained=model, tokenizer=tok, kv_cache_dtype=mode, max_length=max_length, batch_size=4)

    return make


def test_lm_eval_model_registered():
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM

    assert get_model("hf_kvquant") is KVQuantLM


def test_lm_eval_model_rejects_unknown_mode():
    pytest.importorskip("lm_eval")
    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM

    with pytest.raises(ValueError, match="hf_kvquant model_args: unknown mode 'int4'.*int8_per_token_head"):
        KVQuantLM(pretrained="smollm2", kv_cache_dtype="int4")  # checked before anything is loaded


@pytest.fixture
def no_hflm_load(monkeypatch):
    """HFLM's own __init__ (where the model would load) fails the test: model_args are checked before it."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    def init(self, *args, **kwargs):
        raise AssertionError("HFLM.__init__ ran: the model would have been loaded before the error")

    monkeypatch.setattr(HFLM, "__init__", init)


def test_lm_eval_model_accepted_arguments():
    """KVQuantLM's own, every named parameter of HFLM.__init__, and the from_pretrained options users pass."""
    pytest.importorskip("lm_eval")
    import inspect

    from lm_eval.models.huggingface import HFLM

    from hf_kvquant.evaluation.lm_eval_model import FROM_PRETRAINED_ARGS, KVQuantLM

    accepted = KVQuantLM.accepted_args()
    assert accepted[:5] == ["pretrained", "kv_cache_dtype", "hadamard", "device", "dtype"]
    hflm = [name for name in inspect.signature(HFLM.__init__).parameters if name not in ("self", "kwargs")]
    assert set(hflm) | set(FROM_PRETRAINED_ARGS) <= set(accepted) and len(accepted) == len(set(accepted))
    assert {"max_length", "batch_size", "add_bos_token", "attn_implementation"} <= set(accepted)


def test_lm_eval_model_refuses_unknown_arguments(no_hflm_load):
    from lm_eval.api.registry import get_model

    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM, ModelArgsError

    with pytest.raises(ModelArgsError) as excinfo:
        get_model("hf_kvquant").create_from_arg_string("pretrained=smollm2,kv_cache_dtpye=int8,max_length=256")
    message = str(excinfo.value)
    assert message == ("hf_kvquant model_args: unknown argument 'kv_cache_dtpye' (did you mean 'kv_cache_dtype'?); "
                       f"accepted: {', '.join(KVQuantLM.accepted_args())}")
    with pytest.raises(ModelArgsError, match="unknown arguments 'foo', 'bar'; accepted: "):
        KVQuantLM(pretrained="smollm2", foo=1, bar=2)
    assert issubclass(ModelArgsError, ValueError)


@pytest.mark.parametrize("kind", ["empty folder", "missing .gguf", "not a hub id"])
def test_lm_eval_model_no_model_at_the_path(no_hflm_load, tmp_path, kind):
    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM, ModelArgsError

    path = {"empty folder": tmp_path, "missing .gguf": tmp_path / "m.gguf", "not a hub id": "./no/such/model"}[kind]
    with pytest.raises(ModelArgsError, match=f"hf_kvquant model_args: pretrained: no model found at {path}"):
        KVQuantLM(pretrained=str(path), kv_cache_dtype="int8")


@pytest.mark.slow
def test_lm_eval_rolling_shows_one_progress_bar(kvquant_lm, capsys):
    """HFLM's ``loglikelihood_rolling`` opens a ``Running loglikelihood requests`` bar per batch of windows (a 1/1
    bar per window at batch size 1); KVQuantLM shows one bar over all the windows."""
    from lm_eval.api.instance import Instance

    lm = kvquant_lm(INT8, max_length=16)
    lm.batch_size_per_gpu = 1
    texts = [" ".join(["The quick brown fox jumps over the lazy dog."] * 4), "A short one."]
    windows = sum(-(-len(lm.tok_encode(t, add_special_tokens=False)) // 16) for t in texts)
    assert windows >= 3
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
    capsys.readouterr()
    scores = lm.loglikelihood_rolling(requests)
    err = capsys.readouterr().err
    assert len(scores) == 2 and all(s < 0 for s in scores)
    assert "Running loglikelihood requests" not in err, err[-2000:]
    assert "Scoring rolling windows" in err and f"{windows}/{windows}" in err, err[-2000:]
    assert lm._rolling_bar is None and lm._rolling_tokens is None and not lm._encode_plain


def test_lm_eval_model_hadamard_argument(kvquant_lm, smollm2):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from hf_kvquant.evaluation.lm_eval_model import KVQuantLM

    model, tok = smollm2
    for kwargs in ({"kv_cache_dtype": INT8, "hadamard": True}, {"kv_cache_dtype": "int8", "hadamard": True}):
        lm = KVQuantLM(pretrained=model, tokenizer=tok, max_length=WINDOW, **kwargs)
        assert lm.kv_cache_dtype == INT8 + "+hadamard" and lm.get_model_info()["kv_cache_dtype"] == lm.kv_cache_dtype
        cache = lm.new_cache()
        assert cache.hadamard and cache.mode.value == INT8
    assert not kvquant_lm(FP8).new_cache().hadamard
    # checked before anything is loaded; "hadamard=true" on the command line arrives as a bool
    with pytest.raises(ValueError, match="hadamard=True needs a quantized mode"):
        get_model("hf_kvquant").create_from_arg_string("pretrained=smollm2,kv_cache_dtype=unquantized,hadamard=true")
    with pytest.raises(ValueError, match="unknown mode 'int8_per_token_head\\+hadamard'"):
        KVQuantLM(pretrained="smollm2", kv_cache_dtype=INT8 + "+hadamard")  # one way to rotate: hadamard=true
    with pytest.raises(ValueError, match="hadamard must be True or False"):
        KVQuantLM(pretrained="smollm2", kv_cache_dtype=INT8, hadamard="maybe")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [UNQUANTIZED, INT8])
def test_lm_eval_rolling_matches_runner(smollm2, slice_text, slice_ids, guard_results, kvquant_lm, mode):
    """lm-eval's ``loglikelihood_rolling`` (max_length 256) and `hf_kvquant.evaluation.perplexity` give the same total
    NLL on the slice.

    Both score one sequence ``T = [BOS] + tokens(text)``: lm-eval puts ``prefix_token_id`` in front of the text, the
    runner's `encode_text` does the same. lm-eval feeds the windows ``T[kL:(k+1)L]`` and scores all ``L`` next tokens
    ``T[kL+1:(k+1)L+1]``, the prediction of a window's last position included. The runner scores only positions
    inside a window, so it gets ``context_length=L+1, stride=L``: windows ``T[kL:(k+1)L+1]`` score the same
    ``T[kL+1:(k+1)L+1]`` from the same contexts (the extra last input predicts nothing scored, and causal attention
    keeps it out of the scored logits). The text is exactly 4 L tokens long, so lm-eval's last window, which it
    right-aligns to keep a full context, starts at 3 L like the runner's.
    """
    from lm_eval.api.instance import Instance

    lm = kvquant_lm(mode)
    assert slice_ids.tolist() == [lm.prefix_token_id, *lm.tok_encode(slice_text, add_special_tokens=False)]
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(slice_text,), idx=0)
    lm_eval_nll = -lm.loglikelihood_rolling([request], disable_tqdm=True)[0]
    runner_nll = guard_results[mode].nll_sum
    print(f"\n{mode}: lm-eval NLL {lm_eval_nll:.6f}, runner NLL {runner_nll:.6f}, "
          f"ratio - 1 = {lm_eval_nll / runner_nll - 1:.2e}")
    assert abs(lm_eval_nll / runner_nll - 1) <= MAX_PATH_DISAGREEMENT, (lm_eval_nll, runner_nll)


@pytest.mark.slow
def test_lm_eval_wikitext_task_matches_runner(smollm2, wikitext, kvquant_lm):
    """End to end through lm-eval's evaluator and the offline ``wikitext_local`` task (``--include_path eval/tasks``):
    the word perplexity of one short WikiText-2 article equals the runner's on the same detokenized text.

    The article is the shortest one of 500+ tokens; the window length is a divisor of its token count near 256 so
    that lm-eval's windows and the runner's (``L+1``, stride ``L``; see the test above) score the same tokens.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # the task's, via its utils.py

    model, tok = smollm2
    pages = wikitext_documents(wikitext)
    counts = [len(encode_text(tok, wikitext_detokenizer({"page": p}))) - 1 for p in pages]
    index = min((i for i, n in enumerate(counts) if n >= 500), key=lambda i: counts[i])
    n = counts[index]
    window = next(w for w in [*range(256, 128, -1), *range(257, 512)] if n % w == 0)

    results = lm_eval.simple_evaluate(
        model=kvquant_lm(INT8, max_length=window),
        tasks=["wikitext_local"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        samples={"wikitext_local": [index]},
        bootstrap_iters=0,
        log_samples=False,
    )
    word_ppl = results["results"]["wikitext_local"]["word_perplexity,none"]

    seq = encode_text(tok, wikitext_detokenizer({"page": pages[index]}))
    r = perplexity(model, seq, INT8, context_length=window + 1, stride=window, progress=False)
    assert r.tokens == n
    words = len(re.split(r"\s+", pages[index]))  # as lm-eval's wikitext process_results counts them
    runner_word_nll = r.nll_sum / words
    print(f"\nwikitext_local document {index} ({n} tokens, windows of {window}): lm-eval word perplexity "
          f"{word_ppl:.6f}, runner {math.exp(runner_word_nll):.6f}")
    assert abs(math.log(word_ppl) / runner_word_nll - 1) <= MAX_PATH_DISAGREEMENT, (word_ppl, runner_word_nll)


@pytest.mark.slow
def test_lm_eval_generate_until_runs_through_the_quantized_cache(kvquant_lm, monkeypatch):
    """``generate_until`` writes every prompt and generated token through `QuantizedPerTokenHeadCache.update`."""
    from lm_eval.api.instance import Instance

    from hf_kvquant import QuantizedPerTokenHeadCache

    calls = []
    original = QuantizedPerTokenHeadCache.update

    def spy(self, key_states, value_states, layer_idx, *args, **kwargs):
        calls.append((self.mode.value, layer_idx, key_states.shape[-2]))
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(QuantizedPerTokenHeadCache, "update", spy)
    lm = kvquant_lm(INT8, max_length=512)
    request = Instance(
        request_type="generate_until",
        doc={},
        arguments=("The capital of France is", {"until": ["<|never|>"], "max_gen_toks": 5, "do_sample": False}),
        idx=0,
    )
    (text,) = lm.generate_until([request], disable_tqdm=True)
    assert isinstance(text, str) and text.strip()
    layers = lm.model.config.num_hidden_layers
    prompt = len(lm.tok_encode("The capital of France is"))
    assert {mode for mode, _, _ in calls} == {INT8}
    assert sorted({layer for _, layer, _ in calls}) == list(range(layers))
    per_layer0 = [tokens for _, layer, tokens in calls if layer == 0]
    assert per_layer0[0] == prompt and per_layer0[1:] == [1] * (len(per_layer0) - 1)
    assert len(per_layer0) >= 4  # the prefill, then one decode step per generated token but the last


# -- the command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    return _load_cli()


def _error(cli, capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_cli_missing_text_file(cli, capsys, tmp_path):
    line = _error(cli, capsys, ["--text", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)])
    assert "text file not found" in line and "nope.txt" in line


def test_cli_unknown_mode(cli, capsys, tmp_path):
    line = _error(cli, capsys, ["--modes", "unquantized,int4", "--out-dir", str(tmp_path)])
    assert "unknown mode 'int4'" in line and all(repr(name) in line for name in ACCEPTED_MODES)
    for old in ("int8+hadamard", "int8_per_token_head+hadamard", "none"):  # the rotation is the --hadamard switch
        line = _error(cli, capsys, ["--modes", old, "--out-dir", str(tmp_path)])
        assert f"unknown mode {old!r}" in line


def test_cli_modes_and_the_hadamard_switch(cli):
    modes = cli.parse_modes("fp8, int8_per_token_head,int8,unquantized")
    assert [m.name for m in modes] == [UNQUANTIZED, INT8, FP8]  # the reference first, the order of ALL_MODES, once
    modes = cli.parse_modes("fp8,unquantized,int8", hadamard=True)
    assert modes == [CacheMode(None), CacheMode(KVQuantMode(INT8), True), CacheMode(KVQuantMode(FP8), True)]
    assert cli.parse_args(["--modes", "int8", "--hadamard"]).hadamard


def test_cli_help_states_each_default_once(cli, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--hadamard" in text and "(default: None)" not in text
    defaults = re.findall(r"\(default: [^)]*\)", text)
    assert len(defaults) == len(set(defaults)) == 10, defaults  # one per option that has a default, each once
    for option in ("--model", "--text", "--context-length", "--stride", "--max-tokens", "--modes", "--dtype",
                   "--device", "--out-dir", "--name"):
        help_text = text.split(f"{option} ", 2)[-1]
        assert help_text.split(" --", 1)[0].count("(default:") == 1, option
    assert "(default: the context length)" in text and "hf_kvquant_results/NAME-<date>-<time>" in text


def test_cli_default_out_dir_is_fresh_and_outside_the_repository(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = default_out_dir("perplexity_smollm2")
    assert first.parent == tmp_path / "hf_kvquant_results" and first.name.startswith("perplexity_smollm2-")
    assert not first.exists()  # created by the first result written, not before
    first.mkdir(parents=True)
    second = default_out_dir("perplexity_smollm2")
    assert second != first and not second.exists()
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert REPO not in default_out_dir("x").parents
    assert cli.parse_args([]).out_dir is None  # the published eval/results only when named


def test_cli_errors_leave_nothing_behind(cli, capsys, tmp_path, monkeypatch):
    """Without --out-dir, a run that stops on an error creates no result folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n")
    _error(cli, capsys, ["--modes", "int4"])
    _error(cli, capsys, ["--text", str(tmp_path / "nope.txt")])
    _error(cli, capsys, ["--model", str(tmp_path / "nowhere"), "--text", str(text)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


@pytest.mark.parametrize("model", ["missing.gguf", "EMPTY_FOLDER"])
def test_cli_unknown_model(cli, capsys, tmp_path, model):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n")
    model = str(tmp_path) if model == "EMPTY_FOLDER" else str(tmp_path / model)
    line = _error(cli, capsys, ["--model", model, "--text", str(text), "--out-dir", str(tmp_path)])
    assert f"cannot load model {model!r}: no model found at {model}" in line and "smollm2" in line
    assert "sentencepiece" not in line


def _env() -> dict:
    # eval/ too: runpy.run_path does not put the script's folder on sys.path as `python eval/X.py` does
    path = os.pathsep.join([str(REPO), str(REPO / "eval"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def test_cli_exit_status_in_a_real_process(tmp_path):
    """As a script, in a process where lm-eval cannot be imported (the package and the CLI do not need it): status 2
    and the ``error:`` line on stderr for an unknown model id (the hub switched off)."""
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.\n")
    argv = [str(REPO / "eval" / "perplexity.py"), "--model", "no-such-org/no-such-model", "--text", str(text),
            "--out-dir", str(tmp_path)]
    code = (f"import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = {argv!r}; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: cannot load model 'no-such-org/no-such-model'" in proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_lm_eval_command_line_finds_the_model_type(tmp_path):
    """``python -m hf_kvquant.evaluation.lm_eval_model`` is lm-eval's command line with ``hf_kvquant`` registered: the
    model type is found and its arguments checked (a bad ``kv_cache_dtype`` fails before any model is loaded)."""
    pytest.importorskip("lm_eval")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_kvquant.evaluation.lm_eval_model", "--model", "hf_kvquant",
         "--model_args", "pretrained=smollm2,kv_cache_dtype=int4", "--include_path", str(TASKS),
         "--tasks", "wikitext_local", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "unknown mode 'int4'" in proc.stderr, proc.stderr[-2000:]
    assert "Unknown model" not in proc.stderr


def test_lm_eval_command_line_refuses_an_unknown_key(tmp_path):
    """A misspelt model_args key: one ``error:`` line naming it, status 2, no traceback, nothing loaded."""
    pytest.importorskip("lm_eval")
    proc = subprocess.run(
        [sys.executable, "-m", "hf_kvquant.evaluation.lm_eval_model", "--model", "hf_kvquant",
         "--model_args", "pretrained=smollm2,kv_cache_dtpye=int8", "--include_path", str(TASKS),
         "--tasks", "wikitext_local", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown argument 'kv_cache_dtpye' (did you mean 'kv_cache_dtype'?)" in errors[0]
    assert "Traceback" not in proc.stderr and "GGUF" not in proc.stderr


@pytest.mark.slow
def test_cli_writes_table_json_and_markdown(cli, capsys, tmp_path, smollm2, monkeypatch):
    """A tiny end-to-end run (64 tokens, two windows): the table, and the JSON and markdown files."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: smollm2)  # the session's model, not a second load
    text = tmp_path / "t.txt"
    text.write_text(" The quick brown fox jumps over the lazy dog . " * 20)
    argv = ["--text", str(text), "--context-length", "32", "--max-tokens", "64", "--modes", "unquantized,int8",
            "--out-dir", str(tmp_path), "--name", "tiny", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "int8_per_token_head" in out and "vs unquantized" in out
    import json

    report = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["mode"] for r in report["results"]] == [UNQUANTIZED, INT8]
    assert report["results"][0]["tokens"] == 62 and report["results"][0]["relative_increase"] is None
    assert "| int8_per_token_head | 62 |" in (tmp_path / "tiny.md").read_text()
    assert report["versions"]["torch"] == torch.__version__ and report["device"] == "cpu"

    assert cli.main([*argv[:-3], "--hadamard", "--name", "tiny_hadamard", "--no-progress"]) == 0
    report = json.loads((tmp_path / "tiny_hadamard.json").read_text())
    assert [r["mode"] for r in report["results"]] == [UNQUANTIZED, INT8 + "+hadamard"]
    assert report["settings"]["hadamard"] is True


@pytest.mark.slow
def test_cli_writes_to_a_fresh_folder_by_default(cli, capsys, tmp_path, smollm2, monkeypatch):
    """Without --out-dir the results go to a new folder under the temporary directory, named on stderr and stdout;
    eval/results is left alone."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: smollm2)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    published = {p: p.stat().st_mtime_ns for p in (REPO / "eval" / "results").glob("perplexity_*")}
    text = tmp_path / "t.txt"
    text.write_text(" The quick brown fox jumps over the lazy dog . " * 20)
    assert cli.main(["--text", str(text), "--context-length", "32", "--max-tokens", "64", "--modes", "unquantized",
                     "--no-progress"]) == 0
    (folder,) = (tmp_path / "hf_kvquant_results").iterdir()
    assert folder.name.startswith("perplexity_smollm2-")
    assert sorted(p.name for p in folder.iterdir()) == ["perplexity_smollm2.json", "perplexity_smollm2.md"]
    captured = capsys.readouterr()
    assert f"results go to {folder}" in captured.err and f"wrote {folder / 'perplexity_smollm2'}.json" in captured.out
    assert {p: p.stat().st_mtime_ns for p in (REPO / "eval" / "results").glob("perplexity_*")} == published


# -- text loading ---------------------------------------------------------------------------------------------


def test_hub_text_equals_the_local_file(wikitext, monkeypatch):
    """``hf:`` sources join the dataset's rows as they are (non-empty rows end with their newline), which gives the
    local file back from the hub's row layout (empty rows between paragraphs)."""
    datasets = pytest.importorskip("datasets")
    from hf_kvquant.evaluation.data import load_text

    rows = [line + "\n" for line in wikitext.split("\n")[:-1]]
    hub_rows = [r for row in rows for r in ("", row)]
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"text": hub_rows}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text, source = load_text("hf:Salesforce/wikitext:wikitext-2-raw-v1:test")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert text == wikitext and source == "hf:Salesforce/wikitext:wikitext-2-raw-v1:test"


def test_wikitext_documents(wikitext):
    pages = wikitext_documents(wikitext)
    assert len(pages) == 62  # as lm-eval's EleutherAI/wikitext_document_level test split
    assert "\n".join(pages) == wikitext
    assert all(is_document_title(p.split("\n", 1)[0]) for p in pages)
    assert not is_document_title(" = = Career = = ") and is_document_title(" = Du Fu = ")
