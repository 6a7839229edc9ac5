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

Keys and values of different head dims (MLA models cache a latent of ``kv_lora_rank`` channels as keys and the
rotary key part as values) are each rotated by the matrix of their own head_dim: the query goes with the keys' and
the output with the values' (`KeyValueRotation`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def _largest_power_of_two_dividing(n: int) -> int:
    return n & -n


def hadamard_matrix(
    head_dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The normalised Hadamard matrix ``R [head_dim, head_dim]`` (orthogonal and symmetric), built once per
    (head_dim, device, dtype) and shared: the same tensor object on every call. Never modify it in place.

    For a power-of-two ``head_dim`` it is the Sylvester Hadamard matrix divided by ``sqrt(head_dim)``. Otherwise
    (96 = 3 x 32, 80 = 5 x 16, 192 = 3 x 64) it is block-diagonal: Sylvester blocks of the largest power of two
    dividing ``head_dim``, each mixing its own channels only (an odd head_dim gets blocks of 1: no rotation at all).
    """
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")
    return _hadamard_matrix(head_dim, _one_name(device), dtype)


def _one_name(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device: one matrix
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.cache
def _hadamard_matrix(head_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    block = _largest_power_of_two_dividing(head_dim)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    h = h / math.sqrt(block)
    return torch.block_diag(*[h] * (head_dim // block)).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class KeyValueRotation:
    """The rotations of a layer whose keys and values have different head dims (MLA): ``key [key_head_dim,
    key_head_dim]`` and ``value [value_head_dim, value_head_dim]``. `rotate` and `unrotate` take it in place of a
    matrix and apply to each tensor the matrix of its own head_dim, so that one object serves keys, values, queries
    (the keys' head_dim) and attention outputs (the values')."""

    key: torch.Tensor
    value: torch.Tensor

    def for_head_dim(self, head_dim: int) -> torch.Tensor:
        if head_dim == self.key.shape[-1]:
            return self.key
        if head_dim == self.value.shape[-1]:
            return self.value
        raise ValueError(f"no rotation for head_dim {head_dim}: this layer's keys have {self.key.shape[-1]} channels "
                         f"and its values {self.value.shape[-1]}")


def layer_rotation(
    key_head_dim: int, value_head_dim: int, device: torch.device | str = "cpu"
) -> torch.Tensor | KeyValueRotation:
    """What a ``hadamard=True`` layer rotates its keys and values by: the shared Hadamard matrix of their head_dim, or,
    where the head dims differ, a `KeyValueRotation` of the two (built once per head dims and device, like the
    matrices)."""
    if key_head_dim == value_head_dim:
        return hadamard_matrix(key_head_dim, device)
    return _key_value_rotation(key_head_dim, value_head_dim, _one_name(device))


@functools.cache
def _key_value_rotation(key_head_dim: int, value_head_dim: int, device: torch.device) -> KeyValueRotation:
    return KeyValueRotation(hadamard_matrix(key_head_dim, device), hadamard_matrix(value_head_dim, device))


def _matrix(rotation: torch.Tensor | KeyValueRotation, head_dim: int) -> torch.Tensor:
    return rotation.for_head_dim(head_dim) if isinstance(rotation, KeyValueRotation) else rotation


def rotate(x: torch.Tensor, rotation: torch.Tensor | KeyValueRotation | None) -> torch.Tensor:
    """``x [..., head_dim] @ rotation`` in float32 (``x`` unchanged when ``rotation`` is None; a `KeyValueRotation`
    gives the matrix of x's head_dim)."""
    return x if rotation is None else x.float() @ _matrix(rotation, x.shape[-1])


def unrotate(x: torch.Tensor, rotation: torch.Tensor | KeyValueRotation | None) -> torch.Tensor:
    """``x [..., head_dim] @ rotation.T`` in float32, the inverse of `rotate` (``x`` unchanged when None)."""
    return x if rotation is None else x.float() @ _matrix(rotation, x.shape[-1]).T
