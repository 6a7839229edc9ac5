"""4-bit KV-cache schemes to measure (eval/int4_accuracy.py), and the fake-quant cache that measures them.

A scheme is a rotation plus a `Rounding` of keys and one of values. `FakeQuantKVCache` is transformers' `DynamicCache`
whose new keys and values are rotated (``x @ R``), rounded per token-head (or per group) by the scheme, rotated back
(``@ R.T``) and stored in full precision: a quantized cache storing the rounded numbers hands attention exactly these
(attention is invariant to the orthogonal ``R``, up to float32 summation order), so the perplexity measured through this
cache is the quantized cache's.

The plain INT4 format of the issue (``Rounding("int4")``: min/max range, float zero, float32 scale and zero) is
`int4_reference.quantize_int4_codes`; the variants here change one thing each:

* ``zero="int"``: an integer zero point ``zp = clamp(round(-lo / scale), 0, 15)``, ``x_hat = (code - zp) * scale``;
* ``clip="center"``: the range ``[lo, hi]`` shrunk about its middle by the ratio in `CLIP_RATIOS` that gives the row the
  least squared error (searched per row at write time); ``clip="grid"``: ``lo`` and ``hi`` shrunk independently
  (`GRID_RATIOS` each side);
* ``params=torch.float16``: scale and zero rounded to float16 before the codes are computed (what is stored);
* ``group=G``: a (scale, zero) pair per G channels instead of per token-head;
* ``fmt="int4sym"``: symmetric INT4 (scale = absmax / 7, codes -7..7), the format of DESIGN.md's first measurement.

Rotations: ``"none"``, ``"hadamard"`` (`hf_kvquant.rotation.hadamard_matrix`) and ``"rh<seed>"``: the randomised
Hadamard ``diag(s) @ H`` with signs ``s = +-1`` drawn from ``seed`` (still orthogonal: flips channel signs first).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from hf_kvquant.modes import SCALE_FLOOR, KVQuantMode
from hf_kvquant.ops.reference import dequantize, quantize_reference
from hf_kvquant.rotation import hadamard_matrix

from .int4_reference import INT4_QMAX, dequantize_int4_codes, quantize_int4_codes

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
GRID_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


@dataclass(frozen=True)
class Rounding:
    """How one of keys or values is stored. ``fmt``: ``"none"``, ``"int8"``, ``"fp8"``, ``"int4"``, ``"int4sym"``;
    the other fields apply to ``"int4"`` (see the module docstring)."""

    fmt: str = "int4"
    zero: str = "float"  # "float" | "int"
    clip: str | None = None  # None | "center" | "grid"
    params: torch.dtype = torch.float32
    group: int | None = None

    def bytes(self, head_dim: int) -> float:
        """Stored bytes per token-head."""
        if self.fmt == "none":
            return 2 * head_dim  # bf16
        if self.fmt in ("int8", "fp8"):
            return head_dim + 4
        pairs = 1 if self.group is None else head_dim // self.group
        per_param = torch.finfo(self.params).bits // 8
        if self.fmt == "int4sym":
            return head_dim / 2 + per_param * pairs
        return head_dim / 2 + 2 * per_param * pairs

    def label(self) -> str:
        if self.fmt != "int4":
            return self.fmt
        parts = ["int4"]
        if self.zero == "int":
            parts.append("intzp")
        if self.clip:
            parts.append(f"clip-{self.clip}")
        if self.params != torch.float32:
            parts.append("fp16params")
        if self.group:
            parts.append(f"g{self.group}")
        return "-".join(parts)


def _int4_with(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, r: Rounding) -> torch.Tensor:
    """``x [..., n]`` rounded on the 16-level grid spanning ``[lo, hi]`` (``[..., 1]`` each), as ``r`` stores it."""
    scale = torch.clamp_min((hi - lo) / INT4_QMAX, SCALE_FLOOR)
    zero = lo
    if r.params != torch.float32:
        scale = scale.to(r.params).float().clamp_min(SCALE_FLOOR)
        zero = zero.to(r.params).float()
    if r.zero == "int":
        zp = (-zero / scale).round().clamp(0, INT4_QMAX)
        codes = ((x / scale).round() + zp).clamp(0, INT4_QMAX)
        return (codes - zp) * scale
    codes = ((x - zero) / scale).round().clamp(0, INT4_QMAX)
    return codes * scale + zero


def round_int4(x: torch.Tensor, r: Rounding) -> torch.Tensor:
    """``x [..., head_dim]`` float32 rounded by the INT4 variant ``r`` (per row, or per ``r.group`` channels)."""
    shape = x.shape
    if r.group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // r.group, r.group)
    if r == Rounding("int4"):  # the reference itself
        out = dequantize_int4_codes(*quantize_int4_codes(x))
        return out.reshape(shape)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    if r.clip is None:
        out = _int4_with(x, lo, hi, r)
    else:
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        if r.clip == "center":
            pairs = [(mid - a * half, mid + a * half) for a in CLIP_RATIOS]
        elif r.clip == "grid":
            pairs = [(mid - a * half, mid + b * half) for a in GRID_RATIOS for b in GRID_RATIOS]
        else:
            raise ValueError(f"unknown clip {r.clip!r}")
        best, best_err = None, None
        for c_lo, c_hi in pairs:  # the first (full range) wins ties
            cand = _int4_with(x, c_lo, c_hi, r)
            err = (cand - x).square().sum(dim=-1, keepdim=True)
            if best is None:
                best, best_err = cand, err
            else:
                better = err < best_err
                best = torch.where(better, cand, best)
                best_err = torch.where(better, err, best_err)
        out = best
    return out.reshape(shape)


def round_int4_symmetric(x: torch.Tensor) -> torch.Tensor:
    scale = torch.clamp_min(x.abs().amax(dim=-1, keepdim=True) / 7, SCALE_FLOOR)
    return (x / scale).round().clamp(-7, 7) * scale


def fake_round(x: torch.Tensor, r: Rounding) -> torch.Tensor:
    """``x [..., head_dim]`` float32 -> rounded as stored by ``r``, float32."""
    if r.fmt == "none":
        return x
    if r.fmt == "int8":
        return dequantize(*quantize_reference(x, KVQuantMode.INT8_PER_TOKEN_HEAD), torch.float32)
    if r.fmt == "fp8":
        return dequantize(*quantize_reference(x, KVQuantMode.FP8_PER_TOKEN_HEAD), torch.float32)
    if r.fmt == "int4sym":
        return round_int4_symmetric(x)
    if r.fmt == "int4":
        return round_int4(x, r)
    raise ValueError(f"unknown format {r.fmt!r}")


@functools.cache
def rotation_matrix(kind: str, head_dim: int) -> torch.Tensor | None:
    """``[head_dim, head_dim]`` float32 orthogonal, or None for ``"none"``."""
    if kind == "none":
        return None
    h = hadamard_matrix(head_dim)
    if kind == "hadamard":
        return h
    if kind.startswith("rh"):
        g = torch.Generator().manual_seed(int(kind[2:]))
        signs = torch.randint(0, 2, (head_dim,), generator=g).float() * 2 - 1
        return signs[:, None] * h  # diag(signs) @ H
    raise ValueError(f"unknown rotation {kind!r}")


@dataclass(frozen=True)
class Scheme:
    """Keys stored by ``key``, values by ``value``, both rotated by ``rotation`` first."""

    name: str
    key: Rounding
    value: Rounding
    rotation: str = "hadamard"
    key_offset: bool = False  # subtract a per-(layer, batch, kv-head) key mean fixed at the first write

    def quantized(self) -> bool:
        return (self.key.fmt, self.value.fmt) != ("none", "none")

    def bytes_ratio(self, head_dim: int) -> float:
        """Stored bytes of a token-head (K + V) over bf16's ``2 * 2 * head_dim``."""
        return (self.key.bytes(head_dim) + self.value.bytes(head_dim)) / (4 * head_dim)

    def fake_quantize(self, x: torch.Tensor, r: Rounding) -> torch.Tensor:
        if r.fmt == "none":
            return x
        xf = x.float()
        rot = rotation_matrix(self.rotation, x.shape[-1])
        if rot is not None:
            xf = xf @ rot
        xq = fake_round(xf, r)
        if rot is not None:
            xq = xq @ rot.T
        return xq.to(x.dtype)


class FakeQuantKVCache(DynamicCache):
    """A `DynamicCache` storing the keys and values a cache of ``scheme`` would hand attention (see the module
    docstring)."""

    def __init__(self, config, scheme: Scheme):
        super().__init__(config=config)
        self.scheme = scheme
        self.key_offsets: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s = self.scheme
        if s.key_offset:
            # Softmax is invariant to adding one vector to every key a query sees (q . (k - m) = q . k - q . m, the
            # same for all keys), so a cache may store k - m instead of k with m fixed per (layer, batch, kv-head):
            # here the mean key of the first write (the prefill), kept for every later write. Added back after
            # rounding so that this cache hands out keys on the usual scale.
            if layer_idx not in self.key_offsets:
                self.key_offsets[layer_idx] = key_states.float().mean(dim=-2, keepdim=True)
            m = self.key_offsets[layer_idx]
            key = (s.fake_quantize(key_states.float() - m, s.key) + m).to(key_states.dtype)
        else:
            key = s.fake_quantize(key_states, s.key)
        return super().update(key, s.fake_quantize(value_states, s.value), layer_idx, *args, **kwargs)
