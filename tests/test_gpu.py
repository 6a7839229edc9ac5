"""On a CUDA GPU: the Triton quantize kernel's bytes equal the reference's (FP8 included, bf16/fp16 inputs), and the
cache on CUDA stores exactly what the CPU reference path stores. Skipped without CUDA."""

import copy

import pytest
import torch
from conftest import requires_cuda
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kvquant import KVQuantMode, QuantizedPerTokenHeadCache
from hf_kvquant.ops.quantize import quantize_into_reference, quantize_into_triton

pytestmark = requires_cuda


def _buffers(batch, heads, capacity, head_dim, mode, device):
    data = [torch.full((batch, heads, capacity, head_dim), 7, dtype=torch.uint8, device=device).view(mode.storage_dtype)
            for _ in range(2)]
    scales = [torch.full((batch, heads, capacity), -1.0, device=device) for _ in range(2)]
    return data[0], scales[0], data[1], scales[1]


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("tokens", [1, 37, 1000])
def test_kernel_bytes_equal_reference(mode, dtype, head_dim, tokens):
    torch.manual_seed(tokens + head_dim)
    batch, heads, capacity = 3, 4, tokens + 16
    # [batch, tokens, heads, head_dim] viewed transposed, as transformers hands them over; a wide range of magnitudes.
    key = (torch.randn(batch, tokens, heads, head_dim) * torch.logspace(-3, 3, tokens)[None, :, None, None]).transpose(1, 2)
    value = torch.randn(batch, heads, tokens, head_dim)
    key[0, 1, 0] = 0.0  # an all-zero token-head
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(capacity)[:tokens]
    expected = _buffers(batch, heads, capacity, head_dim, mode, "cpu")
    quantize_into_reference(key, value, slots, *expected, mode)
    got = _buffers(batch, heads, capacity, head_dim, mode, "cuda")
    quantize_into_triton(key.cuda(), value.cuda(), slots.cuda(), *got, mode)
    for e, g in zip(expected, got):
        g = g.cpu()
        if e.dtype == torch.float32:
            assert torch.equal(e, g)
        else:
            assert torch.equal(e.view(torch.uint8), g.view(torch.uint8))


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_cache_on_cuda_matches_cpu_reference_in_generate(mode):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 128, (2, 50))
    caches = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        cache = QuantizedPerTokenHeadCache(config=m.config, mode=mode)
        with torch.no_grad():
            m(prompt.to(device), cache=cache)
            m(prompt[:, :3].to(device), cache=cache)  # a continuation chunk
        caches[device] = cache
    for cpu_layer, gpu_layer in zip(caches["cpu"].layers, caches["cuda"].layers):
        assert gpu_layer.key_data.is_cuda
        assert cpu_layer.stored == gpu_layer.stored == 53
        # The projections differ in the last bits between CPU and GPU matmuls, so compare dequantized values.
        for data, scale in (("key_data", "key_scale"), ("value_data", "value_scale")):
            c = getattr(cpu_layer, data)[:, :, :53].float() * getattr(cpu_layer, scale)[:, :, :53, None]
            g = getattr(gpu_layer, data)[:, :, :53].float().cpu() * getattr(gpu_layer, scale)[:, :, :53, None].cpu()
            tolerance = 0.02 if mode is KVQuantMode.INT8_PER_TOKEN_HEAD else 0.1
            assert (c - g).abs().max() <= tolerance * c.abs().max()


def _teacher_forced_logprobs(model, tokens, attn_implementation, mode, hadamard=False):
    """Prefill 40 tokens, then feed the rest one token per step, with the quantized cache in the loop."""
    model.set_attn_implementation(attn_implementation)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode, hadamard=hadamard)
    with torch.no_grad():
        logits = [model(tokens[:, :40], cache=cache).logits]
        for i in range(40, tokens.shape[1]):
            logits.append(model(tokens[:, i : i + 1], cache=cache).logits)
    return torch.cat(logits, dim=1).float().log_softmax(-1)


@pytest.mark.parametrize("mode", list(KVQuantMode))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("hadamard", [False, True], ids=["plain", "hadamard"])
def test_registered_attention_matches_eager_in_the_model(mode, arch, hadamard):
    """The Triton attention inside real model code (GQA; Gemma 3's sliding window, scaling) against transformers'
    eager attention over the same quantized cache, teacher-forced past the window. With ``hadamard`` the kernel reads
    rotated K/V with a rotated query, eager the un-rotated dequantized copies."""
    import hf_kvquant
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

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


def test_launcher_recompiles_for_every_specialisation():
    """The fast launch path reuses a compiled kernel only for arguments Triton would specialise the same way: an
    unaligned (offset) view, a length that is or is not a multiple of 16, and 1, each against the reference."""
    from hf_kvquant.ops.quantize import _launch_quantize

    mode, heads, head_dim = KVQuantMode.INT8_PER_TOKEN_HEAD, 2, 64
    flat = torch.randn(2 * heads * 40 * head_dim + 3)
    for tokens, offset in [(32, 0), (32, 0), (17, 0), (1, 0), (32, 3), (17, 1), (32, 0)]:
        key = flat[offset : offset + 2 * heads * tokens * head_dim].view(2, heads, tokens, head_dim)
        value = key.flip(-1)
        slots = torch.arange(tokens)
        expected = _buffers(2, heads, tokens, head_dim, mode, "cpu")
        quantize_into_reference(key, value, slots, *expected, mode)
        got = _buffers(2, heads, tokens, head_dim, mode, "cuda")
        key_cuda = flat.cuda()[offset : offset + key.numel()].view(key.shape)  # keeps the offset, unlike key.cuda()
        quantize_into_triton(key_cuda, key_cuda.flip(-1), slots.cuda(), *got, mode)
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e.view(torch.uint8) if e.dtype != torch.float32 else e,
                               g.cpu().view(torch.uint8) if g.dtype != torch.float32 else g.cpu()), (tokens, offset)
    # Distinct specialisations were compiled separately (aligned/unaligned, multiple of 16 or not, 1).
    assert len(_launch_quantize._compiled) >= 4
