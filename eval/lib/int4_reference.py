"""The math of the 4-bit KV-cache format (issue 33) in plain PyTorch: the oracle a Triton kernel will be tested
against. Imports torch and the project's `SCALE_FLOOR`, `KVQuantMode` and INT8/FP8 `quantize_reference`; written to move
as is into ``hf_kvquant/ops/reference.py`` (there: drop the `quantize_reference` import and import ``from ..modes``).

INT4, asymmetric, one (scale, zero) pair per (batch, kv-head, token) row ``x`` of ``head_dim`` values, all in
float32::

    lo, hi = min(x), max(x)
    scale  = max((hi - lo) / 15, SCALE_FLOOR)
    zero   = lo                                        # a float zero point: the row's minimum, stored as is
    code   = clamp(round_half_even((x - zero) / scale), 0, 15)        # uint8 in [0, 15]
    x_hat  = code * scale + zero                       # dequantized

Why a float zero (``zero = lo``) and not an integer zero point (``zp = round(-lo / scale)``, ``x_hat = (code - zp) *
scale``): the integer zero point exists to make 0.0 exactly representable, which matters for padded or ReLU'd
activations, not for keys and values (after the Hadamard rotation nothing in a row is exactly 0). Rounding ``-lo /
scale`` moves the whole grid by up to ``scale / 2``, which pushes one end of the row up to ``scale / 2`` outside the
grid: it is clipped, and the bound below fails. The float zero costs the same bytes (the pair is stored either way),
keeps both ends on the grid (``lo`` exactly, ``hi`` to float rounding) and dequantizes with one multiply-add.
Measured (eval/results/int4_accuracy_*.md): see the ``int4-intzp`` variant.

Error bound (derived): for every element of a finite row, ``(x - zero) / scale`` lies in ``[0, (hi - lo) / scale]``,
a subset of ``[0, 15]`` (``scale >= (hi - lo) / 15``), so clamping never moves it and rounding to the nearest
integer moves it by at most 1/2: ``|x - x_hat| <= scale / 2``, plus float32 rounding of the subtraction, division,
multiply and add (a few ulps of ``max(|lo|, |hi|)``). A row whose values are all equal reads back exactly
(``code = 0``, ``x_hat = zero = lo``).

Packing, "split halves": ``packed [..., head_dim / 2]`` uint8, byte ``j`` holds channel ``j`` in its low nibble and
channel ``j + head_dim / 2`` in its high nibble::

    packed[..., j] = code[..., j] | (code[..., j + head_dim // 2] << 4)

so a kernel loads one tile of bytes and gets two contiguous half-tiles of channels, ``b & 0xF`` and ``b >> 4``, with
no interleave: ``q . k = q[:, :h] . k_lo + q[:, h:] . k_hi``. An odd ``head_dim`` is refused (ValueError).

Edge cases, all confined to their own row (every reduction is along the last axis):

* a row with a NaN or an infinity, or whose range ``hi - lo`` overflows float32, gets ``scale = zero = NaN`` and all
  codes 0: it dequantizes to all NaN (attention over it is NaN, as with the INT8 format's NaN scale);
* an all-equal row (range below ``15 * SCALE_FLOOR``) gets the floor scale; an all-zero row reads back +0.0;
* signed zeros are not kept: ``zero`` is stored as ``lo + 0.0`` (so -0.0 is stored as +0.0) and ``x_hat`` of an
  element equal to -0.0 may read +0.0;
* the input may be any float dtype; the math is float32; ``dequantize_int4`` returns the dtype asked for.

Bytes per token-head (one of K or V): ``head_dim / 2`` codes + 8 (float32 scale and zero); against bf16 keys and
values (``2 * 2 * head_dim``):

    head_dim            64        128       256
    int4  (K4 + V4)     80 B      144 B     272 B
                        0.3125x   0.281x    0.266x
    k8v4  (K8 + V4)     108 B     204 B     396 B      (INT8 keys: head_dim + 4 bytes)
                        0.422x    0.398x    0.387x

Write rule, recommended (issue 33, eval/results/int4_accuracy_smollm2.md): the range of each row chosen for the least
squared error among 25 candidates (`quantize_int4_codes_clipped`, ``quantize_int4(x, clip=True)``), after the
Hadamard rotation. Same stored format and read path as the plain min/max rule (`quantize_int4_codes`), which is
kept: it is the rule with the element-wise bound above, and the one the first measurements used. SmolLM2-135M,
WikiText-2, 67,518 tokens, vs unquantized: plain min/max + H +5.02 % (over the +5 % gate), clipped + H +4.10 %.

Scores against a packed key row: ``q . k_hat = scale * (q[:h] . lo_nibbles + q[h:] . hi_nibbles) + zero * sum(q)``
(``h = head_dim / 2``), so a kernel needs one ``sum(q)`` per query and one multiply-add per key.
"""

