"""What a quantized layer accepts as new keys and values, checked before anything changes."""

from __future__ import annotations

import torch

from ..ops import MAX_KERNEL_HEAD_DIM

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The dtype of the tokens a layer was filled with, as its state names it.
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}


def check_hadamard(hadamard) -> bool:
    if not isinstance(hadamard, bool):
        raise ValueError(f"hadamard must be True or False; got {hadamard!r}")
    return hadamard


def check_crop_argument(tokens_to_remove: int) -> None:
    """`crop` takes the negative number of tokens to remove, as in transformers 5."""
    if tokens_to_remove > 0:
        raise ValueError(
            f"crop({tokens_to_remove}): pass a negative number of tokens to remove (transformers' convention)"
        )


def check_new_states(key_states: torch.Tensor, value_states: torch.Tensor, values_per_byte: int) -> tuple[int, int]:
    """Raise where ``key_states``/``value_states`` are not ``[batch, kv_heads, tokens, head_dim]`` tensors any layer
    can store (dtype, device, head dims the kernels take); return their (key, value) head dims."""
    if not isinstance(key_states, torch.Tensor) or not isinstance(value_states, torch.Tensor):
        raise TypeError("key_states and value_states must be torch.Tensor")
    if key_states.dim() != 4 or value_states.dim() != 4 or key_states.shape[:3] != value_states.shape[:3]:
        raise ValueError(
            "key_states and value_states must both be [batch, kv_heads, tokens, head_dim] with the same batch, "
            f"kv_heads and tokens (their head dims may differ); got {tuple(key_states.shape)} and "
            f"{tuple(value_states.shape)}"
        )
    if key_states.dtype not in SUPPORTED_DTYPES or value_states.dtype != key_states.dtype:
        raise ValueError(
            f"unsupported key/value dtype {key_states.dtype}/{value_states.dtype}; accepted: one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} for both"
        )
    if key_states.device != value_states.device:
        raise ValueError(f"key_states on {key_states.device} but value_states on {value_states.device}")
    head_dims = (key_states.shape[-1], value_states.shape[-1])
    for name, head_dim in zip(("key", "value"), head_dims):
        if head_dim < 1 or head_dim % values_per_byte:
            raise ValueError(f"unsupported {name} head_dim {head_dim}; accepted: any positive head_dim"
                             + (f" divisible by {values_per_byte}" if values_per_byte > 1 else ""))
        if key_states.is_cuda and head_dim > MAX_KERNEL_HEAD_DIM:
            raise ValueError(
                f"unsupported {name} head_dim {head_dim} on {key_states.device}; accepted on a CUDA device: 1 to "
                f"{MAX_KERNEL_HEAD_DIM} (the widest head the Triton kernels take); on the CPU any head_dim"
            )
    return head_dims
