"""The architecture zoo: every decoder-only causal LM of the installed transformers, built from a tiny random config
(float32; on the CPU unless ``--device`` says otherwise) and run with `QuantizedPerTokenHeadCache`, growable and
preallocated (``max_cache_len``), under the model's default attention and under hf_kvquant's, each run against a
fake-quant reference: a transformers cache whose keys and values go through the same quantize-dequantize as ours,
under the same attention. The check is therefore exact up to float32 summation order, whatever the sensitivity of a
tiny random model to rounding. A last run holds hf_kvquant's attention against the model's own over a plain
DynamicCache (no rounding in the way). Each run is a greedy generation of a left-padded batch of 2, then a
teacher-forced forward (the prompt, then the generated tokens as one chunk). `run_architecture` lists the runs.

Every architecture ends in one class:

* ``supported``: every run matches its reference;
* ``refused``: hf_kvquant raised a `ValueError`/`NotImplementedError` naming the reason (when the cache was built, at
  its first update, or in its attention), for one run or all;
* ``skipped``: transformers itself fails on the tiny config (it does not build, or the run with a plain
  `DynamicCache` fails), or the model keeps no keys and values in the cache it is given.

Anything else is a failure: a mismatch raises `AssertionError`, and an error of another kind in a run with our cache
(where transformers' own cache works) propagates. tests/test_zoo.py runs every architecture through
`run_architecture`; run as a script, this writes the table to eval/results/zoo.md::

    python eval/zoo.py                       # all architectures (about a minute on 2 cores)
    python eval/zoo.py llama jamba           # some, printed only
    python eval/zoo.py --device cuda         # on a GPU: hf_kvquant's attention through its Triton kernel, printed only
    python eval/zoo.py phi --head-dim 80     # heads of 80 channels (hidden size 4 x 80), printed only
"""

from __future__ import annotations

import argparse
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import (
    LinearAttentionAndStaticFullAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

import hf_kvquant
from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedPerTokenHeadCache
from hf_kvquant.ops.reference import dequantize, quantize_reference

RESULTS = Path(__file__).resolve().parent / "results" / "zoo.md"

# -- the tiny configs --------------------------------------------------------------------------------------------------

VOCAB = 128
HEAD_DIM = 64
WINDOW = 4  # sliding windows and attention chunks shorter than prompt + generation, so that they matter
# Every attribute a config has among these is set (the spelling differs between families).
TINY = {
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "unpadded_vocab_size": VOCAB,
    "hidden_size": 256, "n_embd": 256, "d_model": 256, "embedding_dim": 256,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "swa_num_attention_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "swa_num_key_value_heads": 2, "num_query_groups": 2,
    "head_dim": HEAD_DIM, "swa_head_dim": HEAD_DIM,
    "intermediate_size": 128, "ffn_hidden_size": 128, "n_inner": 128, "intermediate_size_mlp": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64,
    "expert_ffn_hidden_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "zero_expert_num": 2,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "top_k_experts": 2, "moe_topk": 2, "moe_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1, "n_group": 1, "num_expert_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1,
    "max_position_embeddings": 256, "n_positions": 256, "context_length": 256, "max_seq_len": 256,
    "sliding_window": WINDOW, "sliding_window_size": WINDOW, "attention_window_size": WINDOW, "window_size": WINDOW,
    "attention_chunk_size": WINDOW,
    # multi-head latent attention (MLA): keys of 48 + 16 (rotary) channels per head, values of 32
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_nope_head_dim": 48, "qk_rope_head_dim": 16, "v_head_dim": 32,
    # linear-attention and state-space layers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
    "linear_num_heads": 4, "linear_head_dim": 32, "lru_width": 256,
    "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16, "mamba_dt_rank": 16, "time_step_rank": 16,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8, "mamba_d_head": 64, "mamba_head_dim": 64,
    "mamba_d_ssm": 512, "mamba_n_groups": 1, "n_groups": 1, "mamba_ngroups": 1, "mamba_chunk_size": 16,
    # token ids inside the tiny vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# Features that a None turns off: they stay off where the family's default leaves them off.
OPTIONAL_FEATURES = ("sliding_window", "sliding_window_size", "attention_window_size", "window_size",
                     "attention_chunk_size", "q_lora_rank", "unpadded_vocab_size", "pad_token_id", "bos_token_id",
                     "eos_token_id")
# Per-layer pattern lists a config may hold: cut to the same layers as its layer types.
PATTERNS = ("layer_types", "layers_block_type", "block_types", "attention_layers", "mlp_layer_types", "indexer_types")
# Where the generic rules are not enough: configs that derive their layout from other fields, or check a relation.
OVERRIDES = {
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},  # its default has attention layers only
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "mamba2": {"num_heads": 8, "head_dim": 64, "expand": 2},
    "zaya": {"num_experts_per_tok": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "num_layers": 2},
    "dory": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "num_hidden_layers": 3,
             "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
    # KV sharing: the last two layers read the keys and values of the first two
    "gemma3n_text": {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
                     "num_kv_shared_layers": 2, "intermediate_size": [128] * 4,
                     "activation_sparsity_pattern": [0.0] * 4},
    "gemma4_text": {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
                    "num_kv_shared_layers": 2},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 64, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
    # the attention of Zamba's shared blocks reads [hidden, embeddings]: twice the hidden size
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3,
              "attention_hidden_size": 512, "attention_head_dim": 128},
    "zamba2": {"attention_hidden_size": 512, "attention_head_dim": 128, "kv_channels": 64},
}


