"""hf_kvquant's attention inside transformers: registration, the mask it receives, its fallbacks, and models run with
``attn_implementation=ATTENTION_NAME`` against transformers' eager attention over the same quantized cache.

On CPU the registered function takes its plain-PyTorch path (the Triton kernel itself is held to the reference in
test_attention.py; inside model code it runs on the GPU below)."""

import copy
import warnings

import pytest
import torch
from conftest import requires_cuda
from transformers import AttentionInterface, CompileConfig, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import hf_kvquant
from hf_kvquant import ATTENTION_NAME, KVQuantMode, QuantizedPerTokenHeadCache
from hf_kvquant import integration as attention_module


def test_registered_under_one_name():
    assert ATTENTION_NAME == "hf_kvquant"
    assert AttentionInterface._global_mapping[ATTENTION_NAME] is hf_kvquant.hf_kvquant_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[ATTENTION_NAME] is attention_module.padding_mask


def test_padding_mask_is_the_visible_suffix_of_the_2d_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(attention_module.padding_mask(2, 1, 4, attention_mask=mask), mask[:, 2:])
    assert attention_module.padding_mask(2, 1, 4, attention_mask=None) is None


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return LlamaForCausalLM(config).eval()


def test_one_warning_per_reason_and_fallback_on_a_cache_that_is_not_ours(monkeypatch):
    monkeypatch.setattr(attention_module, "_warned", set())
    model = _tiny_llama()
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(tokens, cache=DynamicCache(config=model.config)).logits
        model.set_attn_implementation(ATTENTION_NAME)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(tokens, cache=DynamicCache(config=model.config)).logits
            model(tokens, cache=DynamicCache(config=model.config))
    messages = [str(w.message) for w in caught if "hf_kvquant attention" in str(w.message)]
    assert len(messages) == 1 and "not QuantizedKV" in messages[0]
    assert torch.allclose(got, expected, atol=1e-5)


