"""Quantize-on-write: new keys and values go into the cache as INT8/FP8 with one scale per token-head.

For each (batch, kv-head, token) row ``x`` of ``head_dim`` values::

    scale = max(absmax(x) / QMAX, SCALE_FLOOR)       # float32
    q     = x / scale                                  # INT8: round half to even, clamp to +-127
                                                       # FP8 e4m3: saturate to +-448, round to nearest even

The Triton kernel and `quantize_reference` implement exactly this math; on a GPU and under the
Triton interpreter the kernel's bytes equal the reference's. On the GPU the kernel rounds with the
hardware's round-to-nearest-even instructions (``cvt.rni``, ``cvt.rn.satfinite.e4m3``). The
interpreter has neither (``libdevice`` does not run there, and its float8 cast does not round to
nearest), so under it the same rounding is written out with floor and integer bit operations: about
30 % slower on a GPU, which is why that is not the GPU path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..modes import SCALE_FLOOR, KVQuantMode
from .launch import Launcher

# Elements of one token-head tile per program: enough work to hide latency, few registers.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 4
# triton.jit reads this variable when it decorates, so it tells how the kernels below will run.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_reference(x: torch.Tensor, mode: KVQuantMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch quantization of ``x[..., head_dim]``: returns ``(q, scale)``, scale of shape ``x.shape[:-1]``."""
    xf = x.float()
    scale = torch.clamp_min(xf.abs().amax(dim=-1, keepdim=True) / mode.qmax, SCALE_FLOOR)
    scaled = (xf / scale).clamp(-mode.qmax, mode.qmax)
    if mode is KVQuantMode.INT8_PER_TOKEN_HEAD:
        q = scaled.round().to(torch.int8)  # torch.round is round-half-to-even
    else:
        q = scaled.to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q[..., head_dim] * scale[...]`` in float32, returned as ``dtype``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def quantize_into_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    mode: KVQuantMode,
) -> None:
    """Quantize ``key``/``value`` ``[batch, kv_heads, tokens, head_dim]`` and write token ``t`` into slot ``slots[t]``
    of the cache buffers (``*_data [batch, kv_heads, capacity, head_dim]``, ``*_scale [batch, kv_heads, capacity]``)."""
    for x, data, scale in ((key, key_data, key_scale), (value, value_data, value_scale)):
        q, s = quantize_reference(x, mode)
        # Through byte views: index_copy_ has no float8 kernel on CPU.
        data.view(torch.uint8).index_copy_(2, slots, q.view(torch.uint8))
        scale.index_copy_(2, slots, s)


@triton.jit
def _round_half_to_even(x):
    # libdevice.rint, written out for the interpreter; exact for |x| < 2**22.
    r = tl.floor(x)
    frac = x - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return r + ((frac > 0.5) | ((frac == 0.5) & r_is_odd)).to(tl.float32)


@triton.jit
def _fp8_e4m3_bits(x):
    """float32 (already within +-448) -> e4m3fn byte, round to nearest even, as torch's cast does (interpreter)."""
    sign = x.to(tl.int32, bitcast=True) < 0  # the sign bit, -0.0 included
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range (a >= 2**-6): keep 3 of 23 mantissa bits, rounding half to even; a carry moves the exponent.
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
    # Subnormal range: multiples of 2**-9 (a rounded value of 8 is exactly the smallest normal, 0x08).
    subnormal = _round_half_to_even(a * 512.0).to(tl.int32)
    code = tl.where(a < 0.015625, subnormal, normal) | (sign.to(tl.int32) << 7)
    return code.to(tl.uint8)