def decoder_only_architectures() -> list[str]:
    """The causal-LM architectures of the installed transformers that are decoder-only text models: not
    encoder-decoders, not encoders with a causal head (BERT and friends), not multimodal wrappers."""
    names = []
    for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_class = CONFIG_MAPPING[name]
        sub_configs = set(getattr(config_class, "sub_configs", None) or {})
        if (name in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config_class, "is_encoder_decoder", False)
                or sub_configs - {"attn_config", "ffn_config"}):
            continue
        names.append(name)
    return names


def _layer_pattern(config) -> list[str] | None:
    try:
        types = config.layer_types
    except Exception:  # noqa: BLE001 - a config whose layout is not readable this way simply has none
        return None
    return list(types) if isinstance(types, (list, tuple)) else None


def tiny_config(name: str):
    """The config of ``name`` with tiny sizes: 2 layers (or one of each layer type, in the order they first appear,
    so that a hybrid model keeps its attention layers), hidden 256, 4 heads / 2 KV heads of 64 channels, vocabulary
    128, windows and chunks of 4 tokens, 4 experts."""
    config_class = CONFIG_MAPPING[name]
    base = config_class()
    values = base.to_dict()
    kwargs = {key: value for key, value in TINY.items() if key in values}
    if "kv_lora_rank" in kwargs:  # MLA: one latent for all heads; the config's head_dim is the rotary part
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "head_dim" in kwargs:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    layers = getattr(base, "num_hidden_layers", None)
    pattern = _layer_pattern(base)
    if pattern is not None and len(pattern) == layers:
        first = {}
        for i, layer_type in enumerate(pattern):
            first.setdefault(layer_type, i)
        keep = sorted(first.values()) if len(first) > 1 else [0, 1]
        for key, value in values.items():  # every per-layer list (types, sizes, ...) cut to those layers
            if isinstance(value, list) and len(value) == layers and (key in PATTERNS or key not in TINY):
                kwargs[key] = [value[i] for i in keep]
        kwargs["num_hidden_layers"] = len(keep)
    else:
        for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks"):
            if key in values:
                kwargs[key] = 2
    for key, value in values.items():  # per-layer sizes given as lists
        if key in TINY and isinstance(value, list):
            kwargs[key] = [TINY[key]] * kwargs.get("num_hidden_layers", 2)
    kwargs.update(OVERRIDES.get(name, {}))
    for key in OPTIONAL_FEATURES:
        if key in kwargs and values.get(key) is None:
            del kwargs[key]
    return config_class(**kwargs)