def _logits(model, implementation, input_ids, attention_mask, mode, steps=6):
    """Prefill a (padded) batch, then decode greedily from the eager run's tokens, with a quantized cache."""
    model.set_attn_implementation(implementation)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode)
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, cache=cache)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            next_token = logits[-1].argmax(-1, keepdim=True)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            logits.append(model(next_token, attention_mask=attention_mask, cache=cache).logits[:, -1])
    return torch.stack(logits, dim=1).float()


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_smollm2_left_padded_batch_matches_eager(smollm2, mode):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["The capital of France is", "Once upon a time, in a small village near the mountains,"],
                      return_tensors="pt", padding=True)
    assert not batch.attention_mask.all()  # the batch really is padded
    eager = _logits(model, "eager", batch.input_ids, batch.attention_mask, mode)
    ours = _logits(model, ATTENTION_NAME, batch.input_ids, batch.attention_mask, mode)
    model.set_attn_implementation("sdpa")
    # Same math in float32: equal up to summation order (a flipped rounding in a later layer would show as more).
    assert (ours - eager).abs().max().item() <= 1e-3 * eager.abs().max().item()


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_gemma3_sliding_window_layers_match_eager_past_the_window(mode):
    """A small random Gemma 3 (sliding window 16, head_dim 256, custom scaling) decoded token by token well past
    its window: the registered attention equals eager attention over the same quantized cache."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=16,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    input_ids = torch.randint(0, 128, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding in row 0
    eager = _logits(model, "eager", input_ids, attention_mask, mode, steps=30).log_softmax(-1)
    ours = _logits(model, ATTENTION_NAME, input_ids, attention_mask, mode, steps=30).log_softmax(-1)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 1e-5, kl.max().item()


def _tiny_gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=2,
                          num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # sinks that matter: some heads give them most of the weight
    return model


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_attention_sinks_match_eager_over_the_same_cache(mode):
    """gpt-oss passes one sink logit per query head (``s_aux``): it joins each row's softmax denominator. Through
    hf_kvquant's attention the teacher-forced distributions equal transformers' eager attention over the same
    quantized cache (prefill and decode, sliding window included), and differ clearly when the sinks are dropped."""
    model = _tiny_gpt_oss()
    input_ids = torch.randint(0, 128, (2, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    eager = _logits(model, "eager", input_ids, attention_mask, mode, steps=12).log_softmax(-1)
    ours = _logits(model, ATTENTION_NAME, input_ids, attention_mask, mode, steps=12).log_softmax(-1)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 1e-5, kl.max().item()
    for layer in model.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)  # the same model with sinks of no weight: far from the real answer
    no_sinks = _logits(model, ATTENTION_NAME, input_ids, attention_mask, mode, steps=12).log_softmax(-1)
    assert (eager.exp() * (eager - no_sinks)).sum(-1).mean().item() > 100 * max(kl.max().item(), 1e-7)


def test_sinks_of_another_shape_are_refused():
    query = torch.zeros(1, 4, 3, 64)
    per_token = torch.zeros(1, 4, 3, 1)  # one sink per token, as some models compute them
    with pytest.raises(NotImplementedError, match="one attention-sink logit per query head.*'sinks' of shape"):
        hf_kvquant.hf_kvquant_attention(None, query, torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64), None,
                                        sinks=per_token)


def _teacher_forced_logprobs(model, tokens, attn_implementation, mode, hadamard=False):
    """Prefill 40 tokens, then feed the rest one token per step, with the quantized cache in the loop."""
    model.set_attn_implementation(attn_implementation)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode, hadamard=hadamard)
    with torch.no_grad():
        logits = [model(tokens[:, :40], cache=cache).logits]
        for i in range(40, tokens.shape[1]):
            logits.append(model(tokens[:, i : i + 1], cache=cache).logits)
    return torch.cat(logits, dim=1).float().log_softmax(-1)


@requires_cuda
@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_registered_attention_matches_eager_in_the_model(mode, arch, hadamard):
    """The Triton attention inside real model code (GQA; Gemma 3's sliding window, scaling) against transformers'
    eager attention over the same quantized cache, teacher-forced past the window. With ``hadamard`` the kernel reads
    rotated K/V with a rotated query, eager the un-rotated dequantized copies."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import hf_kvquant

    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=64)
        model = LlamaForCausalLM(config)
    else:
        config = Gemma3TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=16,
                                  layer_types=["sliding_attention"] * 3 + ["full_attention"])
        model = Gemma3ForCausalLM(config)
    model = model.cuda().eval()
    tokens = torch.randint(0, 256, (2, 90), device="cuda")
    eager = _teacher_forced_logprobs(model, tokens, "eager", mode, hadamard)
    ours = _teacher_forced_logprobs(model, tokens, hf_kvquant.ATTENTION_NAME, mode, hadamard)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 5e-3, kl.max().item()


# -- compiled decoding over a preallocated cache ----------------------------------------------------------------------


def _tiny_model(arch: str, attention: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    if arch == "llama":
        model = _tiny_llama()
    else:  # hybrid: sliding-window layers (window 6, shorter than the prompt) and a full one
        config = Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        model = Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation(attention)
    return model


def _generate(model, input_ids, attention_mask, cache, compiled: bool, new_tokens: int = 24):
    if compiled:
        config = CompileConfig(fullgraph=True, backend="eager")  # dynamo's whole trace, without a compiler on CPU
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        options = dict(compile_config=config)
    else:
        options = dict(disable_compile=True)
    with torch.no_grad():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)


COMPILE_CASES = [  # (arch, attention, mode, hadamard)
    ("llama", ATTENTION_NAME, "int8", False),
    ("llama", ATTENTION_NAME, "fp8", False),
    ("llama", ATTENTION_NAME, "int8", True),
    ("llama", "sdpa", "int8", False),
    ("gemma3", ATTENTION_NAME, "fp8", False),
    ("gemma3", "sdpa", "int8", True),
]