from __future__ import annotations

import torch

from hf_kvquant.modes import SCALE_FLOOR, KVQuantMode
from hf_kvquant.ops.reference import dequantize, quantize_reference

INT4_QMAX = 15.0  # codes 0..15
INT4_LEVELS = 16


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"INT4 packs two channels per byte: head_dim must be even; got {head_dim}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``codes [..., head_dim]`` (integers in [0, 15], any integer dtype) -> ``packed [..., head_dim / 2]`` uint8, split
    halves: byte ``j`` = ``codes[j] | codes[j + head_dim / 2] << 4``."""
    head_dim = codes.shape[-1]
    _check_head_dim(head_dim)
    c = codes.to(torch.uint8)
    half = head_dim // 2
    return c[..., :half] | (c[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``packed [..., head_dim / 2]`` uint8 -> ``codes [..., head_dim]`` uint8 in [0, 15] (the inverse of
    `pack_int4`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed INT4 codes are uint8; got {packed.dtype}")
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def quantize_int4_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` -> ``(codes uint8 [..., head_dim], scale float32 [...], zero float32 [...])``, unpacked
    (see the module docstring for the formulas and edge cases)."""
    _check_head_dim(x.shape[-1])
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True)
    hi = xf.amax(dim=-1, keepdim=True)
    scale = torch.clamp_min((hi - lo) / INT4_QMAX, SCALE_FLOOR)  # NaN propagates through clamp_min
    zero = lo + 0.0  # -0.0 -> +0.0
    bad = ~torch.isfinite(scale) | ~torch.isfinite(zero)
    nan = torch.full_like(scale, float("nan"))
    scale = torch.where(bad, nan, scale)
    zero = torch.where(bad, nan, zero)
    t = ((xf - zero) / scale).round().clamp(0.0, INT4_QMAX)  # torch.round is round half to even
    codes = torch.where(bad, torch.zeros_like(t), t).to(torch.uint8)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


# The clipped range's candidates: [mid - a * half, mid + b * half] for every (a, b), a outer; (1, 1) first.
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6)


