"""Attention over the quantized cache in Triton: one kernel for decode and prefill, by the rules of
`hf_kvquant.ops.reference.attention_reference`, reading slots ``[start, end)`` of a layer's cache buffers (codes and
scales, as the cache stores them) directly.

The key scale multiplies the score row (``(q . k_q[j]) * k_scale[j] * scaling``) and the value scale the
probabilities before ``P . V``. Each int8/fp8 tile is converted to the query's dtype in registers (exact: int8 and
e4m3 values are representable in bf16/fp16); no dequantized copy is ever written. Decode steps over int8 caches with
keys padded to 64, 128 or 256 channels skip that conversion for them: Q.K^T runs on the stored key codes (int8 tensor
cores), the query split into two int8 tiles ``hi + lo / 254`` that resolve 1/64516 of its range (`_CODE_QK_HEAD_DIMS`).

One program owns a block of *rows* of one (batch, KV head): row ``r`` is query ``r // group`` of query
head ``kv_head * group + r % group``, so the query heads that share a KV head read each K/V tile once
(GQA), decode (``q_len`` = 1: the group's heads fill the rows) and prefill (many rows) are the same
kernel. When rows alone give too few programs to fill the GPU (decode), the visible tokens are split
across programs as well (flash-decoding); the last program of a row block to finish merges the partial
softmaxes, in the same launch (one launch per call: in eager decoding the host's launch time is what
small batches wait on). Tuning measurements: eval/results/kernel_tuning.md.

Codes are read through all four of their strides. Full-attention and preallocated cache layers store values
token-minor (`hf_kvquant.cache.token_minor_zeros`): P.V sums over tokens, and 8-bit tensor-core operands need the
summed dimension contiguous, so a head_dim-minor value tile is gathered from shared memory one byte per instruction, a
token-minor one a word at a time (from 16-byte aligned rows; a window starting off that alignment loses it, hence the
compacting sliding-window layer keeps head_dim-minor values).

Any head_dim up to `MAX_KERNEL_HEAD_DIM` (512): tiles are padded to the next power of two (at least 16, the smallest
``tl.dot``) and masked. Keys (and queries) and values may have different head dims (MLA); the output has the values'.
Heads wider than 256 take fewer tokens and rows per tile (`_block_sizes`), so their tiles fit where 256's did.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from .attention_tiles import _LOG2E, _as_codes, _attend_tiles, _merge_splits, _store_rows
from .attention_tuning import (
    _DECODE_ROWS,
    _MAX_SPLITS,
    _MIN_SPLIT_TOKENS,
    _block_sizes,
    _decode_occupancy,
    _merge_width,
    _next_power_of_2,
)
from .launch import Launcher
from .limits import MAX_KERNEL_HEAD_DIM

# Decode steps of half-precision queries over int8 caches take Q.K^T on the stored key codes (int8 tensor cores) where
# the keys pad to 64, 128 or 256 channels: the query splits into two int8 tiles once per program, and no key code is
# widened, which made small batches at 256 channels faster and left large ones unchanged. P.V widens its value tiles:
# splitting P into codes costs a conversion per row and token of every tile, and measured slower at head_dim 128 and
# 64, as did code dots in prefill tiles. FP8 caches widen their tiles: Hopper's tensor cores take e4m3 only through
# wgmma, whose 64-row tiles a decode step (a few rows) would mostly waste. Figures: eval/results/kernel_tuning.md,
# "Decode dots on the int8 codes" and "Q.K^T on key codes at head_dim 256".
_CODE_QK_HEAD_DIMS = (64, 128, 256)


@triton.jit
def _attention_kernel(
    q_ptr,  # [batch, heads, q_len, HEAD_DIM_K], the query's dtype, head_dim contiguous
    q_sb, q_sh, q_st,
    k_ptr,  # [batch, kv_heads, capacity, HEAD_DIM_K] int8 / float8e4nv key codes, any strides
    k_sb, k_sh, k_st, k_sd,
    v_ptr,  # [batch, kv_heads, capacity, HEAD_DIM_V] value codes, any strides (token-minor in most cache layers)
    v_sb, v_sh, v_st, v_sd,
    ks_ptr,  # [batch, kv_heads, capacity] float32 key scales, token-contiguous
    ks_sb, ks_sh,
    vs_ptr,  # [batch, kv_heads, capacity] float32 value scales, token-contiguous
    vs_sb, vs_sh,
    mask_ptr,  # [batch, >= mask_offset + tokens] uint8 padding mask, column mask_offset + i for logical token i (a
    #            ring: its absolute position), 1 = attend (HAS_MASK)
    mask_sb,
    o_ptr,  # [batch, q_len, heads, HEAD_DIM_V], the query's dtype, contiguous
    o_sb, o_st, o_sh,
    part_ptr,  # [batch * kv_heads * splits * q_len * GROUP * (HEAD_DIM_V + 2)] float32 split partials (SPLIT)
    count_ptr,  # [>= row blocks * batch * kv_heads] int32, zero between launches (SPLIT)
    len_ptr,  # [] integer: the live slots from kv_start (LEN_ON_DEVICE); a ring's tokens ever written
    sink_ptr,  # [heads] attention-sink logits (HAS_SINKS)
    kv_start, kv_len, q_len, num_kv_heads, tokens_per_split, mask_offset,
    qk_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM_K: tl.constexpr, BLOCK_DK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LEN_ON_DEVICE: tl.constexpr, HAS_SINKS: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, CODE_QK: tl.constexpr, MERGE_AT_ONCE: tl.constexpr, RING: tl.constexpr,
):
    # Row blocks in reverse: in a causal prefill the last ones read the most tiles, so they start first and the
    # short ones fill the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    capacity = kv_len
    ring_shift = 0
    mask_col0 = mask_offset
    if LEN_ON_DEVICE:
        # A preallocated cache (CUDA graphs): the grid is fixed by the capacity, the live length read here, and the
        # splits cut it evenly (those past its end exit at once).
        kv_len = tl.load(len_ptr).to(tl.int32)
        if RING:
            # A ring of `capacity` slots holding the last tokens of `total` (token p in slot p % capacity): its
            # kv_len visible ones are logical tokens 0.. (position total - kv_len + i), from slot ring_shift on.
            total = kv_len
            kv_len = tl.minimum(total, capacity)
            ring_shift = (total - kv_len) % capacity
            mask_col0 = mask_offset + total - kv_len
        tokens_per_split = tl.cdiv(tl.cdiv(kv_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    b = (pid_bh // num_kv_heads).to(tl.int64)  # b * batch stride passes 2**31 in large caches
    kv_head = pid_bh % num_kv_heads
    num_rows = q_len * GROUP

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    q_idx = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    # Queries and keys have HEAD_DIM_K channels, values and the output HEAD_DIM_V (they differ in MLA latents), each
    # padded to a power of two.
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_valid = offs_dk < HEAD_DIM_K
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_valid = offs_dv < HEAD_DIM_V
    q = tl.load(q_ptr + b * q_sb + head[:, None] * q_sh + q_idx[:, None] * q_st + offs_dk[None, :],
                mask=row_valid[:, None] & dk_valid[None, :], other=0.0)
    q_lo = q
    q_unit = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CODE_QK:
        # The query as two code tiles per row (`_as_codes`), in units of its largest channel / 127 / 254.
        q = q.to(tl.float32)
        q_amax = tl.max(tl.abs(q), axis=1)
        q_unit = tl.where(q_amax > 0.0, q_amax / 127.0, 1.0)
        q, q_lo = _as_codes(q / q_unit[:, None])
        q_unit = q_unit / 254.0
    q_pos = kv_len - q_len + q_idx  # visible position of each row's query
    first_pos = kv_len - q_len + (pid_m * BLOCK_M) // GROUP
    last_pos = kv_len - q_len + (tl.minimum(pid_m * BLOCK_M + BLOCK_M, num_rows) - 1) // GROUP

    # The tokens this program reads: its split, cut by causality (and the window) of its rows. A ring's split is a
    # range of slots, whose logical order wraps: no cut, every token is masked by its logical index.
    lo = pid_s * tokens_per_split
    if RING:
        hi = tl.minimum(lo + tokens_per_split, kv_len)
    else:
        hi = tl.minimum(tl.minimum(lo + tokens_per_split, kv_len), last_pos + 1)
        if SLIDING:
            lo = tl.maximum(lo, (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N)
    # Whole tiles at or before the first row's position are visible to every row of the block: an unmasked loop over
    # them, then a masked one over the rest (the diagonal, a split's last partial tile). Decode steps gain too: their
    # loads then need no bounds (eval/results/kernel_tuning.md, "Whole tiles unmasked in decode too"). Window edges
    # mask every tile. In a ring, whole tiles are unmasked where every row sees every token: a decode step, with a
    # window no shorter than the ring's live tokens.
    bulk_end = lo
    if RING:
        sees_all = first_pos >= kv_len - 1
        if SLIDING:
            sees_all = sees_all & (last_pos - window + 1 <= 0)
        bulk_end = tl.where(sees_all, tl.maximum(lo, lo + (hi - lo) // BLOCK_N * BLOCK_N), lo)
    elif not SLIDING:
        bulk_end = tl.maximum(lo, lo + (tl.minimum(hi, first_pos + 1) - lo) // BLOCK_N * BLOCK_N)

    k_base = b * k_sb + kv_head * k_sh + kv_start * k_st
    v_base = b * v_sb + kv_head * v_sh + kv_start * v_st
    ks_row = ks_ptr + b * ks_sb + kv_head * ks_sh + kv_start  # the scales of this (batch, KV head)'s slots
    vs_row = vs_ptr + b * vs_sb + kv_head * vs_sh + kv_start
    mask_base = b * mask_sb + mask_col0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if RING or not SLIDING:
        acc, m_i, l_i = _attend_tiles(
            acc, m_i, l_i, q, q_lo, q_unit, q_pos, lo, bulk_end,
            k_ptr, v_ptr, k_base, k_st, k_sd, v_base, v_st, v_sd, ks_row, vs_row, mask_ptr, mask_base,
            qk_scale, softcap, window, offs_dk, dk_valid, offs_dv, dv_valid, ring_shift, capacity,
            BLOCK_N, HAS_MASK, SOFTCAP, SLIDING, False, DOT_PRECISION, HEAD_DIM_K != BLOCK_DK, HEAD_DIM_V != BLOCK_DV,
            SAME_LAYOUT, CODE_QK, q_ptr.dtype.element_ty, RING)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_lo, q_unit, q_pos, bulk_end, hi,
        k_ptr, v_ptr, k_base, k_st, k_sd, v_base, v_st, v_sd, ks_row, vs_row, mask_ptr, mask_base,
        qk_scale, softcap, window, offs_dk, dk_valid, offs_dv, dv_valid, ring_shift, capacity,
        BLOCK_N, HAS_MASK, SOFTCAP, SLIDING, True, DOT_PRECISION, HEAD_DIM_K != BLOCK_DK, HEAD_DIM_V != BLOCK_DV,
        SAME_LAYOUT, CODE_QK, q_ptr.dtype.element_ty, RING)

    if SPLIT:
        # Partials [batch, kv_heads, splits, rows, ...]: all the outputs (HEAD_DIM_V each), then all the (max, sum)
        # pairs, in one buffer. The last split of the row block to finish merges them, in this same launch: in eager
        # decoding a second kernel would cost more host time than the merge costs the GPU.
        num_splits = tl.num_programs(2)
        part_ml_ptr = part_ptr + tl.num_programs(1) * num_splits * num_rows * HEAD_DIM_V
        part = (pid_bh * num_splits + pid_s) * num_rows + rows
        tl.store(part_ptr + part[:, None] * HEAD_DIM_V + offs_dv[None, :], acc,
                 mask=row_valid[:, None] & dv_valid[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)
        # Every thread's stores come before the count (barrier, then a release at GPU scope); the last program's
        # reads come after it (acquire).
        tl.debug_barrier()
        counter = count_ptr + pid_bh * tl.num_programs(0) + pid_m
        if tl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
            tl.atomic_xchg(counter, 0)  # ready for the next launch
            acc, m_i, l_i = _merge_splits(part_ptr, part_ml_ptr, pid_bh, num_splits, num_rows, rows, row_valid,
                                          offs_dv, dv_valid, BLOCK_M, BLOCK_DV, HEAD_DIM_V, MERGE_AT_ONCE)
            _store_rows(o_ptr, acc, m_i, l_i, b, q_idx, head, row_valid, offs_dv, dv_valid, o_sb, o_st, o_sh,
                        sink_ptr, HAS_SINKS)
    else:
        _store_rows(o_ptr, acc, m_i, l_i, b, q_idx, head, row_valid, offs_dv, dv_valid, o_sb, o_st, o_sh, sink_ptr,
                    HAS_SINKS)


_launch_attention = Launcher(_attention_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


_split_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 zeros, kept per device and stream across launches (no memset launch per call):
    launches on one stream run in order, and the last split of each row block resets its counter for the next. The
    split partials, by contrast, are allocated per call: kept, the largest prefill's would stay held.

    Threads: the current stream is per thread, so threads on their own streams never share counters. Threads on one
    stream may both build them (a race on the dict entry): each launch keeps the tensor it got, and the one dropped is
    freed to that stream's pool, reused only after the launches queued on it."""
    key = (device, driver.active.get_current_stream(device.index) if device.type == "cuda" else 0)
    counters = _split_counters.get(key)
    if counters is None or counters.numel() < count:
        counters = _split_counters[key] = torch.zeros(max(count, 1024), device=device, dtype=torch.int32)
    return counters