def build_model(name: str, device: str = "cpu"):
    """A float32 random model of ``name`` from `tiny_config`, seeded, in eval mode, on ``device``."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name)).float().eval().to(device)


# -- the runs ----------------------------------------------------------------------------------------------------------

PROMPT, NEW_TOKENS, PADDING = 7, 4, 2  # a batch of 2 prompts of 7 tokens, the first left-padded by 2
MAX_CACHE_LEN = 16  # of the preallocated runs (prompt and new tokens fit)
INT8, FP8 = KVQuantMode.INT8_PER_TOKEN_HEAD, KVQuantMode.FP8_PER_TOKEN_HEAD
# (attention implementation, mode, preallocated with max_cache_len); "default" is the model's own (sdpa or eager)
RUNS = (("default", INT8, False), ("default", INT8, True), (ATTENTION_NAME, INT8, False),
        (ATTENTION_NAME, FP8, False), (ATTENTION_NAME, FP8, True))
# Largest logit difference, relative to max(1, largest reference logit).
# * hf_kvquant's attention against the default one over the same unrounded keys and values: the same math in another
#   float32 summation order. At most 1.9e-6 over the whole zoo on an AMD EPYC (CI's kind) and on the GPU machine's
#   host CPU, with transformers 5.24 and 5.25 alike: 1e-4 is a 50x margin, and a wrong mask, window, sink or scale
#   moves the logits by 1e-2 and more.
# * Our cache against the fake-quant reference on the CPU: the same rounded values through the same float32 code on the
#   same shapes (the fallback attention slices a preallocated cache to its written slots, as ours does), so the two
#   agree to the bit: 0.0 on every architecture on both CPUs. The bound is the unquantized one: anything above
#   summation order is a bug.
# * On a GPU hf_kvquant's attention is the Triton kernel and the reference plain PyTorch: another summation order
#   upstream can flip one rounding downstream (one quantization step of one value: absmax/127 for INT8, up to
#   absmax/14 for FP8's top binade), which moved the logits by up to 9.4e-4 on an H200; the bound is 2e-3 there.
UNQUANTIZED_TOLERANCE = 1e-4
QUANTIZED_TOLERANCE = {"cpu": UNQUANTIZED_TOLERANCE, "cuda": 2e-3}


def fake_quantize(x: torch.Tensor, mode: KVQuantMode) -> torch.Tensor:
    """``x [..., head_dim]`` rounded as the cache stores it (one scale per token-head), in ``x``'s dtype."""
    return dequantize(*quantize_reference(x, mode), x.dtype)


class _FakeQuantUpdate:
    mode: KVQuantMode

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(fake_quantize(key_states, self.mode), fake_quantize(value_states, self.mode), layer_idx,
                              *args, **kwargs)


class FakeQuantCache(_FakeQuantUpdate, DynamicCache):
    """The oracle: a `DynamicCache` whose new keys and values are rounded as `QuantizedPerTokenHeadCache` rounds them,
    then kept in full precision. Non-attention layers (conv/recurrent states) are transformers' own, as in ours."""

    def __init__(self, config, mode: KVQuantMode):
        super().__init__(config=config)
        self.mode = mode


