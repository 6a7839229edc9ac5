"""How tests/data/*.v1.safetensors were written: by the code of main f0d74d2 (format version 1, before hf_kvquant/cache.py
became a package). Kept to show what the files hold; test_persistence.py rebuilds the same caches and loads the files.

Run from the repository root: python tests/data/make_v1_files.py
"""
import sys

sys.path.insert(0, "tests")
from conftest import fill, gemma_config, llama_config  # noqa: E402

from hf_kvquant import QuantizedPerTokenHeadCache  # noqa: E402



def layouts():
    yield "growable_int8", QuantizedPerTokenHeadCache(config=llama_config(layers=2, head_dim=16), mode="int8"), [5, 1, 1]
    yield "preallocated_fp8", QuantizedPerTokenHeadCache(config=llama_config(layers=2, head_dim=16), mode="fp8", max_cache_len=12), [4, 1]
    g = QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention", "full_attention"], 4, head_dim=16), mode="int8")
    yield "gemma3_sliding_int8", g, [6, 1, 1]
    r = QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention", "full_attention"], 4, head_dim=16), mode="int8")
    fill(r, [3], batch=1, head_dim=16, seed=7)
    r.layers[0].activate_past_recording()
    yield "gemma3_recording_int8", r, [2, 1]
    # added with the ring-buffer layer (issue 32), written by the same f0d74d2 code: a preallocated sliding layer that
    # kept every token, past its window
    p = QuantizedPerTokenHeadCache(config=gemma_config(["sliding_attention", "full_attention"], 4, head_dim=16), mode="int8", max_cache_len=12)
    yield "gemma3_preallocated_int8", p, [6, 1, 1]
    yield "hadamard_fp8", QuantizedPerTokenHeadCache(config=llama_config(layers=2, head_dim=16), mode="fp8", hadamard=True), [4, 2]


for name, cache, steps in layouts():
    fill(cache, steps, batch=1, head_dim=16, seed=3)
    cache.save(f"tests/data/{name}.v1.safetensors")
    print(name, cache)