def quantize_int4_codes_clipped(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `quantize_int4_codes`, the same stored format, but each row's range chosen for the least squared error.

    With ``mid = (lo + hi) / 2`` and ``half = (hi - lo) / 2`` (float32), the 25 candidate ranges are ``[mid - a * half,
    mid + b * half]`` for ``a, b`` in `CLIP_RATIOS` (``a`` outer, ``(1, 1)`` first: the full range, equal to ``[lo,
    hi]`` up to float rounding); each is rounded as the plain rule does (``scale = max((hi' - lo') / 15,
    SCALE_FLOOR)``, ``zero = lo'``, codes clamped to [0, 15]) and the row keeps the first candidate of least
    ``sum((x_hat - x)^2)``. So no row is worse (in squared error) than with the full range; elements outside the chosen
    range are clipped to its ends, inside it ``|x - x_hat| <= scale / 2`` as before. A write-time search (25 passes
    over a row of ``head_dim`` values, once per token): the read path is unchanged. Rows with a non-finite value get
    NaN scale and zero and codes 0, as in `quantize_int4_codes`.
    """
    _check_head_dim(x.shape[-1])
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True)
    hi = xf.amax(dim=-1, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for a in CLIP_RATIOS:
        for b in CLIP_RATIOS:
            c_lo, c_hi = mid - a * half, mid + b * half
            scale = torch.clamp_min((c_hi - c_lo) / INT4_QMAX, SCALE_FLOOR)
            t = ((xf - c_lo) / scale).round().clamp(0.0, INT4_QMAX)
            err = (t * scale + c_lo - xf).square().sum(dim=-1, keepdim=True)
            if best is None:
                best = [t, scale, c_lo, err]
            else:
                better = err < best[3]  # strict: the earlier candidate wins ties (and NaN rows keep the first)
                best = [torch.where(better, new, old) for new, old in zip((t, scale, c_lo, err), best, strict=True)]
    t, scale, zero, _ = best
    zero = zero + 0.0
    bad = ~torch.isfinite(scale) | ~torch.isfinite(zero)
    nan = torch.full_like(scale, float("nan"))
    scale = torch.where(bad, nan, scale)
    zero = torch.where(bad, nan, zero)
    codes = torch.where(bad, torch.zeros_like(t), t).to(torch.uint8)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


def quantize_int4(x: torch.Tensor, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [..., head_dim]`` (head_dim even) -> ``(packed uint8 [..., head_dim / 2], scale float32 [...], zero float32
    [...])``; ``clip=True``: the range chosen per row by `quantize_int4_codes_clipped` (same format)."""
    codes, scale, zero = quantize_int4_codes_clipped(x) if clip else quantize_int4_codes(x)
    return pack_int4(codes), scale, zero


def dequantize_int4_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes [..., head_dim] * scale[...] + zero[...]`` in float32 (multiply, then add), returned as ``dtype``."""
    return (codes.float() * scale.unsqueeze(-1) + zero.unsqueeze(-1)).to(dtype)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``packed [..., head_dim / 2]``, ``scale``, ``zero [...]`` -> ``x_hat [..., head_dim]`` as ``dtype``."""
    return dequantize_int4_codes(unpack_int4(packed), scale, zero, dtype)


# --- fake quantization: the numbers a cache of a format will hold, kept in full precision --------------------------

FORMATS = ("none", "int8", "fp8", "int4")
_SYMMETRIC = {"int8": KVQuantMode.INT8_PER_TOKEN_HEAD, "fp8": KVQuantMode.FP8_PER_TOKEN_HEAD}


def fake_quantize(x: torch.Tensor, fmt: str, rotation: torch.Tensor | None = None, clip: bool = False) -> torch.Tensor:
    """``x [..., head_dim]`` as a cache of format ``fmt`` (``"none"``, ``"int8"``, ``"fp8"``, ``"int4"``) gives it back,
    in ``x``'s dtype: rotated by ``rotation`` (``x @ R``; None: no rotation), rounded per row, rotated back (``@ R.T``).
    """
    if fmt == "none":
        return x
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    xf = x.float()
    if rotation is not None:
        xf = xf @ rotation
    quantize = quantize_int4_codes_clipped if clip else quantize_int4_codes
    xq = dequantize_int4_codes(*quantize(xf)) if fmt == "int4" else dequantize(*quantize_reference(xf, _SYMMETRIC[fmt]), torch.float32)
    if rotation is not None:
        xq = xq @ rotation.T
    return xq.to(x.dtype)


def fake_quantize_kv(key: torch.Tensor, value: torch.Tensor, key_format: str, value_format: str,
                     rotation: torch.Tensor | None = None, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[batch, kv_heads, tokens, head_dim]`` as a cache storing keys in ``key_format`` and values in
    ``value_format`` gives them back (``"int4"`` mode: ``("int4", "int4")``; ``"k8v4"``: ``("int8", "int4")``), each
    rotated by ``rotation`` before rounding and rotated back after."""
    return fake_quantize(key, key_format, rotation, clip), fake_quantize(value, value_format, rotation, clip)


def bytes_per_token_head(head_dim: int, key_format: str, value_format: str, param_bytes: int = 4) -> int:
    """Stored bytes of one token-head, keys + values: codes plus a scale (INT8/FP8) or a scale and a zero (INT4) of
    ``param_bytes`` each."""
    def one(fmt: str) -> int:
        if fmt == "int4":
            return head_dim // 2 + 2 * param_bytes
        if fmt in ("int8", "fp8"):
            return head_dim + param_bytes
        return 2 * head_dim  # bf16
    return one(key_format) + one(value_format)


if __name__ == "__main__":  # self-checks: python eval/lib/int4_reference.py
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 17, 64, generator=g) * 3
    packed, scale, zero = quantize_int4(x)
    assert packed.shape == (3, 2, 17, 32) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (3, 2, 17) and scale.dtype == zero.dtype == torch.float32
    codes = unpack_int4(packed)
    assert torch.equal(pack_int4(codes), packed)
    assert torch.equal(codes, quantize_int4_codes(x)[0])
    # layout: byte j = channel j (low nibble) | channel j + 32 (high nibble)
    assert torch.equal(packed & 0xF, codes[..., :32]) and torch.equal(packed >> 4, codes[..., 32:])
    xh = dequantize_int4(packed, scale, zero)
    err = (x - xh).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-6 * x.abs().amax()).all(), err.max()
    # both ends on the grid
    assert torch.equal(codes.amin(-1), torch.zeros_like(scale, dtype=torch.uint8))
    assert torch.equal(codes.amax(-1), torch.full_like(scale, 15, dtype=torch.uint8))
    # exact round trip of codes: dequantized codes quantize to themselves
    c2, s2, z2 = quantize_int4_codes(xh)
    assert torch.equal(c2, codes)
    # ties: 0, 0.5, 1.5, 2.5 ... on a grid of scale 1 round half to even
    row = torch.tensor([0.0, 0.5, 1.5, 2.5, 3.5, 14.5, 15.0] + [7.0] * 9)
    c, s, z = quantize_int4_codes(row)
    assert s.item() == 1.0 and z.item() == 0.0
    assert c[:7].tolist() == [0, 0, 2, 2, 4, 14, 15], c
    # edge cases
    odd = torch.zeros(2, 5)
    try:
        quantize_int4(odd)
        raise AssertionError("odd head_dim accepted")
    except ValueError:
        pass
    rows = torch.randn(4, 8, generator=g)
    rows[1, 3] = float("nan")
    rows[2, 0] = float("inf")
    rows[3] = -0.0
    p, s, z = quantize_int4(rows)
    back = dequantize_int4(p, s, z)
    assert torch.isnan(back[1]).all() and torch.isnan(back[2]).all()
    assert torch.isfinite(back[0]).all() and (back[3] == 0).all() and not torch.signbit(back[3]).any()
    assert not torch.signbit(z[3]) and s[3] == torch.tensor(SCALE_FLOOR)
    const = torch.full((8,), -2.75)
    assert torch.equal(dequantize_int4(*quantize_int4(const)), const)
    # fake quantization with a rotation equals rotate -> quantize -> dequantize -> unrotate
    from hf_kvquant.rotation import hadamard_matrix
    r = hadamard_matrix(64)
    fq = fake_quantize(x, "int4", r)
    assert torch.allclose(fq, dequantize_int4(*quantize_int4(x @ r)) @ r.T)
    assert bytes_per_token_head(128, "int4", "int4") / (4 * 128) < 0.29
    assert bytes_per_token_head(128, "int8", "int4") / (4 * 128) < 0.41
    assert bytes_per_token_head(64, "int4", "int4") / (4 * 64) < 0.32
    assert bytes_per_token_head(64, "int8", "int4") / (4 * 64) < 0.43
    # clipped: same format, never a larger squared error than the full range, the variant measured
    cc, cs, cz = quantize_int4_codes_clipped(x)
    xc = dequantize_int4_codes(cc, cs, cz)
    assert ((xc - x).square().sum(-1) <= (xh - x).square().sum(-1) * (1 + 1e-5)).all()
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.int4_variants import Rounding, round_int4
    assert torch.equal(xc, round_int4(x, Rounding(clip="grid")))
    pc, sc, zc = quantize_int4(rows, clip=True)
    assert torch.isnan(dequantize_int4(pc, sc, zc)[1:3]).all() and torch.isfinite(sc[0])
    print("int4_reference: all self-checks passed")