class FakeQuantStaticCache(_FakeQuantUpdate, StaticCache):
    """`FakeQuantCache` preallocated: transformers' `StaticCache` (``max_cache_len`` slots) of rounded keys and
    values, the oracle of ``QuantizedPerTokenHeadCache(max_cache_len=...)``. As ours, its sliding-window layers keep
    every token (the mask applies the window) where transformers' own roll a window of slots: the same attention
    shapes, hence the same float32 sums."""

    def __init__(self, config, mode: KVQuantMode, max_cache_len: int):
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.mode = mode
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LinearAttentionAndStaticSlidingWindowAttentionLayer):
                self.layers[i] = LinearAttentionAndStaticFullAttentionLayer(max_cache_len, layer.number_of_states)
            elif isinstance(layer, StaticSlidingWindowLayer):
                self.layers[i] = StaticLayer(max_cache_len)
            else:
                continue
            # Still a sliding layer to the mask builders: transformers derives a sliding mask's query offset from the
            # first layer that says so (5.25: otherwise layer 0, a linear-attention layer of recurrent_gemma that
            # counts no tokens, puts every query at position 0).
            self.layers[i].is_sliding = True


@dataclass
class ZooResult:
    name: str
    status: str  # "supported", "refused" or "skipped"
    reason: str = ""
    layer_types: list[str] = field(default_factory=list)  # the layer classes of our (INT8, growable) cache
    max_logit_error: float = 0.0  # the largest |ours - reference| / max(1, |reference|) of the runs that matched
    errors: dict[str, float] = field(default_factory=dict)  # that error of each run that matched, by run name
    seconds: float = 0.0


class Refused(Exception):
    """hf_kvquant said that it cannot serve the run (a ValueError/NotImplementedError raised in its own code)."""


def raised_by_hf_kvquant(error: BaseException) -> bool:
    """Whether ``error`` is a refusal: a `ValueError`/`NotImplementedError` raised by a line of hf_kvquant."""
    if not isinstance(error, (ValueError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(str(Path(hf_kvquant.__file__).parent))


def _inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, PROMPT), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :PADDING] = 0
    return input_ids.to(device), attention_mask.to(device)