@pytest.mark.parametrize("arch, attention, mode, hadamard", COMPILE_CASES)
def test_compiled_generate_equals_eager_in_one_graph(arch, attention, mode, hadamard):
    """`generate` compiles the decode step over a preallocated cache by itself (``is_compileable``): with dynamo's
    whole-graph trace the tokens equal eager decoding over the same kind of cache, in one graph for all 24 steps, with
    no graph break; a `reset` cache serves the next call without compiling again."""
    from torch._dynamo.utils import counters

    model = _tiny_model(arch, attention)
    input_ids = torch.randint(1, 128, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # a left-padded row
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=40, hadamard=hadamard)
    assert cache.is_compileable
    eager = _generate(model, input_ids, attention_mask, copy.deepcopy(cache), compiled=False)

    torch._dynamo.reset()
    counters.clear()
    compiled = _generate(model, input_ids, attention_mask, cache, compiled=True)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

    cache.reset()
    other = torch.randint(1, 128, (2, 9))
    again = _generate(model, other, attention_mask, cache, compiled=True)
    assert torch.equal(again, _generate(model, other, attention_mask,
                                        QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=40,
                                                                   hadamard=hadamard), compiled=False))
    assert counters["stats"]["unique_graphs"] == 1, "the reset cache recompiled"


def test_preallocated_cache_too_small_is_refused_and_left_unchanged():
    model = _tiny_model("llama", ATTENTION_NAME)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8", max_cache_len=12)
    with pytest.raises(ValueError, match="13 new tokens exceed this cache's max_cache_len=12"):
        model(torch.randint(1, 128, (1, 13)), cache=cache)
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    model(torch.randint(1, 128, (1, 10)), cache=cache)
    with pytest.raises(ValueError, match="13 tokens exceed this cache's max_cache_len=12"):
        model(torch.randint(1, 128, (1, 3)), cache=cache)
    assert int(cache.get_seq_length()) == 10


@requires_cuda
@pytest.mark.parametrize("attention, mode", [(ATTENTION_NAME, "int8"), (ATTENTION_NAME, "fp8"), ("sdpa", "int8")])
def test_compiled_generate_on_the_gpu_equals_eager(attention, mode):
    """On the GPU, as users run it: `generate` compiles by itself (inductor, CUDA graphs) over the preallocated cache;
    64 greedy tokens equal eager decoding's over the same kind of cache (the same kernels run in both), and a reset
    cache runs the next call without compiling again."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(attention)
    input_ids = torch.randint(1, 256, (2, 40), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    options = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=64,
                   min_new_tokens=64)

    def new_cache():
        return QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=128)

    with torch.no_grad():
        eager = model.generate(cache=new_cache(), disable_compile=True, **options)
        torch._dynamo.reset()
        counters.clear()
        cache = new_cache()
        compiled = model.generate(cache=cache, **options)
        graphs = counters["stats"]["unique_graphs"]
        cache.reset()
        again = model.generate(cache=cache, **options)
    assert graphs == 1 and not counters["graph_break"], (dict(counters["stats"]), dict(counters["graph_break"]))
    assert torch.equal(compiled, eager)
    assert torch.equal(again, eager)
    assert counters["stats"]["unique_graphs"] == graphs, "the reset cache recompiled"


@pytest.mark.parametrize("arch", ["diffllama", "jetmoe"])
def test_models_that_transform_the_cached_keys_and_values_get_tensors(arch, monkeypatch):
    """Some models reshape, split or repeat what `update` returns before attention sees it: under hf_kvquant's
    attention they get the dequantized tensors there (not an AttributeError deep inside the model), and their outputs
    equal eager attention's over the same quantized cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_kvquant.quantized_kv

    monkeypatch.setattr(hf_kvquant.quantized_kv, "_warned_dequantized", False)  # warned once per process
    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, 128, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    eager = _logits(model, "eager", input_ids, attention_mask, "int8").log_softmax(-1)
    with pytest.warns(UserWarning, match="transforms the cached keys or values"):
        ours = _logits(model, ATTENTION_NAME, input_ids, attention_mask, "int8").log_softmax(-1)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 1e-5, kl.max().item()
