"""The Hadamard rotation of head_dim that a quantized cache can apply before quantizing (``hadamard=True``).

Why: per-token-head quantization spends one scale on a whole ``head_dim`` vector, so a few outlier channels
(large in every token, as in Gemma 3's keys) set the scale and leave the other channels only a few quantization
steps. An orthogonal Hadamard rotation spreads every channel over all the others: the rotated vector has the same
norm but a much smaller absmax, so the same INT8 codes resolve it more finely. With the cache in the loop
(eval/results/perplexity_gemma3*.md, 67k WikiText-2 tokens): Gemma-3-270M INT8 +0.95 % -> +0.13 %. FP8's error is
relative to each value, so outliers cost it less and the rotation gains less there (+1.02 % -> +0.98 %).

Attention is unchanged by the rotation up to quantization, because ``R`` is orthogonal (``R @ R.T = I``):

    q . k              = (q @ R) . (k @ R)                  scores: rotate the query too
    sum_j p_j * v_j    = (sum_j p_j * (v_j @ R)) @ R.T      output: un-rotate it

It needs no calibration, keeps one scale per token-head (so heads stay independent under tensor parallelism),
and adds no per-token storage: one ``head_dim x head_dim`` matrix per (head_dim, device, dtype), shared by
every layer and cache.
"""

from __future__ import annotations

import functools
import math

import torch


def _largest_power_of_two_dividing(n: int) -> int:
    return n & -n


def hadamard_matrix(
    head_dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The normalised Hadamard matrix ``R [head_dim, head_dim]`` (orthogonal and symmetric), built once per
    (head_dim, device, dtype) and shared: the same tensor object on every call. Never modify it in place.

    For a power-of-two ``head_dim`` it is the Sylvester Hadamard matrix divided by ``sqrt(head_dim)``. Otherwise
    (96 = 3 x 32) it is block-diagonal: Sylvester blocks of the largest power of two dividing ``head_dim``, each
    mixing its own channels only.
    """
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device: one matrix
        device = torch.device("cuda", torch.cuda.current_device())
    return _hadamard_matrix(head_dim, device, dtype)


@functools.cache
def _hadamard_matrix(head_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    block = _largest_power_of_two_dividing(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    h = h / math.sqrt(block)
    return torch.block_diag(*[h] * (head_dim // block)).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x [..., head_dim] @ rotation`` in float32 (``x`` unchanged when ``rotation`` is None)."""
    return x if rotation is None else x.float() @ rotation


def unrotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x [..., head_dim] @ rotation.T`` in float32, the inverse of `rotate` (``x`` unchanged when None)."""
    return x if rotation is None else x.float() @ rotation.T
