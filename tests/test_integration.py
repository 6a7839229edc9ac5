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


@requires_cuda
@pytest.mark.parametrize("attention", [ATTENTION_NAME, "sdpa"])
def test_compiled_generate_past_the_window_on_the_gpu(attention):
    """A sliding-window model on the GPU (Gemma 3's layout, windows of 32 tokens): the preallocated cache holds one
    window on its sliding layers (a ring), and `generate` compiled by itself (inductor, CUDA graphs) decodes 64 tokens
    past the window in one graph, equal to eager decoding over the same kind of cache."""
    from torch._dynamo.utils import counters
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=32,
                              layer_types=["sliding_attention"] * 3 + ["full_attention"])
    model = Gemma3ForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(attention)
    input_ids = torch.randint(1, 256, (2, 40), device="cuda")  # a prompt longer than the window
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    options = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=64,
                   min_new_tokens=64)

    def new_cache():
        return QuantizedPerTokenHeadCache(config=model.config, mode="int8", max_cache_len=128)

    with torch.no_grad():
        eager = model.generate(cache=new_cache(), disable_compile=True, **options)
        torch._dynamo.reset()
        counters.clear()
        cache = new_cache()
        compiled = model.generate(cache=cache, **options)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])
    assert torch.equal(compiled, eager)
    assert [layer.capacity for layer in cache.layers] == [32, 32, 32, 128]


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


# -- any head size and MLA, end to end --------------------------------------------------------------------------------


class _FakeQuantCache(DynamicCache):
    """The reference: a `DynamicCache` holding each update's keys and values rounded as `QuantizedPerTokenHeadCache`
    rounds them (quantize -> dequantize per token-head; with ``hadamard``, rotated by the Hadamard matrix of each
    tensor's own head_dim and back), in full precision."""

    def __init__(self, config, mode, hadamard):
        super().__init__(config=config)
        self.mode, self.hadamard = KVQuantMode.parse(mode), hadamard

    def _round(self, x):
        from hf_kvquant.ops.reference import dequantize, quantize_reference
        from hf_kvquant.rotation import hadamard_matrix, rotate, unrotate

        if not self.hadamard:
            return dequantize(*quantize_reference(x, self.mode), x.dtype)
        r = hadamard_matrix(x.shape[-1], x.device)
        return unrotate(dequantize(*quantize_reference(rotate(x, r), self.mode), torch.float32), r).to(x.dtype)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(self._round(key_states), self._round(value_states), layer_idx, *args, **kwargs)


def _tiny_mla_or_phi(arch):
    """DeepSeek-V3 (MLA: the cache gets one head of a 32-channel latent as keys and of the 8-channel rotary part as
    values) or phi-2 shaped (head_dim 160 / 2 = 80, partial rotary), random, float32."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    if arch == "deepseek_v3":
        config = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                                  kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=1, n_group=1, topk_group=1)
        return DeepseekV3ForCausalLM(config).eval()
    config = PhiConfig(vocab_size=128, hidden_size=160, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2)
    return PhiForCausalLM(config).eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("arch", ["deepseek_v3", "phi"])
@pytest.mark.parametrize("attention", ["sdpa", ATTENTION_NAME])
@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_mla_and_head_dim_80_generate_as_the_fake_quant_reference(device, arch, attention, mode, hadamard):
    """Greedy generation of a left-padded batch: our cache gives the tokens, and the logits, of a plain cache holding
    the same rounded keys and values (on a GPU, phi-2 under hf_kvquant's attention runs the Triton kernel at head_dim
    80; DeepSeek-V3 transforms its cached latents, so it attends to dequantized tensors).

    On the CPU without the rotation the numbers are the same (bit for bit here). With it, the cache un-rotates a whole
    window at once where the reference un-rotates each update: float32 products of d <= 80 terms, which differ by about
    sqrt(d) * 2**-24 ~ 1e-6 of the keys and values; through two layers of about unit gain that stays under 1e-5 of the
    logits. On the GPU the kernel sums in another order than SDPA (float32 both): the same size of difference, once per
    layer and step; 1e-4 is allowed there. Quantizing at all moves the logits by 3e-3 to 0.7 (checked below: the
    comparison can fail)."""
    model = _tiny_mla_or_phi(arch).to(device)
    model.set_attn_implementation(attention)
    input_ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0

    def run(cache):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CPU and dequantized-hand-over fallbacks say what they do
            out = model.generate(input_ids, attention_mask=attention_mask, cache=cache, max_new_tokens=8,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits)

    ours = QuantizedPerTokenHeadCache(config=model.config, mode=mode, hadamard=hadamard)
    tokens, logits = run(ours)
    expected_tokens, expected = run(_FakeQuantCache(model.config, mode, hadamard))
    if arch == "deepseek_v3":
        assert ours.layers[0].head_dims == (32, 8)  # kv_lora_rank, qk_rope_head_dim
    else:
        assert ours.layers[0].head_dims == (80, 80)
    allowed = (1e-5 if device == "cpu" else 1e-4) * max(1.0, expected.abs().max().item())
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected).abs().max().item() <= allowed
    _, unquantized = run(DynamicCache(config=model.config))
    assert (unquantized - expected).abs().max().item() > 10 * allowed


# -- hybrid models, chunked attention, layer types and features hf_kvquant refuses ------------------------------------


def _zoo():
    """eval/zoo.py: the tiny-model builder and fake-quant references of the architecture zoo."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
    import zoo

    return zoo


