"""Quantize-on-write in Triton: new keys and values go into the cache buffers as INT8/FP8 with one scale per
token-head, by the math of `hf_kvquant.ops.reference.quantize_reference` (on the GPU and under the interpreter the
kernel's bytes equal the reference's).

On the GPU the kernel rounds with the hardware's round-to-nearest-even instructions (``cvt.rni``,
``cvt.rn.satfinite.e4m3``). The interpreter has neither (``libdevice`` does not run there, and its float8 cast does
not round to nearest), so under it the same rounding is written out with floor and integer bit operations, which are
slower on a GPU: hence two paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..modes import KERNEL_FP8_E4M3, KERNEL_INT8, SCALE_FLOOR, KVQuantMode
from .launch import Launcher
from .limits import MAX_KERNEL_HEAD_DIM

# Elements of one token-head tile per program: enough work to hide latency, few registers.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 4
# triton.jit reads this variable when it decorates, so it tells how the kernels below will run.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT8: tl.constexpr = tl.constexpr(KERNEL_INT8)
FP8_E4M3: tl.constexpr = tl.constexpr(KERNEL_FP8_E4M3)


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
    data_ptr, stride_db, stride_dh, stride_dt, stride_dd,
    scale_ptr, stride_cb, stride_ch,
    b, h, tokens, slots, token_mask,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, FORMAT: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """[BLOCK_T, HEAD_DIM] new tokens of one (batch, kv-head), padded to BLOCK_D channels (zeros: no effect on the
    absmax), quantized into their slots."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = token_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(
        src_ptr + b * stride_sb + h * stride_sh + tokens[:, None] * stride_st + offs_d[None, :],
        mask=mask, other=0.0,
    ).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), QMAX), FLOOR)
    scaled = tl.math.div_rn(x, scale[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -QMAX), QMAX)
    if FORMAT == INT8:
        if INTERPRETED:
            q = _round_half_to_even(scaled).to(tl.int8)
        else:
            q = libdevice.rint(scaled).to(tl.int8)
    elif FORMAT == FP8_E4M3:
        if INTERPRETED:
            q = _fp8_e4m3_bits(scaled)
        else:
            q = scaled.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        tl.static_assert(False, "unknown storage format")
    tl.store(data_ptr + b * stride_db + h * stride_dh + slots[:, None] * stride_dt + offs_d[None, :] * stride_dd, q,
             mask=mask)
    tl.store(scale_ptr + b * stride_cb + h * stride_ch + slots, scale, mask=token_mask)