@triton.jit
def _quantize_tile(
    src_ptr, stride_sb, stride_sh, stride_st,
    data_ptr, stride_db, stride_dh, stride_dt,
    scale_ptr, stride_cb, stride_ch,
    b, h, tokens, slots, offs_d, token_mask, mask,
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, INTERPRETED: tl.constexpr,
):
    x = tl.load(
        src_ptr + b * stride_sb + h * stride_sh + tokens[:, None] * stride_st + offs_d[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX), 1e-6)
    scaled = tl.math.div_rn(x, scale[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -QMAX), QMAX)
    if IS_FP8 and INTERPRETED:
        q = _fp8_e4m3_bits(scaled)
    elif IS_FP8:
        q = scaled.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    elif INTERPRETED:
        q = _round_half_to_even(scaled).to(tl.int8)
    else:
        q = libdevice.rint(scaled).to(tl.int8)
    tl.store(data_ptr + b * stride_db + h * stride_dh + slots[:, None] * stride_dt + offs_d[None, :], q, mask=mask)
    tl.store(scale_ptr + b * stride_cb + h * stride_ch + slots, scale, mask=token_mask)


@triton.jit
def _quantize_kv_kernel(
    k_ptr, k_sb, k_sh, k_st,
    v_ptr, v_sb, v_sh, v_st,
    slots_ptr,
    kd_ptr, vd_ptr, d_sb, d_sh, d_st,
    ks_ptr, vs_ptr, s_sb, s_sh,
    num_heads, num_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # One program: BLOCK_T new tokens of one (batch, kv-head), keys and values.
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # b * batch stride passes 2**31 in large caches
    h = pid_bh % num_heads
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    slots = tl.load(slots_ptr + tokens, mask=token_mask, other=0)
    _quantize_tile(k_ptr, k_sb, k_sh, k_st, kd_ptr, d_sb, d_sh, d_st, ks_ptr, s_sb, s_sh,
                   b, h, tokens, slots, offs_d, token_mask, mask, QMAX, IS_FP8, INTERPRETED)
    _quantize_tile(v_ptr, v_sb, v_sh, v_st, vd_ptr, d_sb, d_sh, d_st, vs_ptr, s_sb, s_sh,
                   b, h, tokens, slots, offs_d, token_mask, mask, QMAX, IS_FP8, INTERPRETED)


_launch_quantize = Launcher(_quantize_kv_kernel)


def quantize_into_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    mode: KVQuantMode,
) -> None:
    """Same contract as `quantize_into_reference`, one kernel launch for keys and values.

    ``slots`` is a device tensor (not a Python int) so that the launch can be captured in a CUDA graph.
    Requires ``head_dim`` contiguous in the inputs and both data buffers (and both scale buffers) with equal strides.
    """
    batch, num_heads, num_tokens, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    assert key_data.stride() == value_data.stride() and key_scale.stride() == value_scale.stride()
    is_fp8 = mode is KVQuantMode.FP8_PER_TOKEN_HEAD
    # FP8 bytes are computed as integers (see module docstring) and stored through a uint8 view.
    kd, vd = (key_data.view(torch.uint8), value_data.view(torch.uint8)) if is_fp8 else (key_data, value_data)
    # Plain integer arithmetic: triton.next_power_of_2/cdiv cost microseconds of host time per call, per layer.
    block_d = 1 << (head_dim - 1).bit_length()
    block_t = min(max(_TILE_ELEMENTS // block_d, 1), 1 << (num_tokens - 1).bit_length())
    grid = (-(-num_tokens // block_t), batch * num_heads)
    _launch_quantize(
        grid,
        (
            key, key.stride(0), key.stride(1), key.stride(2),
            value, value.stride(0), value.stride(1), value.stride(2),
            slots,
            kd, vd, kd.stride(0), kd.stride(1), kd.stride(2),
            key_scale, value_scale, key_scale.stride(0), key_scale.stride(1),
            num_heads, num_tokens,
        ),
        dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, QMAX=mode.qmax, IS_FP8=is_fp8,
             INTERPRETED=_INTERPRETED),
        num_warps=_NUM_WARPS,
    )


def quantize_into(key, value, slots, key_data, key_scale, value_data, value_scale, mode) -> None:
    """Dispatch: the Triton kernel on CUDA tensors, the reference everywhere else (CPU users, CI)."""
    impl = quantize_into_triton if key.is_cuda else quantize_into_reference
    impl(key, value, slots, key_data, key_scale, value_data, value_scale, mode)