def _zoo_model(name: str):
    """A tiny random model of ``name`` from eval/zoo.py's builder (float32, eval mode)."""
    return _zoo().build_model(name)


def _forced_steps(model, attention, cache, input_ids, attention_mask, next_tokens):
    """Last-position logits ``[batch, 1 + steps, vocab]``: a prefill, then ``next_tokens [batch, steps]`` one per step
    (the same tokens for every implementation compared)."""
    model.set_attn_implementation(attention)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallbacks say what they do
        logits = [model(input_ids, attention_mask=attention_mask, cache=cache).logits[:, -1]]
        for token in next_tokens.T:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None])], dim=1)
            logits.append(model(token[:, None], attention_mask=attention_mask, cache=cache).logits[:, -1])
    return torch.stack(logits, dim=1).float()


def _padded_batch(length=9, steps=6, vocab=128):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, vocab, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    return input_ids, attention_mask, torch.randint(3, vocab, (2, steps), generator=generator)


@pytest.mark.parametrize("arch, expected", [
    ("qwen3_next", ["LinearAttentionLayer", "QuantizedPerTokenHeadLayer"]),  # gated delta net + attention
    ("lfm2", ["LinearAttentionLayer", "QuantizedPerTokenHeadLayer"]),  # short convolution + attention
    ("falcon_h1", ["QuantizedHybridLayer"] * 2),  # Mamba and attention side by side in each layer
    ("jamba", ["LinearAttentionLayer", "QuantizedPerTokenHeadLayer"]),
])
@pytest.mark.parametrize("max_cache_len", [None, 24], ids=["growable", "preallocated"])
def test_hybrid_models_quantize_attention_and_keep_states_in_transformers_layers(arch, expected, max_cache_len):
    """The attention layers of a hybrid model are quantized; its convolution / recurrent states live in transformers'
    own `LinearAttentionLayer` (as in `DynamicCache(config=...)`), or beside the quantized keys and values in one layer.
    Prefill and decode give the logits of a transformers cache (preallocated alike) holding the same rounded keys and
    values (exact: the same values through the same attention code), and clearly not those of an unquantized one."""
    from hf_kvquant.cache import QuantizedHybridLayer, QuantizedStaticHybridLayer

    model = _zoo_model(arch)
    input_ids, attention_mask, next_tokens = _padded_batch()
    cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8", max_cache_len=max_cache_len)
    names = [type(layer).__name__ for layer in cache.layers]
    if max_cache_len is not None:  # the preallocated classes
        expected = [{"QuantizedPerTokenHeadLayer": "QuantizedPerTokenHeadStaticLayer",
                     "QuantizedHybridLayer": "QuantizedStaticHybridLayer"}.get(name, name) for name in expected]
    assert names == expected
    assert all(isinstance(layer, (QuantizedHybridLayer, QuantizedStaticHybridLayer)) == ("Hybrid" in name)
               for layer, name in zip(cache.layers, names))
    zoo = _zoo()
    if max_cache_len is None:
        reference_cache = zoo.FakeQuantCache(model.config, KVQuantMode.INT8_PER_TOKEN_HEAD)
    else:
        reference_cache = zoo.FakeQuantStaticCache(model.config, KVQuantMode.INT8_PER_TOKEN_HEAD, max_cache_len)
    ours = _forced_steps(model, "sdpa", cache, input_ids, attention_mask, next_tokens)
    reference = _forced_steps(model, "sdpa", reference_cache, input_ids, attention_mask, next_tokens)
    unquantized = _forced_steps(model, "sdpa", DynamicCache(config=model.config), input_ids, attention_mask,
                                next_tokens)
    allowed = 1e-5 * max(1.0, reference.abs().max().item())
    assert (ours - reference).abs().max().item() <= allowed
    assert (unquantized - reference).abs().max().item() > 10 * allowed
    assert cache.get_seq_length() == input_ids.shape[1] + next_tokens.shape[1]


