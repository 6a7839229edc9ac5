"""Property-based tests of `QuantizedPerTokenHeadCache` (hypothesis, CPU, the reference quantization path).

A state machine drives a cache through random sequences of what transformers does to it: forward passes (`update` of
every layer), `crop`, `reorder_cache`, `batch_select_indices`, `batch_repeat_interleave`, `reset`,
`activate_past_recording`, `copy.deepcopy`, a save/load round trip, and bad inputs in between. Beside it runs a
reference model of the cache: per layer, the plain list (one float32 tensor) of every token written, as the reference
quantizer dequantizes it. After every step the cache must agree with it:

* `update` returns, dequantized, exactly the reference's tokens: all of them for a full-attention layer; the last
  ``window - 1`` past tokens plus the new ones for a sliding layer; for a preallocated layer the whole capacity, whose
  first ``length`` slots are all the tokens (a preallocated sliding layer: those of its window at their positions,
  zeros before);
* the live slots of every layer hold the reference's last tokens (at least what the next step and a recorded rollback
  need), and the counters and mask sizes agree;
* a bad input (wrong dtype, head_dim, batch, heads, key/value shapes, too many tokens for ``max_cache_len``, not a
  tensor) raises and leaves every buffer, counter and address as it was.

Every example is reproducible (``derandomize=True``); `test_properties_case_count` reports how many ran.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import tempfile

import pytest
import torch
from conftest import assert_same_state, gemma_config, live_tokens, llama_config, state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hf_kvquant import (
    ATTENTION_NAME,
    KVQuantMode,
    QuantizedKV,
    QuantizedPerTokenHeadCache,
    QuantizedPerTokenHeadLayer,
    QuantizedPerTokenHeadSlidingWindowLayer,
    QuantizedPerTokenHeadStaticLayer,
    QuantizedPerTokenHeadStaticSlidingWindowLayer,
)
from hf_kvquant.ops.reference import quantize_reference
from hf_kvquant.rotation import hadamard_matrix, rotate, unrotate

# State-machine runs (each up to STEPS steps), shared out among the layouts, and examples of the non-finite property:
# about 40,000 steps and 1,000 examples, ~2 minutes on 2 busy cores. HF_KVQUANT_PROPERTY_EXAMPLES scales both.
MACHINE_EXAMPLES = int(os.environ.get("HF_KVQUANT_PROPERTY_EXAMPLES", "2000"))
NON_FINITE_EXAMPLES = MACHINE_EXAMPLES // 2
STEPS = 25
COUNTS = collections.Counter()  # what ran, reported by test_properties_case_count

PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FINITE_MAX = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 6e4}
MAGNITUDES = ["normal", "zeros", "tiny", "subnormal", "huge", "mixed"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small: one thread runs them faster than several, and steadily on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# tokens and the reference model
# ---------------------------------------------------------------------------------------------------------------


def _magnitude(kind: str, dtype: torch.dtype, shape, g: torch.Generator) -> torch.Tensor:
    """Per token-head magnitudes ``[batch, heads, n, 1]``: zeros, tiny, subnormal, huge, or a mix per token-head."""
    tiny, subnormal = (1e-30, 1e-40) if dtype != torch.float16 else (1e-6, 1e-7)
    values = {"normal": 1.0, "zeros": 0.0, "tiny": tiny, "subnormal": subnormal, "huge": FINITE_MAX[dtype] / 8}
    if kind != "mixed":
        return torch.full((*shape[:3], 1), values[kind])
    choices = torch.tensor([0.0, tiny, subnormal, 1.0, 1e3, FINITE_MAX[dtype] / 8])
    return choices[torch.randint(0, len(choices), (*shape[:3], 1), generator=g)]


def make_tokens(shape, dtype, magnitude: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(*shape, generator=g) * _magnitude(magnitude, dtype, shape, g)
        out.append(x.clamp(-FINITE_MAX[dtype], FINITE_MAX[dtype]).to(dtype))
    return out[0], out[1]


def deq32(x: torch.Tensor, mode: KVQuantMode, rotation) -> torch.Tensor:
    """The float32 numbers the cache stores for ``x`` (one update's tokens): quantize(x @ R) dequantized."""
    q, scale = quantize_reference(rotate(x, rotation), mode)
    return q.float() * scale.unsqueeze(-1)


class RefLayer:
    """The reference of one layer: every token ever written, as the cache dequantizes it (rotated, float32)."""

    def __init__(self, kind: str, window: int | None, capacity: int | None):
        self.kind, self.window, self.capacity = kind, window, capacity
        self.k = self.v = None
        self.initialized = False
        self.record_past, self.rollback_base = False, 0

    @property
    def cum(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def clear(self):
        self.k = None if self.k is None else self.k[:, :, :0]
        self.v = None if self.v is None else self.v[:, :, :0]
        self.initialized = self.kind in ("static", "ring") and self.initialized  # preallocated: buffers kept
        self.rollback_base = 0

    def append(self, k32, v32):
        self.k = k32 if self.k is None else torch.cat([self.k, k32], 2)
        self.v = v32 if self.v is None else torch.cat([self.v, v32], 2)
        self.initialized = True

    def handed(self, n_new: int) -> slice:
        """The tokens (after an update of ``n_new``) that `update` hands to attention."""
        if self.kind in ("sliding", "ring"):
            past = min(self.cum - n_new, self.window - 1)
            return slice(self.cum - n_new - past, self.cum)
        return slice(0, self.cum)

    def kept(self) -> int:
        """The fewest tokens the layer may hold: what the next step (and a recorded rollback) needs."""
        if self.kind == "ring":
            return min(self.cum, self.window - 1)
        if self.kind != "sliding":
            return self.cum
        pending = self.cum - self.rollback_base if self.record_past else 0
        return min(self.cum, self.window - 1 + pending)

    @property
    def ring_slots(self) -> int:
        """A preallocated sliding layer's ring: one window, or the whole capacity if shorter."""
        return min(self.window, self.capacity)

    def mask_sizes(self, q: int) -> tuple[int, int]:
        if self.kind in ("static", "ring"):
            return self.capacity, 0
        if self.kind == "sliding":
            return min(self.cum, self.window - 1) + q, max(self.cum - self.window + 1, 0)
        return self.cum + q, 0


def readback(ref32: torch.Tensor, dtype, rotation, capacity: int | None) -> torch.Tensor:
    """What the cache hands back for the stored numbers ``ref32``: un-rotated, in ``dtype``. A preallocated layer
    un-rotates its whole capacity at once; padding to it keeps the matmul's shape (and its rounding) the same."""
    x = ref32.contiguous()
    if capacity is not None and rotation is not None:
        padded = x.new_zeros(*x.shape[:2], capacity, x.shape[3])
        padded[:, :, : x.shape[2]] = x
        return unrotate(padded, rotation)[:, :, : x.shape[2]].to(dtype)
    return unrotate(x, rotation).to(dtype)


def assert_same(got: torch.Tensor, want: torch.Tensor):
    if not torch.equal(got, want):  # the same numbers, infinities included (float16 readbacks of huge tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=False)


@functools.lru_cache(maxsize=None)
def _config(layout: str, heads: int, head_dim: int, window: int, layers: int, attn: str | None):
    if layout == "nocfg":
        return None
    if layout in ("llama", "static_llama"):
        return llama_config(layers=layers, heads=heads, head_dim=head_dim, attn=attn)
    if layout == "llama_dummy":
        config = llama_config(layers=3, heads=heads, head_dim=head_dim, attn=attn)
        config.layer_types = ["full_attention", "mlp", "full_attention"]
        return config
    # hybrid: sliding layers first, so that transformers' layer-by-layer crop refuses before changing anything
    config = gemma_config(["sliding_attention", "full_attention"][:layers], window, heads=heads, head_dim=head_dim)
    if attn is not None:
        config._attn_implementation = attn
    return config


LAYOUTS = ["nocfg", "llama", "llama_dummy", "hybrid", "static_llama", "static_hybrid"]


@st.composite
def setups(draw, layouts=tuple(LAYOUTS)):
    layout = draw(st.sampled_from(layouts))
    static = layout.startswith("static")
    return dict(
        layout=layout, mode=draw(st.sampled_from(list(KVQuantMode))), hadamard=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)), head_dim=draw(st.sampled_from([64, 128])),
        heads=draw(st.integers(1, 2)), batch=draw(st.integers(1, 3)), window=draw(st.integers(2, 8)),
        layers=draw(st.integers(1, 2)) if layout != "static_hybrid" else 2,
        max_cache_len=draw(st.integers(8, 96)) if static else None,
        attn=draw(st.sampled_from([None, ATTENTION_NAME])) if layout != "nocfg" else None,
    )