@triton.jit
def _quantize_kv_kernel(
    k_ptr,  # [batch, kv_heads, tokens, HEAD_DIM_K] new keys (float32/bf16/fp16), head_dim contiguous
    k_sb, k_sh, k_st,
    v_ptr,  # [batch, kv_heads, tokens, HEAD_DIM_V] new values, head_dim contiguous
    v_sb, v_sh, v_st,
    slots_ptr,  # [tokens] integer: the cache slot of each new token
    kd_ptr,  # [batch, kv_heads, capacity, HEAD_DIM_K] int8 / uint8 (e4m3 bytes) key codes, any strides
    kd_sb, kd_sh, kd_st, kd_sd,
    vd_ptr,  # [batch, kv_heads, capacity, HEAD_DIM_V] value codes, any strides
    vd_sb, vd_sh, vd_st, vd_sd,
    ks_ptr,  # [batch, kv_heads, capacity] float32 key scales, token-contiguous
    vs_ptr,  # [batch, kv_heads, capacity] float32 value scales, the key scales' strides
    s_sb, s_sh,
    num_heads, num_tokens,
    HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, FORMAT: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # One program: BLOCK_T new tokens of one (batch, kv-head), keys and values (whose head dims may differ: MLA).
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # b * batch stride passes 2**31 in large caches
    h = pid_bh % num_heads
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    slots = tl.load(slots_ptr + tokens, mask=token_mask, other=0)
    _quantize_tile(k_ptr, k_sb, k_sh, k_st, kd_ptr, kd_sb, kd_sh, kd_st, kd_sd, ks_ptr, s_sb, s_sh,
                   b, h, tokens, slots, token_mask, HEAD_DIM_K, BLOCK_DK, QMAX, FLOOR, FORMAT, INTERPRETED)
    _quantize_tile(v_ptr, v_sb, v_sh, v_st, vd_ptr, vd_sb, vd_sh, vd_st, vd_sd, vs_ptr, s_sb, s_sh,
                   b, h, tokens, slots, token_mask, HEAD_DIM_V, BLOCK_DV, QMAX, FLOOR, FORMAT, INTERPRETED)


_launch_quantize = Launcher(_quantize_kv_kernel)


def quantize_into_triton(
    key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, buffers: Sequence[torch.Tensor], mode: KVQuantMode
) -> None:
    """`hf_kvquant.ops.reference.quantize_into_reference`'s contract, one kernel launch for keys and values.

    ``slots`` is a device tensor (not a Python int) so that the launch can be captured in a CUDA graph.
    Keys and values may have different head dims (MLA), each at most `MAX_KERNEL_HEAD_DIM` (any size below it: the
    tile is padded to a power of two). Requires ``head_dim`` contiguous in the inputs and both scale buffers with
    equal strides.
    """
    key_data, key_scale, value_data, value_scale = buffers
    batch, num_heads, num_tokens, key_head_dim = key.shape
    value_head_dim = value.shape[-1]
    if min(key_head_dim, value_head_dim) < 1 or max(key_head_dim, value_head_dim) > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"hf_kvquant quantize kernel: key head_dim {key_head_dim}, value head_dim {value_head_dim}; "
                         f"accepted: 1 to {MAX_KERNEL_HEAD_DIM}")
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    assert key_scale.stride() == value_scale.stride()
    spec = mode.spec
    # Float8 codes are stored through byte views (under the interpreter they are computed as integers).
    kd, vd = (t.view(torch.uint8) if t.dtype.is_floating_point else t for t in (key_data, value_data))
    # Plain integer arithmetic: triton.next_power_of_2/cdiv cost microseconds of host time per call, per layer.
    block_dk, block_dv = 1 << (key_head_dim - 1).bit_length(), 1 << (value_head_dim - 1).bit_length()
    block_t = min(max(_TILE_ELEMENTS // max(block_dk, block_dv), 1), 1 << (num_tokens - 1).bit_length())
    grid = (-(-num_tokens // block_t), batch * num_heads)
    kd_sb, kd_sh, kd_st, kd_sd = kd.stride()
    vd_sb, vd_sh, vd_st, vd_sd = vd.stride()
    _launch_quantize(
        grid,
        k_ptr=key, k_sb=key.stride(0), k_sh=key.stride(1), k_st=key.stride(2),
        v_ptr=value, v_sb=value.stride(0), v_sh=value.stride(1), v_st=value.stride(2),
        slots_ptr=slots,
        kd_ptr=kd, kd_sb=kd_sb, kd_sh=kd_sh, kd_st=kd_st, kd_sd=kd_sd,
        vd_ptr=vd, vd_sb=vd_sb, vd_sh=vd_sh, vd_st=vd_st, vd_sd=vd_sd,
        ks_ptr=key_scale, vs_ptr=value_scale, s_sb=key_scale.stride(0), s_sh=key_scale.stride(1),
        num_heads=num_heads, num_tokens=num_tokens,
        HEAD_DIM_K=key_head_dim, BLOCK_DK=block_dk, HEAD_DIM_V=value_head_dim, BLOCK_DV=block_dv, BLOCK_T=block_t,
        QMAX=spec.qmax, FLOOR=SCALE_FLOOR, FORMAT=spec.kernel_format, INTERPRETED=_INTERPRETED,
        num_warps=_NUM_WARPS,
    )