def quantized_attention(
    query: torch.Tensor,
    key_data: torch.Tensor,
    key_scale: torch.Tensor,
    value_data: torch.Tensor,
    value_scale: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    length: torch.Tensor | None = None,
    ring: bool = False,
    mask_offset: int = 0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    own_workspace: bool = False,
) -> torch.Tensor:
    """Attention of ``query [batch, heads, q_len, head_dim]`` over slots ``[start, end)`` (``end`` None: the capacity)
    of the quantized cache (Triton): codes ``key_data [batch, kv_heads, capacity, head_dim]`` and ``value_data [batch,
    kv_heads, capacity, value_head_dim]`` (int8 or float8_e4m3fn, any strides), their float32 scales ``key_scale`` and
    ``value_scale [batch, kv_heads, capacity]``. Keys have the query's head_dim, values may have another (MLA latents);
    each is at most `MAX_KERNEL_HEAD_DIM`, and any size below it works (tiles are padded to a power of two, at least
    16).

    ``padding_mask`` is ``[batch, columns]`` (True/1 = attend), column ``mask_offset + i`` for the ``i``-th token
    attended to, or None; ``sinks`` ``[heads]`` one logit per query head that joins the softmax's denominator
    (gpt-oss), or None. Returns ``[batch, q_len, heads, value_head_dim]`` in the query's dtype, as transformers'
    attention functions do. With ``length`` (a preallocated cache: a 0-d integer tensor on the device, the live slots
    from ``start``) the live length is read on the device, so one launch serves every step.

    ``ring`` (with ``length``): slots ``[start, end)`` are a ring buffer of ``capacity = end - start`` slots holding
    the last tokens of the ``length`` ever written, token ``p`` in slot ``start + p % capacity``; attention sees its
    ``n = min(length, capacity)`` tokens in position order (``length - n + i``), the queries the last ``q_len`` of
    them, and the padding mask's column of token ``i`` is its position ``mask_offset + length - n + i``. That is the
    model's attention wherever every query's past is still held (a prefill that wraps the ring needs a window built
    for it). Fast in decode steps: the ring is read in slot order, masks take logical indices.

    ``own_workspace`` allocates the split counters for this call instead of reusing per-stream ones (inside a captured
    graph).

    Host work is kept to a few microseconds besides the launches (`Launcher`, plain integer arithmetic): in eager
    decoding the host, not the GPU, sets the pace at small batches.
    """
    if ring and length is None:
        raise ValueError("hf_kvquant attention kernel: a ring buffer needs its token count on the device (length)")
    batch, heads, q_len, head_dim = query.shape
    _, kv_heads, capacity, key_head_dim = key_data.shape
    value_head_dim = value_data.shape[-1]
    widest = max(key_head_dim, value_head_dim)
    if head_dim != key_head_dim or min(key_head_dim, value_head_dim) < 1 or widest > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"hf_kvquant attention kernel: query head_dim {head_dim}, key head_dim {key_head_dim}, value "
                         f"head_dim {value_head_dim}; accepted: query and key of one head_dim, each head_dim from 1 "
                         f"to {MAX_KERNEL_HEAD_DIM}")
    kv_len = (capacity if end is None else end) - start  # with a length on the device: what sizes the grid
    group = heads // kv_heads
    num_rows = q_len * group
    if query.stride(-1) != 1:
        query = query.contiguous()
    device = query.device
    out = torch.empty(batch, q_len, heads, value_head_dim, device=device, dtype=query.dtype)
    scaling = head_dim**-0.5 if scaling is None else scaling

    # At least 16: the smallest tl.dot operand.
    block_dk, block_dv = max(16, _next_power_of_2(head_dim)), max(16, _next_power_of_2(value_head_dim))
    code_qk = (query.dtype != torch.float32 and key_data.dtype == torch.int8
               and block_dk in _CODE_QK_HEAD_DIMS and num_rows <= _DECODE_ROWS)
    block_m, block_n, num_warps, num_stages = _block_sizes(num_rows, max(block_dk, block_dv),
                                                           query.dtype == torch.float32)
    row_blocks = _cdiv(num_rows, block_m)
    programs = row_blocks * batch * kv_heads
    most_splits = max(1, min(kv_len // _MIN_SPLIT_TOKENS, _MAX_SPLITS))
    sms = _num_sms(device)
    per_sm, num_warps = _decode_occupancy(max(block_dk, block_dv), block_m, num_warps, programs, most_splits, sms)
    splits = max(1, min(per_sm * sms // programs, most_splits))
    tokens_per_split = _cdiv(_cdiv(kv_len, splits), block_n) * block_n
    splits = max(1, _cdiv(kv_len, tokens_per_split))

    if splits > 1:
        partials = torch.empty(batch * kv_heads * splits * num_rows * (value_head_dim + 2), device=device)
        count = row_blocks * batch * kv_heads
        counters = (torch.zeros(count, device=device, dtype=torch.int32) if own_workspace
                    else _counters(device, count))
    else:
        partials = counters = out  # unused
    if padding_mask is not None and padding_mask.dtype == torch.bool:
        padding_mask = padding_mask.view(torch.uint8)  # same bytes, a pointer type Triton loads

    q_sb, q_sh, q_st, _ = query.stride()
    k_sb, k_sh, k_st, k_sd = key_data.stride()
    v_sb, v_sh, v_st, v_sd = value_data.stride()
    same_layout = head_dim == value_head_dim and key_data.stride() == value_data.stride()
    ks_sb, ks_sh, _ = key_scale.stride()
    vs_sb, vs_sh, _ = value_scale.stride()
    o_sb, o_st, o_sh = q_len * heads * value_head_dim, heads * value_head_dim, value_head_dim  # out is contiguous
    _launch_attention(
        (row_blocks, batch * kv_heads, splits),
        q_ptr=query, q_sb=q_sb, q_sh=q_sh, q_st=q_st,
        k_ptr=key_data, k_sb=k_sb, k_sh=k_sh, k_st=k_st, k_sd=k_sd,
        v_ptr=value_data, v_sb=v_sb, v_sh=v_sh, v_st=v_st, v_sd=v_sd,
        ks_ptr=key_scale, ks_sb=ks_sb, ks_sh=ks_sh,
        vs_ptr=value_scale, vs_sb=vs_sb, vs_sh=vs_sh,
        # Pointers the kernel does not read (HAS_MASK, SPLIT, LEN_ON_DEVICE or HAS_SINKS false) get the output.
        mask_ptr=out if padding_mask is None else padding_mask,
        mask_sb=0 if padding_mask is None else padding_mask.stride(0),
        o_ptr=out, o_sb=o_sb, o_st=o_st, o_sh=o_sh,
        part_ptr=partials, count_ptr=counters, len_ptr=out if length is None else length,
        sink_ptr=out if sinks is None else sinks,
        kv_start=start, kv_len=kv_len, q_len=q_len, num_kv_heads=kv_heads, tokens_per_split=tokens_per_split,
        mask_offset=mask_offset,
        qk_scale=scaling if softcap is not None else scaling * _LOG2E, softcap=softcap or 1.0,
        window=sliding_window or 0,
        GROUP=group, HEAD_DIM_K=head_dim, BLOCK_DK=block_dk, HEAD_DIM_V=value_head_dim, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=padding_mask is not None, SLIDING=sliding_window is not None, SOFTCAP=softcap is not None,
        SPLIT=splits > 1,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", LEN_ON_DEVICE=length is not None,
        HAS_SINKS=sinks is not None, SAME_LAYOUT=same_layout, CODE_QK=code_qk,
        MERGE_AT_ONCE=_merge_width(splits, block_dv), RING=ring,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