# Mostly short chunks; now and then a prompt long enough for a sliding layer to give memory back (> 2 x 80 slots).
token_counts = st.one_of(st.integers(1, 4), st.integers(5, 40), st.integers(1, 4), st.integers(97, 130))
MAX_TOKENS = 200  # a run's layers hold at most this many (past it, forward passes write one token)


# ---------------------------------------------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------------------------------------------


class CacheMachine(RuleBasedStateMachine):
    LAYOUT = "llama"  # set by each test below

    def __init__(self):
        super().__init__()
        self.cache = None
        self.detached = []  # (cache, its state) of copies taken: what the copy does must not reach them
        COUNTS["runs"] += 1

    @initialize(data=st.data())
    def build(self, data):
        self.setup = s = data.draw(setups((self.LAYOUT,)))
        self.mode, self.dtype, self.head_dim, self.heads, self.batch = (
            s["mode"], s["dtype"], s["head_dim"], s["heads"], s["batch"])
        self.rotation = hadamard_matrix(self.head_dim) if s["hadamard"] else None
        self.config = _config(s["layout"], self.heads, self.head_dim, s["window"], s["layers"], s["attn"])
        self.cache = QuantizedPerTokenHeadCache(config=self.config, mode=self.mode, max_cache_len=s["max_cache_len"],
                                                hadamard=s["hadamard"])
        if self.config is None:
            kinds = ["full"] * s["layers"]
        else:
            kinds = [{QuantizedPerTokenHeadStaticLayer: "static", QuantizedPerTokenHeadSlidingWindowLayer: "sliding",
                      QuantizedPerTokenHeadStaticSlidingWindowLayer: "ring",
                      QuantizedPerTokenHeadLayer: "full"}.get(type(layer), "dummy") for layer in self.cache.layers]
        self.refs = [RefLayer(kind, s["window"] if kind in ("sliding", "ring") else None, s["max_cache_len"])
                     for kind in kinds]
        COUNTS["layouts:" + s["layout"]] += 1

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, ref in enumerate(self.refs) if ref.kind != "dummy"]

    def _step(self, name: str):
        COUNTS["steps"] += 1
        COUNTS[name] += 1

    # -- forward passes ----------------------------------------------------------------------------------------

    @rule(n=token_counts, magnitude=st.sampled_from(MAGNITUDES), seed=st.integers(0, 2**16))
    def forward(self, n, magnitude, seed):
        self._step("forward")
        self._forward(n, magnitude, seed)

    @rule(magnitude=st.sampled_from(MAGNITUDES), seed=st.integers(0, 2**16))
    def decode(self, magnitude, seed):
        self._step("decode")
        self._forward(1, magnitude, seed)

    def _forward(self, n, magnitude, seed):
        if max(ref.cum for ref in self.refs) + n > MAX_TOKENS:
            n = 1
        static = self.setup["max_cache_len"]
        if static is not None and self.refs[0].cum + n > static:
            self._bad_update(0, *make_tokens((self.batch, self.heads, n, self.head_dim), self.dtype, "normal", seed),
                             ValueError, "max_cache_len", name="too_many_tokens")
            return
        COUNTS["tokens"] += n
        COUNTS["magnitude:" + magnitude] += 1
        for index in self.attention_layers:
            ref = self.refs[index]
            k, v = make_tokens((self.batch, self.heads, n, self.head_dim), self.dtype, magnitude, seed + index)
            before_mask = self.cache.get_mask_sizes(n, index)
            assert before_mask == ref.mask_sizes(n), (before_mask, ref.mask_sizes(n))
            got_k, got_v = self.cache.update(k, v, index)
            ref.append(deq32(k, self.mode, self.rotation), deq32(v, self.mode, self.rotation))
            if isinstance(got_k, QuantizedKV):  # hf_kvquant's attention: the buffers (of this step: a sliding layer
                got_k, got_v = got_k.dequantize(), got_v.dequantize()  # may have given memory back since)
            assert got_k.dtype == got_v.dtype == self.dtype
            window = ref.handed(n)
            rows = static  # the rows a preallocated layer un-rotates at once
            if ref.kind == "static":
                assert got_k.shape[2] == static
                got_k, got_v = got_k[:, :, : ref.cum], got_v[:, :, : ref.cum]
            elif ref.kind == "ring":  # the window's tokens at their positions, zeros before
                assert got_k.shape[2] == static
                assert not got_k[:, :, : window.start].any() and not got_v[:, :, : window.start].any()
                got_k, got_v = got_k[:, :, window], got_v[:, :, window]
                # a decode step hands over the ring; a step that wraps it, a window built for the step
                rows = ref.ring_slots if n == 1 or ref.cum <= ref.ring_slots else None
            assert got_k.shape == (self.batch, self.heads, window.stop - window.start, self.head_dim)
            for got, ref32 in ((got_k, ref.k), (got_v, ref.v)):
                assert_same(got, readback(ref32[:, :, window], self.dtype, self.rotation, rows))

    # -- bad inputs --------------------------------------------------------------------------------------------

    def _bad_update(self, index, k, v, error, fragment, name):
        self._step("bad:" + name)
        before = self._state()
        with pytest.raises(error) as excinfo:
            self.cache.update(k, v, index)
        assert fragment in str(excinfo.value), (fragment, str(excinfo.value))
        assert_same_state(before, self._state())

    def _state(self):
        # Layers a cache without config creates lazily are empty until updated: trailing empty ones do not count.
        layers = state(self.cache)
        while layers and isinstance(layers[-1], dict) and not layers[-1]["initialized"]:
            layers.pop()
        return layers

    @rule(data=st.data(), kind=st.sampled_from(["int32", "float64", "mixed_dtypes", "head_dim_0", "shapes_differ",
                                                 "not_a_tensor", "other_head_dim", "batch", "heads", "dtype"]))
    def bad_update(self, data, kind):
        index = data.draw(st.sampled_from(self.attention_layers))
        initialized = self.refs[index].initialized
        if kind in ("other_head_dim", "batch", "heads", "dtype") and not initialized:
            kind = "head_dim_0"  # these are only wrong against what the layer already holds
        b, h, d, n = self.batch, self.heads, self.head_dim, data.draw(st.integers(1, 5))
        k, v = make_tokens((b, h, n, d), self.dtype, "normal", 0)
        other_dtype = [t for t in DTYPES if t != self.dtype][data.draw(st.integers(0, 1))]
        error, fragment = ValueError, ""
        if kind == "int32":
            k, v, fragment = k.to(torch.int32), v.to(torch.int32), "int32"
        elif kind == "float64":
            k, v, fragment = k.double(), v.double(), "float64"
        elif kind == "mixed_dtypes":
            v = v.to(other_dtype)
        elif kind == "head_dim_0":
            k, v, fragment = k[..., :0], v[..., :0], "head_dim 0"  # any other head_dim is accepted on the CPU
        elif kind == "shapes_differ":
            v = torch.cat([v, v[:, :, :1]], 2)
        elif kind == "not_a_tensor":
            k, v, error = k.tolist(), v.tolist(), TypeError
        elif kind == "other_head_dim":
            k, v = make_tokens((b, h, n, 192 - d), self.dtype, "normal", 0)
        elif kind == "batch":
            k, v = make_tokens((b + 1, h, n, d), self.dtype, "normal", 0)
        elif kind == "heads":
            k, v = make_tokens((b, h + 1, n, d), self.dtype, "normal", 0)
        else:
            k, v, fragment = k.to(other_dtype), v.to(other_dtype), "was filled with"
        self._bad_update(index, k, v, error, fragment, kind)

    # -- the rest of the Cache contract ------------------------------------------------------------------------

    @rule(data=st.data())
    def crop(self, data):
        self._step("crop")
        # Layers in lockstep: every initialized layer holds the same count. An uninitialized one ignores a crop.
        held = [ref for ref in self.refs if ref.initialized and ref.kind != "dummy"]
        cum = max((ref.cum for ref in held), default=0)
        n = data.draw(st.one_of(st.integers(0, min(cum + 1, 4)), st.integers(0, cum + 1)))  # rollbacks are short
        too_many = any(n > ref.cum for ref in held)
        # a sliding layer must crop what it keeps; a ring only where it never overwrites (max_cache_len <= window)
        must = not too_many and all(ref.kept() - n >= min(ref.cum - n, ref.window - 1)
                                    for ref in held if ref.kind == "sliding") and all(
            n == 0 or ref.capacity <= ref.window for ref in held if ref.kind == "ring")
        before = self._state()
        try:
            self.cache.crop(-n)
        except ValueError:
            assert too_many, "crop refused a count it holds"
            assert_same_state(before, self._state())
            COUNTS["crop:refused_too_many"] += 1
            return
        except RuntimeError:
            assert not must, "a sliding layer refused to crop tokens it must keep"
            assert_same_state(before, self._state())
            COUNTS["crop:refused_by_window"] += 1
            return
        assert not too_many, "crop removed more tokens than a layer holds"
        COUNTS["crop:done" if must else "crop:done_beyond_guarantee"] += 1
        for ref in self.refs:
            if ref.initialized and ref.k is not None:
                ref.k, ref.v = ref.k[:, :, : ref.cum - n], ref.v[:, :, : ref.cum - n]
            if ref.kind == "sliding":
                ref.rollback_base = ref.cum

    @precondition(lambda self: any(ref.kind == "sliding" for ref in self.refs))
    @rule()
    def activate_past_recording(self):
        self._step("activate_past_recording")
        self.cache.activate_past_recording()
        for ref in self.refs:
            if ref.kind == "sliding":
                ref.record_past, ref.rollback_base = True, ref.cum

    @rule(data=st.data())
    def reorder_cache(self, data):
        self._step("reorder_cache")
        beam_idx = torch.tensor(data.draw(st.lists(st.integers(0, self.batch - 1), min_size=self.batch,
                                                   max_size=self.batch)))
        self.cache.reorder_cache(beam_idx)
        self._map_batch(lambda t: t[beam_idx])

    @rule(data=st.data())
    def batch_select_indices(self, data):
        self._step("batch_select_indices")
        indices = torch.tensor(data.draw(st.lists(st.integers(0, self.batch - 1), min_size=1, max_size=3)))
        self.cache.batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])
        self.batch = len(indices)

    @precondition(lambda self: self.cache is not None and self.batch <= 2)
    @rule(repeats=st.integers(1, 3))
    def batch_repeat_interleave(self, repeats):
        if self.batch * repeats > 4:
            repeats = 1
        self._step("batch_repeat_interleave")
        self.cache.batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch *= repeats

    def _map_batch(self, fn):
        for ref in self.refs:
            if ref.k is not None:
                ref.k, ref.v = fn(ref.k), fn(ref.v)

    @rule()
    def reset(self):
        self._step("reset")
        self.cache.reset()
        for ref in self.refs:
            ref.clear()
            if ref.kind not in ("static", "ring"):  # a preallocated layer keeps its (empty) buffers
                ref.k = ref.v = None

    @rule()
    def deepcopy(self):
        self._step("deepcopy")
        original = self.cache
        self.cache = copy.deepcopy(original)
        assert self.cache.config is original.config
        self.detached.append((original, state(original)))

    @rule(device=st.sampled_from([None, "cpu"]))
    def save_and_load(self, device):
        self._step("save_and_load")
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "cache.safetensors")
            self.cache.save(path)
            size = os.path.getsize(path)
            loaded = QuantizedPerTokenHeadCache.load(path, config=self.config, device=device, mode=self.mode)
        live = sum(t[:, :, : live_tokens(layer)].nbytes for layer in self.cache.layers
                   if isinstance(layer, QuantizedPerTokenHeadLayer) for t in layer.buffers)
        assert size <= live + 1000 * len(self.cache.layers) + 500
        assert_same_state(state(self.cache, live_only=True), state(loaded, live_only=True))
        assert loaded.hands_over_quantized == self.cache.hands_over_quantized
        self.cache = loaded

    # -- after every step --------------------------------------------------------------------------------------

    @invariant()
    def holds_the_reference_tokens(self):
        if self.cache is None:
            return
        for index, ref in enumerate(self.refs):
            if ref.kind == "dummy" or index >= len(self.cache.layers):
                assert ref.cum == 0
                continue
            layer = self.cache.layers[index]
            assert layer.is_initialized == ref.initialized, (index, layer, ref.initialized)
            assert int(layer.get_seq_length()) == ref.cum
            assert self.cache.get_mask_sizes(3, index) == ref.mask_sizes(3)
            if not layer.is_initialized:
                continue
            assert layer.key_data.shape[:2] == (self.batch, self.heads) and layer.dtype == self.dtype
            n = live_tokens(layer)
            assert ref.kept() <= n <= ref.cum, (index, ref.kept(), n, ref.cum)
            if ref.kind == "sliding":
                assert layer.record_past == ref.record_past
            # the last n tokens, in slots [0, n) (a ring: position p in slot p % capacity)
            slots = torch.arange(ref.cum - n, ref.cum) % layer.capacity if ref.kind == "ring" else torch.arange(n)
            for data, scale, ref32 in ((layer.key_data, layer.key_scale, ref.k),
                                       (layer.value_data, layer.value_scale, ref.v)):
                stored = data[:, :, slots].float() * scale[:, :, slots].unsqueeze(-1)
                assert torch.equal(stored, ref32[:, :, ref.cum - n :])

    def teardown(self):
        for original, before in self.detached:
            assert_same_state(before, state(original))