def _hybrid_cache_after_a_prefill(arch: str):
    model = _zoo_model(arch)
    input_ids, attention_mask, _ = _padded_batch()
    cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8")
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, cache=cache)
    return model, cache


def test_hybrid_layers_reorder_repeat_select_and_reset_keys_values_and_states_together():
    """falcon_h1's layers hold a Mamba state (convolution + recurrent) and quantized keys and values: beam reordering,
    batch repetition and selection move both alike, and `reset` empties both."""
    _, cache = _hybrid_cache_after_a_prefill("falcon_h1")
    layer = cache.layers[0]
    key_rows = layer.key_data.clone()
    conv, recurrent = layer.conv_states[0].clone(), layer.recurrent_states[0].clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.key_data.view(torch.uint8), key_rows.flip(0).view(torch.uint8))
    assert torch.equal(layer.conv_states[0], conv.flip(0)) and torch.equal(layer.recurrent_states[0], recurrent.flip(0))
    cache.batch_repeat_interleave(2)
    assert layer.key_data.shape[0] == layer.conv_states[0].shape[0] == layer.recurrent_states[0].shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.conv_states[0], conv.flip(0)) and torch.equal(layer.recurrent_states[0], recurrent.flip(0))
    assert torch.equal(layer.key_data[:, :, : layer.stored].view(torch.uint8),
                       key_rows.flip(0)[:, :, : layer.stored].view(torch.uint8))
    assert "states=1" in repr(layer)
    cache.reset()
    assert cache.get_seq_length() == 0 and not layer.is_initialized
    assert not layer.has_previous_state[0] and not layer.conv_states[0].any() and not layer.recurrent_states[0].any()


@pytest.mark.parametrize("arch, message", [
    ("falcon_h1", "recurrent state"),  # a recurrent state holds no past to roll back to
    ("lfm2", "activate_past_recording"),  # a convolution state does, while recording it
])
def test_crop_refuses_what_a_state_cannot_roll_back_and_changes_nothing(arch, message):
    """transformers' `LinearAttentionLayer.crop` leaves a recurrent state as it is: a rollback would silently keep the
    removed tokens' effect. The cache refuses before cropping any layer."""
    _, cache = _hybrid_cache_after_a_prefill(arch)
    held = cache.get_seq_length()
    with pytest.raises(RuntimeError, match=message):
        cache.crop(-2)
    assert cache.get_seq_length() == held
    assert all(layer.get_seq_length() == held for layer in cache.layers if hasattr(layer, "stored"))


