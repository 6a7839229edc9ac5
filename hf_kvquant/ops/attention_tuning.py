"""Block sizes, occupancy and split-KV sizing of the attention kernel (`hf_kvquant.ops.attention_kernel`): the host-side
choices, each from a sweep on Hopper whose figures are in eval/results/kernel_tuning.md."""

from __future__ import annotations

import functools

# Decode: split the tokens into as many parts as keep the programs at or under this many per SM (long programs stream
# best; more where heads pad to at most 64 channels, whose tiles hold half the bytes: `_decode_occupancy`), each split
# at least this long, and into at most _MAX_SPLITS (one program merges them all).
_PROGRAMS_PER_SM = 2
_MIN_SPLIT_TOKENS = 512
_MAX_SPLITS = 32


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# Rows per (batch, KV head) up to which a call is a decode step: one loop over long K/V streams, split across programs.
_DECODE_ROWS = 64


# Channels x tokens (or rows) of the largest K/V tile (and output block) a program holds: the tiles of head_dim 256
# (BLOCK_N 64, BLOCK_M 64) tuned in the sweep. Wider heads take fewer tokens and rows per tile, so that head_dim 512
# needs no more registers or shared memory (pipelined K/V stages) than 256 did.
_TILE_CHANNEL_TOKENS = 256 * 64


@functools.lru_cache
def _block_sizes(num_rows: int, block_d: int, float32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``block_d`` channels (the wider of the keys' and values' head
    dims, padded to a power of two), from a sweep over head_dim 64-256 (eval/results/kernel_tuning.md).

    Float32 queries take exact (FMA, not tensor-core) dots, whose tiles the bf16 sizes do not fit in registers: the
    spills would be reserved as local memory for every thread the GPU can hold. Small tiles and no pipelining compile
    without spills for head_dim 64-256."""
    most = _TILE_CHANNEL_TOKENS // block_d  # 64 tokens or rows at 256, 32 at 512
    # Past 256 channels a row of a tile is too wide for 4 warps' registers: 8 warps share each tile.
    warps = 4 if block_d <= 256 else 8
    if float32:
        return 16, min(64, most) if block_d <= 256 else 16, 8, 1
    # Past 256 channels fewer stages and prefill rows: with a length not a multiple of 16 the masked tiles' addresses
    # spilled registers (sm_90, triton 3.6).
    wide = block_d > 256
    if num_rows <= _DECODE_ROWS:
        block_m = min(max(16, _next_power_of_2(num_rows)), most)
        return block_m, min(128, most), warps, 2 if wide else 3
    return 16 if wide else min(64, most), min(128, most), warps, 1 if wide else 2


def _decode_occupancy(block_d: int, block_m: int, num_warps: int, programs: int, most_splits: int,
                      sms: int) -> tuple[int, int]:
    """(programs per SM, warps per program) of a decode step with ``programs`` row blocks, each split into at most
    ``most_splits``. 2 per SM; heads of at most 64 channels (``block_d``) hold half the bytes per tile: 3 per SM, or 4
    of 2 warps each where there are enough to fill every SM 4 deep (twice the bytes in flight for the warps of 2).
    With too few programs (batch 1) 4 per SM was slower, and rows of 64 (q_len 8) spill with 2 warps (figures:
    eval/results/kernel_tuning.md, "Decode occupancy of narrow heads")."""
    if block_d > 64:
        return _PROGRAMS_PER_SM, num_warps
    if num_warps == 4 and block_m == 16 and programs * most_splits >= 4 * sms:
        return 4, 2
    return 3, num_warps


def _merge_width(splits: int, block_dv: int) -> int:
    """Splits' partials the merge reads at once (unrolled: their loads are in flight together): 8, or 16 past 8 splits
    (one memory latency fewer per 16). Values wider than 256 channels two at a time: more [rows, 512] float32 tiles in
    flight spill registers; 32 at once spilled at 128 channels, and fewer than 8 as well (ptxas, sm_90; H200:
    `test_widest_heads_compile_without_spills`, keys of 512 and values of 64 two at a time)."""
    if block_dv > 256:
        return 2
    return 16 if splits > 8 else 8
