"""The architecture zoo (eval/zoo.py): every decoder-only causal LM of the installed transformers, built tiny on the
CPU, with `QuantizedPerTokenHeadCache` (growable and preallocated, INT8 and FP8, under the default attention and
hf_kvquant's) against a fake-quant reference, and hf_kvquant's attention against the model's own.

One test per architecture, so that a failure names it. Each ends supported (every run matches), refused (hf_kvquant
raised a ValueError/NotImplementedError naming a reason this file accepts), or skipped (transformers itself fails on
the tiny config, or the model keeps no KV cache). A mismatch, a crash inside the model with our cache where
transformers' own works, or a refusal for a reason not listed below fails. The last test prints the counts.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch
import transformers

import zoo  # eval/zoo.py (pyproject's pytest pythonpath)

ARCHITECTURES = zoo.decoder_only_architectures()
# The reasons hf_kvquant may give for not serving an architecture. Anything else it refuses is a regression. (Head
# sizes and keys/values of different sizes are also accepted: refused by earlier versions, served since.)
ACCEPTED_REFUSALS = {
    "indexed attention (DeepSeek sparse attention)": r"layer type 'indexed_attention': indexed attention",
    "compressed attention (DeepSeek-V4)": r"layer type '\w*compressed\w*': compressed attention",
    "no attention layer (Mamba, ...)": r"no attention layer whose keys and values could be quantized",
    "additive position bias under hf_kvquant's attention": r"does not compute an additive position bias",
    "block-sparse attention under hf_kvquant's attention": r"does not compute block-sparse attention",
    "sinks other than one per query head under hf_kvquant's attention": r"one attention-sink logit per query head",
    "head sizes": r"head_dim",
}
RESULTS: dict[str, zoo.ZooResult] = {}


# Each model and fallback would warn its own way (the CPU path, dequantized hand-overs, 4D masks): not the point here.
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread():
    """Tiny matrices: one thread is faster (on a busy machine, ten times), and transformers' logging off."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


def test_the_zoo_is_the_decoder_only_architectures():
    assert len(ARCHITECTURES) > 100
    for name in ("llama", "gemma3_text", "qwen3_next", "jamba", "falcon_h1", "llama4_text", "deepseek_v3", "gpt_oss"):
        assert name in ARCHITECTURES
    for name in ("bert", "t5", "whisper", "gemma3", "llava"):  # encoders, encoder-decoders, multimodal wrappers
        assert name not in ARCHITECTURES


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture(name):
    result = zoo.run_architecture(name)  # AssertionError on a mismatch; a crash propagates
    RESULTS[name] = result
    assert result.status in ("supported", "refused", "skipped"), result
    if result.status == "refused":
        accepted = [what for what, pattern in ACCEPTED_REFUSALS.items() if re.search(pattern, result.reason)]
        assert accepted, f"{name} is refused for a reason not accepted: {result.reason}"


def test_a_static_cache_failure_is_found_on_the_cpu_before_a_gpu_run():
    """On a GPU, transformers' StaticCache failing on cpmant's tiny config is an out-of-bounds index_copy_, a
    device-side assert that leaves the process unable to run anything: `run_architecture` asks the CPU first."""
    input_ids, attention_mask = zoo._inputs()
    failure = zoo._static_failure_on_cpu("cpmant", "eager", input_ids, attention_mask, None, None)
    assert failure is not None and "index_copy_" in failure
    assert zoo._static_failure_on_cpu("llama", "sdpa", input_ids, attention_mask, None, None) is None



@pytest.mark.parametrize(("argv", "message"), [(["--device", "foo"], "--device 'foo' is not a torch device"),
                                               (["--head-dim", "0"], "--head-dim must be a positive number")])
def test_bad_arguments_are_refused_before_any_architecture_runs(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["zoo.py", "llama", *argv])
    with pytest.raises(SystemExit):
        zoo.main()
    captured = capsys.readouterr()
    assert message in captured.err and "llama" not in captured.out

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "qwen3_5_text", "phi", "cpmant"])
def test_architecture_on_the_gpu(name):
    """The zoo's checks through the Triton kernel: sinks (gpt_oss), MLA (deepseek_v3), a hybrid (qwen3_5_text), phi,
    and a model whose StaticCache fails (cpmant: asked on the CPU first)."""
    assert zoo.run_architecture(name, "cuda").status == "supported"


def test_counts():
    """The summary (run after the architectures; with -k selecting some, over those)."""
    if not RESULTS:
        pytest.skip("no architecture ran")
    counts = {status: sorted(n for n, r in RESULTS.items() if r.status == status)
              for status in ("supported", "refused", "skipped")}
    print(f"\nzoo: {len(RESULTS)} architectures: {len(counts['supported'])} supported, {len(counts['refused'])} "
          f"refused, {len(counts['skipped'])} skipped")
    for status in ("refused", "skipped"):
        for name in counts[status]:
            print(f"  {status} {name}: {RESULTS[name].reason[:150]}")
    if len(RESULTS) == len(ARCHITECTURES):  # the whole zoo: most of it is served
        assert len(counts["supported"]) >= 0.75 * len(ARCHITECTURES), counts
