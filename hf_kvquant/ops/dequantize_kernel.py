"""Dequantize-to-scratch in Triton: the live window of one layer's codes and scales widened to the query's dtype in
one pass, by the math of `hf_kvquant.ops.reference.dequantize` (float32 product, rounded once).

A long prefill hands the result to PyTorch's fused attention (cuDNN / flash), which runs tensor cores at full rate
where the quantized-tile kernel widens every tile in its inner loop. The scratch lives for one call: one layer's
keys and values of the window at a time, never a full-precision copy of the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher

# Elements per program: a few KB of codes in, enough bytes in flight per SM.
_TILE_ELEMENTS = 8192
_NUM_WARPS = 4


@triton.jit
def _dequantize_kernel(
    data_ptr,  # [batch, heads, capacity, HEAD_DIM] int8 / float8e4nv codes, any strides
    d_sb, d_sh, d_st, d_sd,
    scale_ptr,  # [batch, heads, capacity] float32, token-contiguous
    s_sb, s_sh,
    out_ptr,  # [batch, heads, tokens, HEAD_DIM], contiguous
    start, tokens, heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)  # b * batch stride passes 2**31 in large caches
    h = pid_bh % heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_valid = offs_t < tokens
    valid = t_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    slots = (start + offs_t).to(tl.int64)
    codes = tl.load(data_ptr + b * d_sb + h * d_sh + slots[:, None] * d_st + offs_d[None, :] * d_sd,
                    mask=valid)
    scale = tl.load(scale_ptr + b * s_sb + h * s_sh + slots, mask=t_valid, other=0.0)
    x = codes.to(tl.float32) * scale[:, None]
    rows = pid_bh.to(tl.int64) * tokens + offs_t  # out is contiguous [batch, heads, tokens, head_dim]
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], x.to(out_ptr.dtype.element_ty), mask=valid)


_launch_dequantize = Launcher(_dequantize_kernel)


def dequantize_window(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, start: int = 0,
                      end: int | None = None) -> torch.Tensor:
    """Slots ``[start, end)`` (``end`` None: the capacity) of the codes ``data [batch, kv_heads, capacity, head_dim]``
    and their float32 ``scale [batch, kv_heads, capacity]`` as a new contiguous ``[batch, kv_heads, end - start,
    head_dim]`` tensor of ``dtype``: ``reference.dequantize(data, scale, dtype)`` of the window, bit for bit (a rotated
    cache's codes stay rotated)."""
    batch, heads, capacity, head_dim = data.shape
    tokens = (capacity if end is None else end) - start
    out = torch.empty(batch, heads, tokens, head_dim, device=data.device, dtype=dtype)
    if out.numel() == 0:
        return out
    if scale.stride(-1) != 1:
        raise ValueError("dequantize_window needs token-contiguous scales")
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t = max(1, _TILE_ELEMENTS // block_d)
    d_sb, d_sh, d_st, d_sd = data.stride()
    s_sb, s_sh, _ = scale.stride()
    _launch_dequantize(
        (triton.cdiv(tokens, block_t), batch * heads),
        data_ptr=data, d_sb=d_sb, d_sh=d_sh, d_st=d_st, d_sd=d_sd,
        scale_ptr=scale, s_sb=s_sb, s_sh=s_sh,
        out_ptr=out, start=start, tokens=tokens, heads=heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
        num_warps=_NUM_WARPS,
    )
    return out