def test_crop_of_a_recorded_convolution_state_rolls_back_like_transformers():
    """lfm2 (convolution + attention) recording the past, as assisted decoding does: cropping two tokens gives the
    logits of never having fed them."""
    model = _zoo_model("lfm2")
    input_ids, attention_mask, next_tokens = _padded_batch()
    full_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8")
    cache.activate_past_recording()
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, cache=cache)
        model(next_tokens[:, :4], attention_mask=full_mask[:, : input_ids.shape[1] + 4], cache=cache)
        cache.crop(-2)
        again = model(next_tokens[:, 2:3], attention_mask=full_mask[:, : input_ids.shape[1] + 3], cache=cache).logits
        fresh = QuantizedPerTokenHeadCache(config=model.config, mode="int8")
        model(input_ids, attention_mask=attention_mask, cache=fresh)
        model(next_tokens[:, :2], attention_mask=full_mask[:, : input_ids.shape[1] + 2], cache=fresh)
        expected = model(next_tokens[:, 2:3], attention_mask=full_mask[:, : input_ids.shape[1] + 3], cache=fresh).logits
    assert cache.get_seq_length() == input_ids.shape[1] + 3
    assert (again - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_hybrid_states_are_not_saved_and_a_cache_without_config_says_what_it_lacks(tmp_path):
    model, cache = _hybrid_cache_after_a_prefill("qwen3_next")
    with pytest.raises(NotImplementedError, match="convolution and recurrent states of hybrid models"):
        cache.save(tmp_path / "hybrid.safetensors")
    input_ids, attention_mask, _ = _padded_batch()
    with pytest.raises(ValueError, match="keeps a convolution or recurrent state .* build it with config=model.config"):
        model(input_ids, attention_mask=attention_mask, cache=QuantizedPerTokenHeadCache(mode="int8"))


@pytest.mark.parametrize("arch, message", [
    ("deepseek_v32", "layer type 'indexed_attention': indexed attention"),
    ("glm_moe_dsa", "layer type 'indexed_attention': indexed attention"),
    ("deepseek_v4", "compressed attention"),
    ("mamba", "no attention layer whose keys and values could be quantized"),
])
def test_layer_types_hf_kvquant_cannot_serve_are_refused_at_construction(arch, message):
    from transformers import AutoConfig

    config = AutoConfig.for_model(arch)  # the full-size default config: nothing is allocated
    with pytest.raises(ValueError, match=message):
        QuantizedPerTokenHeadCache(config=config, mode="int8")
    with pytest.raises(ValueError, match=message):
        QuantizedPerTokenHeadCache(config=config, mode="fp8", max_cache_len=64)


def test_an_unknown_layer_type_is_refused_by_name():
    config = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "minimax_m3_sparse"])
    with pytest.raises(ValueError, match="layer type 'minimax_m3_sparse': is not supported .* accepted:"):
        QuantizedPerTokenHeadCache(config=config)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("max_cache_len", [None, 24], ids=["growable", "preallocated"])
def test_chunked_attention_matches_eager_over_the_same_cache(mode, max_cache_len):
    """Llama 4's chunked layers (chunks of 4 tokens, a 9-token left-padded prompt, then 6 steps): a token sees the
    earlier tokens of its own chunk only. hf_kvquant's attention gets transformers' chunked mask and equals eager
    attention over the same quantized cache; the chunks matter (without them the logits are far off)."""
    model = _zoo_model("llama4_text")
    assert model.config.attention_chunk_size == 4 and "chunked_attention" in model.config.layer_types
    input_ids, attention_mask, next_tokens = _padded_batch()

    def run(attention):
        cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=max_cache_len)
        return _forced_steps(model, attention, cache, input_ids, attention_mask, next_tokens).log_softmax(-1)

    eager, ours = run("eager"), run(ATTENTION_NAME)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 1e-5, kl.max().item()
    model.config.attention_chunk_size = 10**6  # one chunk: plain causal attention
    unchunked = run("eager")
    assert (eager.exp() * (eager - unchunked)).sum(-1).mean().item() > 100 * max(kl.max().item(), 1e-7)


