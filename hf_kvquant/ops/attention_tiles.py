"""The tile-level steps of the attention kernel (`hf_kvquant.ops.attention_kernel`), as Triton device functions: the
online softmax over K/V tiles (widened to the query's dtype, or Q.K^T on int8 key codes), the merge of split-KV
partials, and the store of finished rows."""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(_LOG2E)


@triton.jit
def _tanh(x):
    # tanh through exp: libdevice does not run in the Triton interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _as_codes(x):
    """``x`` (float32 within +-127) as two int8 tiles ``hi + lo / 254``, resolving 1/64516 of the range, for int8
    tensor-core dots against the stored codes. Rounding to nearest keeps ``hi`` within +-127 and, as
    ``|x - hi| <= 1/2``, ``lo`` too: no clamps."""
    hi = tl.floor(x + 0.5)
    return hi.to(tl.int8), tl.floor((x - hi) * 254.0 + 0.5).to(tl.int8)


@triton.jit
def _dot_codes(hi, lo, codes):
    """``(hi + lo / 254) @ codes`` in units of 1/254, float32 (exact in int32: at most 512 * 127 * 127 * 255)."""
    return (tl.dot(hi, codes, out_dtype=tl.int32) * 254 + tl.dot(lo, codes, out_dtype=tl.int32)).to(tl.float32)


@triton.jit
def _load_tile(ptrs, col_valid, d_valid, WHOLE: tl.constexpr, PAD_D: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] K/V tile, masked only where it can run out of range: tokens past the end of a partial tile
    (not WHOLE) and head_dim padding (PAD_D: a head_dim that is not a power of two, such as 80, 96 or 192). Unmasked
    loads need no predicates per row."""
    if not WHOLE:
        tile = tl.load(ptrs, mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    elif PAD_D:
        tile = tl.load(ptrs, mask=d_valid[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, q_lo, q_unit, q_pos, lo, hi,
    k_ptr, v_ptr, k_base, k_st, k_sd, v_base, v_st, v_sd, ks_row, vs_row, mask_ptr, mask_base,
    qk_scale, softcap, window, offs_dk, dk_valid, offs_dv, dv_valid, ring_shift, capacity,
    BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, SLIDING: tl.constexpr,
    POSITION_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, PAD_DK: tl.constexpr, PAD_DV: tl.constexpr,
    SAME_LAYOUT: tl.constexpr, CODE_QK: tl.constexpr, WIDE_DTYPE: tl.constexpr, RING: tl.constexpr,
):
    """Online softmax over tokens [lo, hi). Without POSITION_MASK the range is whole tiles that every row sees (tiles
    below the causal diagonal): no bounds, causal or window masks in the hot loop, only the padding mask if any.
    SAME_LAYOUT: keys and values have one head_dim and one layout (all but MLA), so one set of offsets serves both.
    CODE_QK: Q.K^T runs on the stored int8 key codes (tensor cores), the query as two code tiles (``q`` + ``q_lo``,
    ``q_unit`` per row, `_as_codes`); otherwise key tiles are widened to the query's dtype (WIDE_DTYPE), as value tiles
    always are.
    RING: [lo, hi) are slots of a ring buffer of ``capacity``, whose logical token 0 is in slot ``ring_shift``: masks
    and the padding mask take each slot's logical index, loads the slots themselves (contiguous runs)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_valid = cols < hi
        if RING:
            pos = cols - ring_shift
            pos = tl.where(pos < 0, pos + capacity, pos)  # the logical index of each slot
        else:
            pos = cols
        k_offsets = k_base + cols[:, None] * k_st + offs_dk[None, :] * k_sd
        if SAME_LAYOUT:
            v_offsets = k_offsets
        else:
            v_offsets = v_base + cols[:, None] * v_st + offs_dv[None, :] * v_sd
        k = _load_tile(k_ptr + k_offsets, col_valid, dk_valid, not POSITION_MASK, PAD_DK)
        if POSITION_MASK:
            k_scale = tl.load(ks_row + cols, mask=col_valid, other=0.0)
        else:
            k_scale = tl.load(ks_row + cols)
        if CODE_QK:
            scores = _dot_codes(q, q_lo, tl.trans(k)) * q_unit[:, None] * (k_scale * qk_scale)[None, :]
        else:
            # int8/e4m3 -> float32 -> query dtype: exact, the fastest widening measured, the interpreter gets it right.
            k = k.to(tl.float32).to(WIDE_DTYPE)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * qk_scale)[None, :]
        if SOFTCAP:
            scores = softcap * _tanh(scores / softcap) * LOG2E
        # base 2 from here on (LOG2E is in qk_scale or above)
        if POSITION_MASK:
            visible = col_valid[None, :] & (pos[None, :] <= q_pos[:, None])
            if SLIDING:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
        if HAS_MASK:
            keep = tl.load(mask_ptr + mask_base + pos, mask=col_valid, other=0)
            scores = tl.where((keep != 0)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        if POSITION_MASK:
            v_scale = tl.load(vs_row + cols, mask=col_valid, other=0.0)
        else:
            v_scale = tl.load(vs_row + cols)
        v = _load_tile(v_ptr + v_offsets, col_valid, dv_valid, not POSITION_MASK, PAD_DV)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = v.to(tl.float32).to(WIDE_DTYPE)
        p = (p * v_scale[None, :]).to(WIDE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _merge_splits(part_ptr, part_ml_ptr, pid_bh, num_splits, num_rows, rows, row_valid, offs_d, d_valid,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, AT_ONCE: tl.constexpr):
    """(acc, max, sum) of a row block over all splits, folding in the splits' partial softmaxes one at a time (online,
    as in the main loop). AT_ONCE splits per step, unrolled so that their loads are in flight together
    (one at a time, each step waits a memory latency; all at once compiles slowly and runs slower).
    The caller's own split is read back too: its registers are in the dot's layout, and mixing them in would move
    every loaded tile through shared memory. L1-bypassing loads: other SMs wrote the partials."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, AT_ONCE):
        for s in tl.static_range(AT_ONCE):
            part = (pid_bh * num_splits + first + s) * num_rows + rows
            valid = row_valid & (part < (pid_bh + 1) * num_splits * num_rows)  # split first + s exists
            split_m = tl.load(part_ml_ptr + part * 2, mask=valid, other=float("-inf"), cache_modifier=".cg")
            split_l = tl.load(part_ml_ptr + part * 2 + 1, mask=valid, other=0.0, cache_modifier=".cg")
            split_acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                                mask=valid[:, None] & d_valid[None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_i, split_m)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            weight = tl.exp2(split_m - m_safe)
            acc = acc * alpha[:, None] + split_acc * weight[:, None]
            l_i = l_i * alpha + split_l * weight
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_rows(o_ptr, acc, m_i, l_i, b, q_idx, head, row_valid, offs_d, d_valid, o_sb, o_st, o_sh, sink_ptr,
                HAS_SINKS: tl.constexpr):
    if HAS_SINKS:
        # A sink is one more logit in each query head's softmax denominator, with no value: exp(sink - max) joins the
        # sum (a row that saw no key gives all its weight to the sink: zeros).
        sink = tl.load(sink_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * LOG2E
        l_i = l_i + tl.exp2(sink - m_i)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key at all (padding queries): zeros
    tl.store(o_ptr + b * o_sb + q_idx[:, None] * o_st + head[:, None] * o_sh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