def _generate(model, cache, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[batch, NEW_TOKENS]`` and their logits ``[batch, NEW_TOKENS, vocab]``."""
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, disable_compile=True,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1).float()


def _teacher_forced(model, cache, sequences, attention_mask) -> torch.Tensor:
    """Logits ``[batch, tokens, vocab]``: the prompt as one forward, then the generated tokens as one chunk. Padding
    positions are zeroed (what attention gives a query that sees no key is not defined alike everywhere)."""
    with torch.no_grad():
        first = model(sequences[:, :PROMPT], attention_mask=attention_mask[:, :PROMPT], cache=cache).logits
        second = model(sequences[:, PROMPT:], attention_mask=attention_mask, cache=cache).logits
    return torch.cat([first, second], dim=1).float() * attention_mask[:, :, None]


def _holds_keys(cache) -> bool:
    return any(isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel() > 0
               for layer in cache.layers)


def _compare(what: str, ours: torch.Tensor, reference: torch.Tensor, tolerance: float, tokens=None,
             reference_tokens=None) -> float:
    """The largest logit error relative to max(1, |reference|); raises AssertionError where it exceeds ``tolerance``,
    or where a greedy token differs without a near tie (the two best logits within twice the tolerance) to flip."""
    steps = ours.shape[1]
    if tokens is not None and not torch.equal(tokens, reference_tokens):
        # The logits are compared up to and including the step of the first flipped token.
        row, step = (tokens != reference_tokens).nonzero()[0].tolist()
        top2 = reference[row, step].topk(2).values
        if (top2[0] - top2[1]).item() > 2 * tolerance * max(1.0, top2[0].abs().item()):
            raise AssertionError(f"{what}: greedy token {step} of row {row} is {tokens[row, step].item()}, the "
                                 f"fake-quant reference's is {reference_tokens[row, step].item()} (no tie)")
        steps = step + 1
    scale = max(1.0, reference[:, :steps].abs().max().item())
    error = (ours[:, :steps] - reference[:, :steps]).abs().max().item() / scale
    if not error <= tolerance:  # NaN fails too
        raise AssertionError(f"{what}: logits differ from the reference by {error:.2e} (relative; tolerance "
                             f"{tolerance:.0e})")
    return error


def _ours(model, mode: KVQuantMode, max_cache_len: int | None = None) -> QuantizedPerTokenHeadCache:
    try:
        return QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=max_cache_len)
    except (ValueError, NotImplementedError) as e:
        if raised_by_hf_kvquant(e):
            raise Refused(str(e)) from e
        raise


@dataclass
class _Outputs:
    tokens: torch.Tensor  # greedy tokens [batch, NEW_TOKENS]
    logits: torch.Tensor  # their logits [batch, NEW_TOKENS, vocab]
    forced: torch.Tensor | None  # teacher-forced logits [batch, PROMPT + NEW_TOKENS, vocab], or None (not run)


def _run(model, attention: str, new_cache, input_ids, attention_mask, sequences=None, mask=None) -> _Outputs:
    """Generate, then (given ``sequences``) teacher-force, each with a fresh ``new_cache()``, under ``attention``.
    A refusal of hf_kvquant is raised as `Refused`."""
    model.set_attn_implementation(attention)
    try:
        tokens, logits = _generate(model, new_cache(), input_ids, attention_mask)
        forced = None if sequences is None else _teacher_forced(model, new_cache(), sequences, mask)
    except (ValueError, NotImplementedError) as e:
        if raised_by_hf_kvquant(e):
            raise Refused(str(e)) from e
        raise
    return _Outputs(tokens, logits, forced)


def _run_name(attention: str, mode: KVQuantMode, preallocated: bool) -> str:
    return f"{mode.value.split('_')[0].upper()}{' preallocated' if preallocated else ''} under {attention} attention"


def _static_failure(model, attention: str, input_ids, attention_mask, sequences, mask) -> str | None:
    """How transformers fails with its own `StaticCache` under ``attention`` in the same runs, or None."""
    try:
        _run(model, attention, lambda: StaticCache(config=model.config, max_cache_len=MAX_CACHE_LEN), input_ids,
             attention_mask, sequences, mask)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' own cache is the answer
        return _describe(e)
    return None


def _static_failure_on_cpu(name: str, attention: str, *tensors) -> str | None:
    """`_static_failure` of the same model on the CPU. On a GPU a failing StaticCache run can end in a device-side
    assert (an index out of bounds), which leaves the process unable to run anything more."""
    model = build_model(name)
    model.set_attn_implementation(attention)
    return _static_failure(model, attention, *(None if t is None else t.cpu() for t in tensors))


def _check(what: str, ours: _Outputs, reference: _Outputs, tolerance: float) -> float:
    error = _compare(f"{what} (generate)", ours.logits, reference.logits, tolerance, ours.tokens, reference.tokens)
    if reference.forced is not None:
        error = max(error, _compare(f"{what} (teacher-forced)", ours.forced, reference.forced, tolerance))
    return error


def run_architecture(name: str, device: str = "cpu") -> ZooResult:
    """Build ``name`` tiny on ``device``, run it, and classify it (see the module docstring). On a GPU, hf_kvquant's
    attention runs its Triton kernel (float32 queries: exact FMA dots), so the same checks hold the kernel to the
    fake-quant reference. Raises AssertionError on a mismatch, and lets any other error of a run with our cache
    propagate (a crash where DynamicCache works).

    The runs, each a greedy generation and a teacher-forced forward (over the tokens the plain cache generated):

    * a plain `DynamicCache` under the default attention: where it fails, transformers fails, and the architecture is
      skipped (the teacher-forced part alone is left out where only it fails);
    * for INT8 under the default attention, and INT8 and FP8 under hf_kvquant's: `QuantizedPerTokenHeadCache` against
      `FakeQuantCache` under the same attention (the same rounded keys and values through the same attention code:
      equal up to float32 summation order, with no rounding flip between the two);
    * a plain `DynamicCache` under hf_kvquant's attention against the default attention: hf_kvquant's attention
      computes what the model's own does (sinks, windows, chunks, masks), without quantization in the way.
    """
    start = time.perf_counter()
    try:
        model = build_model(name, device)
    except Exception as e:  # noqa: BLE001 - transformers cannot build the tiny config
        return ZooResult(name, "skipped", f"the tiny config does not build: {_describe(e)}")
    default_attention = model.config._attn_implementation
    try:
        layer_types = [type(layer).__name__ for layer in _ours(model, INT8).layers]
    except Refused as e:  # the cache cannot serve this model at all: say why, whatever transformers does with it
        return ZooResult(name, "refused", str(e), seconds=time.perf_counter() - start)
    input_ids, attention_mask = _inputs(device)

    def plain():
        return DynamicCache(config=model.config)

    try:
        plain_default = _run(model, default_attention, plain, input_ids, attention_mask)
        cache = plain()
        _generate(model, cache, input_ids, attention_mask)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' own cache is the answer
        return ZooResult(name, "skipped", f"transformers fails with DynamicCache: {_describe(e)}")
    if not _holds_keys(cache):
        return ZooResult(name, "skipped", "keeps no keys and values in the cache it is given (its own state)")
    sequences = torch.cat([input_ids, plain_default.tokens], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(plain_default.tokens)], dim=1)
    try:
        plain_default.forced = _teacher_forced(model, plain(), sequences, mask)
    except Exception:  # noqa: BLE001 - transformers cannot continue its own cache by a chunk: generation only
        sequences = mask = None

    result = ZooResult(name, "supported", layer_types=layer_types)
    refusals, notes = {}, []
    static_failures_on_cpu = {}  # per attention (whatever the mode): asked once
    try:
        for attention, mode, preallocated in RUNS:
            run = _run_name(attention, mode, preallocated)
            attention = default_attention if attention == "default" else attention
            length = MAX_CACHE_LEN if preallocated else None
            if preallocated and device != "cpu":
                if attention not in static_failures_on_cpu:
                    static_failures_on_cpu[attention] = _static_failure_on_cpu(
                        name, attention, input_ids, attention_mask, sequences, mask)
                if failure := static_failures_on_cpu[attention]:
                    notes.append(f"{run} left out: transformers' StaticCache fails: {failure}")
                    continue
            if preallocated:
                def reference_cache(mode=mode):
                    return FakeQuantStaticCache(model.config, mode, MAX_CACHE_LEN)
            else:
                def reference_cache(mode=mode):
                    return FakeQuantCache(model.config, mode)
            try:
                reference = _run(model, attention, reference_cache, input_ids, attention_mask, sequences, mask)
            except Refused as e:  # hf_kvquant's attention refuses the model, whatever the cache
                refusals[run] = str(e)
                continue
            except Exception as e:
                if preallocated and (failure := _static_failure(model, attention, input_ids, attention_mask,
                                                                sequences, mask)):
                    notes.append(f"{run} left out: transformers' StaticCache fails: {failure}")
                    continue
                raise AssertionError(f"{name}: the fake-quant reference of {run} fails where transformers' own cache "
                                     "works") from e
            try:
                ours = _run(model, attention, lambda mode=mode, length=length: _ours(model, mode, length), input_ids,
                            attention_mask, sequences, mask)
            except Refused as e:
                refusals[run] = str(e)
                continue
            error = _check(f"{name}, {run}", ours, reference, QUANTIZED_TOLERANCE[torch.device(device).type])
            result.errors[run] = error
            result.max_logit_error = max(result.max_logit_error, error)
        run = "hf_kvquant attention over DynamicCache"
        try:
            plain_ours = _run(model, ATTENTION_NAME, plain, input_ids, attention_mask, sequences, mask)
            error = _check(f"{name}, {run} against the default attention", plain_ours, plain_default,
                           UNQUANTIZED_TOLERANCE)
            result.errors[run] = error
            result.max_logit_error = max(result.max_logit_error, error)
        except Refused as e:
            refusals[run] = str(e)
    finally:
        model.set_attn_implementation(default_attention)
    if refusals:
        reasons = {}
        for run, reason in refusals.items():
            reasons.setdefault(reason, []).append(run)
        result.status = "refused"
        result.reason = "; ".join(f"{', '.join(runs)}: {reason}" for reason, runs in reasons.items())
        if _run_name(*RUNS[0]) not in refusals:
            result.reason += " (the INT8 cache under the default attention matches)"
    result.reason = "; ".join([result.reason, *notes]) if result.reason else "; ".join(notes)
    result.seconds = time.perf_counter() - start
    return result


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


# -- the table ---------------------------------------------------------------------------------------------------------


def write_table(results: list[ZooResult], path: Path = RESULTS) -> str:
    """Write the summary and one row per architecture to ``path`` (markdown); return the summary line."""
    counts = {status: sum(r.status == status for r in results) for status in ("supported", "refused", "skipped")}
    summary = (f"{len(results)} decoder-only architectures of transformers {transformers.__version__}: "
               f"{counts['supported']} supported, {counts['refused']} refused with a reason, {counts['skipped']} "
               "skipped (transformers itself fails on the tiny config, or the model keeps no KV cache)")
    lines = ["# The architecture zoo", "", "Written by `python eval/zoo.py` (tests/test_zoo.py runs the same checks).",
             "", summary + ".", "",
             ("Each model is built from a tiny random config (float32, CPU: 2 layers or one of each layer type, "
              "heads of 64, windows and chunks of 4 tokens) and generates greedily for a left-padded batch of 2, then "
              "runs teacher-forced, with QuantizedPerTokenHeadCache: INT8 growable and preallocated under the "
              "model's default attention, INT8 and FP8 growable and FP8 preallocated under hf_kvquant's (its "
              "plain-PyTorch path on the CPU), each against a transformers cache holding the same rounded keys and "
              "values under the same attention; and hf_kvquant's attention against the model's own over a plain "
              "DynamicCache. *error* is the largest logit difference relative to the largest logit; *cache layers* "
              "are the layer classes of QuantizedPerTokenHeadCache for the model."), "",
             "| architecture | status | error | cache layers | reason |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.status, r.name)):
        layers = ", ".join(dict.fromkeys(r.layer_types))
        error = f"{r.max_logit_error:.0e}" if r.status == "supported" else ""
        reason = re.split(r"; accepted:|\. Load it with|; its state is not", r.reason)[0]
        lines.append(f"| {r.name} | {r.status} | {error} | {layers} | {reason.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="architectures (default: all decoder-only ones)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not write {RESULTS}")
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: hf_kvquant's attention through "
                        "its Triton kernel); the table is written for the CPU and the default head_dim only")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM,
                        help=f"channels per attention head (default {HEAD_DIM}; hidden size = 4 heads of it)")
    args = parser.parse_args()
    if args.head_dim < 1:
        parser.error(f"--head-dim must be a positive number of channels; got {args.head_dim}")
    try:
        torch.device(args.device)
    except RuntimeError as e:  # else every architecture would read as skipped, its tiny config "not building"
        parser.error(f"--device {args.device!r} is not a torch device: {e}")
    if args.head_dim != HEAD_DIM:
        for key in ("head_dim", "swa_head_dim"):
            TINY[key] = args.head_dim
        for key in ("hidden_size", "n_embd", "d_model", "embedding_dim"):
            TINY[key] = 4 * args.head_dim
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    results = []
    for name in args.names or decoder_only_architectures():
        try:
            result = run_architecture(name, args.device)
        except Exception as e:  # noqa: BLE001 - tests/test_zoo.py fails on it; the script lists it and goes on
            result = ZooResult(name, "FAILED", _describe(e))
        results.append(result)
        print(f"{name:28s} {result.status:9s} {result.seconds:5.2f}s {result.max_logit_error:7.1e} "
              f"{result.reason[:100]}", flush=True)
    if args.names or args.no_write or args.device != "cpu" or args.head_dim != HEAD_DIM:
        return
    print(write_table(results))


if __name__ == "__main__":
    main()