def test_gemma4_kv_shared_layers_run_under_hf_kvquant_attention():
    """Gemma 4's KV-shared layers slice the mask of a prefill as 4D (they keep the rows of the last tokens): they get
    transformers' 4D mask, and generation equals eager attention's over the same quantized cache."""
    model = _zoo_model("gemma4_text")
    assert model.config.num_kv_shared_layers == 2
    input_ids, attention_mask, _ = _padded_batch()

    def run(attention):
        model.set_attn_implementation(attention)
        cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(input_ids, attention_mask=attention_mask, cache=cache, max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    (tokens, logits), (expected_tokens, expected) = run(ATTENTION_NAME), run("eager")
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_attention_features_hf_kvquant_does_not_compute_are_refused():
    query, key = torch.zeros(1, 4, 3, 64), torch.zeros(1, 2, 3, 64)
    with pytest.raises(NotImplementedError, match="additive position bias .* 'position_bias'"):
        hf_kvquant.hf_kvquant_attention(None, query, key, key, None, position_bias=torch.zeros(1, 4, 3, 3))
    with pytest.raises(NotImplementedError, match="block-sparse attention .* 'block_indices'"):
        hf_kvquant.hf_kvquant_attention(None, query, key, key, None, block_indices=torch.zeros(1, dtype=torch.long))


def test_bidirectional_attention_takes_sdpa_without_causality():
    """A module marked ``is_causal = False`` (an encoder-style decoder built without ``is_decoder``): every query sees
    every unpadded key, as in transformers' SDPA, not the kernel's causal rule."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 2
    query, key, value = torch.randn(2, 4, 5, 64), torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, _ = hf_kvquant.hf_kvquant_attention(module, query, key, value, mask)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask[:, None, None, :], is_causal=False)
    causal, _ = sdpa_attention_forward(module, query, key, value, None, is_causal=True)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not torch.allclose(ours[1], causal[1], atol=1e-2)


def test_padding_mask_of_a_preallocated_layer_without_attention_mask_marks_the_written_slots():
    written = attention_module.padding_mask(2, 3, 8, q_offset=torch.tensor(2), kv_offset=0, attention_mask=None)
    assert torch.equal(written, torch.tensor([[True] * 5 + [False] * 3] * 2))
    assert attention_module.padding_mask(2, 3, 5, q_offset=2, kv_offset=0, attention_mask=None) is None  # growable


def test_transformers_static_cache_under_hf_kvquant_attention_matches_eager():
    """A preallocated cache that is not ours (transformers' `StaticCache`) hands hf_kvquant's attention every slot,
    the unwritten ones masked: its plain-PyTorch path places the queries at the last written slot (sliding window of 6
    shorter than the prompt included) and equals eager attention over the same cache."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, StaticCache

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    input_ids, attention_mask, next_tokens = _padded_batch()

    def run(attention):
        cache = StaticCache(config=model.config, max_cache_len=24)
        return _forced_steps(model, attention, cache, input_ids, attention_mask, next_tokens)

    ours, expected = run(ATTENTION_NAME), run("eager")
    assert (ours - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("arch", ["qwen3_next", "falcon_h1", "llama4_text", "gemma4_text"])
@pytest.mark.parametrize("max_cache_len", [None, 32], ids=["growable", "preallocated"])
def test_hybrid_chunked_and_kv_shared_models_on_the_gpu_match_eager(arch, max_cache_len):
    """On the GPU, where the Triton kernel reads the quantized buffers: hybrid models (linear attention or Mamba states
    beside quantized attention), chunked attention (its 4D mask through SDPA) and Gemma 4's KV-shared layers, under
    hf_kvquant's attention, against eager attention over the same quantized cache (float32, teacher-forced)."""
    model = _zoo_model(arch).cuda()
    input_ids, attention_mask, next_tokens = (t.cuda() for t in _padded_batch())

    def run(attention):
        cache = QuantizedPerTokenHeadCache(config=model.config, mode="int8", max_cache_len=max_cache_len)
        return _forced_steps(model, attention, cache, input_ids, attention_mask, next_tokens).log_softmax(-1)

    eager, ours = run("eager"), run(ATTENTION_NAME)
    kl = (eager.exp() * (eager - ours)).sum(-1)
    assert kl.max().item() <= 5e-3, kl.max().item()
