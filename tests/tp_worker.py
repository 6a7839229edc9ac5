"""Run under `torchrun --nproc-per-node 2`: a model loaded with transformers' tensor parallelism (tp_plan="auto")
decodes with QuantizedPerTokenHeadCache and hf_kvquant's attention, in every mode; rank 0 writes what
test_tensor_parallel.py compares with one process. Usage: tp_worker.py MODEL_DIR DTYPE OUT_JSON

transformers picks the backend and device itself: NCCL and cuda:LOCAL_RANK where CUDA is visible, gloo and the CPU
otherwise (the CPU test hides the GPUs)."""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, CompileConfig

import hf_kvquant
from hf_kvquant import KVQuantMode, QuantizedPerTokenHeadCache

PROMPT_LEN, STEPS, SEED = 24, 16, 0


def teacher_forced_and_greedy(model, mode):
    """Log-probs of a fixed random sequence fed as a prefill then token by token, the bytes and KV heads the cache
    holds, and 16 greedy tokens, all with the quantized cache in the loop."""
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN + STEPS), generator=generator).to(model.device)
    cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode)
    with torch.no_grad():
        logits = [model(tokens[:, :PROMPT_LEN], cache=cache).logits]
        for i in range(PROMPT_LEN, tokens.shape[1]):
            logits.append(model(tokens[:, i : i + 1], cache=cache).logits)
    logprobs = torch.cat(logits, dim=1).float().log_softmax(-1)[0]
    greedy = model.generate(tokens[:, :PROMPT_LEN], max_new_tokens=STEPS, do_sample=False,
                            cache=QuantizedPerTokenHeadCache(config=model.config, mode=mode))
    return {"logprobs": logprobs.cpu().tolist(), "greedy": greedy[0, PROMPT_LEN:].tolist(),
            "nbytes": cache.nbytes, "kv_heads": cache.layers[0].key_data.shape[1],
            "cache_device": str(cache.layers[0].key_data.device)}


def compiled_and_eager_greedy(model, mode):
    """Greedy tokens over a preallocated cache with the decode step compiled by `generate` (fullgraph, backend
    "eager", on any device), and the same with compilation off: the compiled path under tensor parallelism."""
    generator = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=generator).to(model.device)
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    runs = {}
    for name, options in (("compiled", {"compile_config": compile_config}), ("eager", {"disable_compile": True})):
        cache = QuantizedPerTokenHeadCache(config=model.config, mode=mode, max_cache_len=PROMPT_LEN + STEPS)
        runs[name] = model.generate(prompt, max_new_tokens=STEPS, do_sample=False, cache=cache, **options)
        runs[name] = runs[name][0, PROMPT_LEN:].tolist()
    runs["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return runs


def main():
    model_dir, dtype, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=getattr(torch, dtype),
                                                 attn_implementation=hf_kvquant.ATTENTION_NAME).eval()
    results = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "modes": {}}
    for mode in KVQuantMode:
        result = teacher_forced_and_greedy(model, mode)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {k: result[k] for k in ("nbytes", "kv_heads", "cache_device")})
        results["modes"][mode.value] = {**result, "per_rank": per_rank,
                                        "preallocated": compiled_and_eager_greedy(model, mode)}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