def _machine_test(layout: str, share: float):
    """The state machine on one layout, with ``share`` of the examples (each layout gets its own runs)."""
    machine = type(f"CacheMachine_{layout}", (CacheMachine,), {"LAYOUT": layout})
    examples = max(1, round(share * MACHINE_EXAMPLES))
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=STEPS, **PROPERTY_SETTINGS)
    return machine.TestCase


# Sliding-window layers (compaction, give-back, rollback) get the most runs.
TestNoConfig = _machine_test("nocfg", 0.12)
TestLlama = _machine_test("llama", 0.14)
TestLlamaWithDummyLayer = _machine_test("llama_dummy", 0.08)
TestHybridSlidingWindow = _machine_test("hybrid", 0.34)
TestStaticLlama = _machine_test("static_llama", 0.14)
TestStaticHybrid = _machine_test("static_hybrid", 0.18)


# ---------------------------------------------------------------------------------------------------------------
# a non-finite key or value anywhere stays in its token-head
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=NON_FINITE_EXAMPLES, **PROPERTY_SETTINGS)
@given(setup=setups(), n=st.integers(1, 6), data=st.data(),
       bad=st.sampled_from([float("inf"), float("-inf"), float("nan")]), seed=st.integers(0, 2**16))
def test_non_finite_input_stays_in_its_token_head(setup, n, data, bad, seed):
    COUNTS["non_finite"] += 1
    config = _config(setup["layout"], setup["heads"], setup["head_dim"], setup["window"], setup["layers"], None)
    options = dict(config=config, mode=setup["mode"], max_cache_len=setup["max_cache_len"],
                   hadamard=setup["hadamard"])
    clean, faulty = QuantizedPerTokenHeadCache(**options), QuantizedPerTokenHeadCache(**options)
    b, h, d, dtype = setup["batch"], setup["heads"], setup["head_dim"], setup["dtype"]
    prefill = min(3, (setup["max_cache_len"] or 99) - 2 * n)  # room for the prefill, the update and one more
    if prefill > 0:  # layer 0 is an attention layer in every layout
        past = make_tokens((b, h, prefill, d), dtype, "mixed", seed)
        clean.update(*past, 0)
        faulty.update(*past, 0)
    k, v = make_tokens((b, h, n, d), dtype, data.draw(st.sampled_from(MAGNITUDES)), seed + 1)
    where = tuple(data.draw(st.integers(0, size - 1)) for size in (b, h, n, d))
    into_keys = data.draw(st.booleans())
    bad_k, bad_v = k.clone(), v.clone()
    (bad_k if into_keys else bad_v)[where] = bad
    later = make_tokens((b, h, 1, d), dtype, "normal", seed + 2)
    steps = [(clean.update(k, v, 0), faulty.update(bad_k, bad_v, 0))]
    steps.append((clean.update(*later, 0), faulty.update(*later, 0)))
    for step, (want, got) in enumerate(steps):
        for w, g, hit in ((want[0], got[0], into_keys), (want[1], got[1], not into_keys)):
            w, g = w.float(), g.float()
            nan = g.isnan()
            rows = nan.any(dim=-1)  # [batch, heads, tokens]: the token-heads with a NaN
            if hit:
                assert rows.sum() <= 1 and nan[rows].all()  # at most one token-head, all of it NaN
                assert rows.sum() == 1 or step > 0  # (the next step's window may have left it behind)
                assert not rows.any() or rows[where[0], where[1]].any()
            else:
                assert not rows.any()
            assert torch.equal(g[~nan], w[~nan])


def test_properties_case_count():
    """Runs last in this file: prints how many cases the properties above ran (pytest -s shows it)."""
    print("\nhypothesis cases:", dict(sorted(COUNTS.items())))
    if COUNTS["runs"]:
        assert COUNTS["steps"] > COUNTS["runs"]
