"""A layer's state as `QuantizedPerTokenHeadLayer.export_state` gives it and `restore_state` takes it back: the names
of its tensors and the checks of what is read back (from a file, by `hf_kvquant.persistence`)."""

from __future__ import annotations

import torch

from ..modes import ModeSpec

# The four buffers of a layer, in the order of `QuantizedPerTokenHeadLayer.buffers`, as its state names them.
BUFFER_NAMES = ("key_data", "key_scale", "value_data", "value_scale")


def state_counter(metadata: dict, key: str, name: str) -> int:
    """A counter of a layer's state, checked: a non-negative int."""
    value = metadata.get(key)
    if type(value) is not int or value < 0:
        raise ValueError(f"malformed cache metadata: {name} {key} is {value!r}")
    return value


def check_state_tensors(tensors: dict[str, torch.Tensor], tokens: int, spec: ModeSpec, name: str):
    """Check the four tensors of a layer's state (`BUFFER_NAMES`) holding ``tokens`` tokens in the storage of
    ``spec``, the layer called ``name``; return (batch, kv_heads, (key head_dim, value head_dim))."""
    missing = [buffer for buffer in BUFFER_NAMES if buffer not in tensors]
    if missing:
        raise ValueError(f"{name} holds {tokens} tokens, but its tensors {missing} are missing")
    for buffer in BUFFER_NAMES:
        dtype = spec.storage_dtype if buffer.endswith("data") else torch.float32
        if tensors[buffer].dtype != dtype:
            raise ValueError(f"{name} tensor {buffer} dtype mismatch: expected {dtype}, found "
                             f"{tensors[buffer].dtype}")
    for buffer in ("key_data", "value_data"):
        if tensors[buffer].dim() != 4 or tensors[buffer].shape[-1] == 0:
            raise ValueError(f"{name} tensor {buffer} shape mismatch: expected [batch, kv_heads, tokens, "
                             f"head_dim], found {tuple(tensors[buffer].shape)}")
    batch, heads, _, key_codes = tensors["key_data"].shape
    value_codes = tensors["value_data"].shape[-1]
    for buffer in BUFFER_NAMES:
        codes = key_codes if buffer.startswith("key") else value_codes
        expected = (batch, heads, tokens, codes) if buffer.endswith("data") else (batch, heads, tokens)
        if tuple(tensors[buffer].shape) != expected:
            raise ValueError(f"{name} tensor {buffer} shape mismatch: expected {expected}, found "
                             f"{tuple(tensors[buffer].shape)}")
    return batch, heads, (key_codes * spec.values_per_byte, value_codes * spec.values_per_byte)
