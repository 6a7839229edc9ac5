"""The hand-over contract between the quantized cache and attention.

`QuantizedPerTokenHeadCache.update` returns, for keys and for values, either

* plain tensors ``[batch, kv_heads, kv_len, head_dim]`` in the model's dtype, dequantized from the
  cache, when the model runs any attention implementation other than hf_kvquant's (``sdpa``,
  ``eager``, ...): every implementation keeps working, at the cost of materialising the copy; or
* a `QuantizedKV` when the model's ``config._attn_implementation`` is `ATTENTION_NAME` (the cache
  reads it from the config it was built with): the cache's own buffers, never copied, which
  hf_kvquant's attention reads and dequantizes inside its kernels.

A cache built with ``hadamard=True`` stores ``quantize(k @ R)`` and ``quantize(v @ R)`` with the orthogonal
Hadamard matrix ``R`` of `hf_kvquant.rotation`; its `QuantizedKV` carry ``R`` as ``rotation``. The plain tensors of
the first case, and `QuantizedKV.dequantize`, are un-rotated (``... @ R.T``): only a consumer of the raw
``data``/``scale`` buffers sees rotated values, and must rotate its queries and un-rotate its output (as
hf_kvquant's attention does).

In both cases the ``kv_len`` tokens handed over are exactly those that transformers' mask for the
layer describes (``Cache.get_mask_sizes``), in position order, and they include the tokens written
by this very forward pass *as quantized values*: prefill, decode and teacher-forced perplexity all
attend to the same numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .modes import KVQuantMode
from .ops.reference import dequantize, dequantize_ring
from .rotation import KeyValueRotation, unrotate

# The name under which hf_kvquant's attention is registered with transformers' AttentionInterface.
ATTENTION_NAME = "hf_kvquant"

_warned_dequantized = False


def _warn_dequantized(what) -> None:
    global _warned_dequantized
    if not _warned_dequantized:
        _warned_dequantized = True
        name = getattr(what, "__name__", what)
        warnings.warn(f"hf_kvquant: the model transforms the cached keys or values ({name}) before attention; it gets "
                      "dequantized tensors there, and attention runs in plain PyTorch (correct, slower)", stacklevel=3)


@dataclass(frozen=True)
class QuantizedKV:
    """Keys or values of one layer as stored: slots ``[start, end)`` of the cache buffers are handed over.

    ``data``  ``[batch, kv_heads, capacity, head_dim]``, int8 or float8_e4m3fn (the whole buffer, not a copy);
    ``scale`` ``[batch, kv_heads, capacity]`` float32, one per token-head: ``value = data * scale``.
    ``dtype`` is the dtype of the tensors the model wrote, which a dequantized copy takes.
    ``rotation`` ``[head_dim, head_dim]`` float32: the orthogonal matrix ``R`` applied before quantizing
    (``data * scale = x @ R``), or None (``data * scale = x``). A layer whose keys and values differ in head_dim (MLA)
    hands both the same `KeyValueRotation`; each keeps the matrix of its own head_dim.
    ``length`` (preallocated caches, whose shapes must not change from step to step): a 0-d int64 tensor on the device,
    the number of live slots from ``start``; ``[start, end)`` is then the whole capacity, and slots past ``length``
    hold nothing a query may see (transformers' mask for such a layer hides them, and so does hf_kvquant's kernel).
    ``ring`` (with ``length``, then the tokens ever written): ``[start, end)`` is a ring buffer holding the last
    ``end - start`` tokens, token ``p`` in slot ``start + p % (end - start)``; it stands for its tokens in position
    order, the live ones first (`hf_kvquant.ops.ring_slots`).
    ``mask_offset``: the padding mask handed to attention with these has token ``i``'s column at ``mask_offset + i``
    (in a ring, token ``i`` is position ``length - n + i`` of the ``n`` held).
    ``columns``: the width of the mask transformers builds for the layer (``get_mask_sizes``), where it is not the
    tokens handed over (a ring holding one window of a ``max_cache_len`` preallocated cache): `dequantize` places each
    token in its column (its position), zeros elsewhere, so any attention implementation reads them under that mask.
    """

    data: torch.Tensor
    scale: torch.Tensor
    start: int
    end: int
    mode: KVQuantMode
    dtype: torch.dtype
    rotation: torch.Tensor | None = None
    length: torch.Tensor | None = None
    ring: bool = False
    mask_offset: int = 0
    columns: int | None = None

    def __post_init__(self):
        if isinstance(self.rotation, KeyValueRotation):
            object.__setattr__(self, "rotation", self.rotation.for_head_dim(self.shape[-1]))

    @property
    def shape(self) -> torch.Size:
        """The shape of the tensor this stands for: ``[batch, kv_heads, end - start, head_dim]``."""
        batch, heads, _, codes = self.data.shape
        return torch.Size((batch, heads, self.end - self.start, codes * self.mode.spec.values_per_byte))

    @property
    def device(self) -> torch.device:
        return self.data.device

    # -- any other consumer gets the tensor this stands for ------------------------------------------------------
    # Some models transform the keys or values that `update` returns before attention sees them (splitting heads,
    # transposing, repeating). Such code gets the dequantized tensor, as it would from any other attention: a torch
    # function or tensor method called on a QuantizedKV runs on `dequantize()` (once warned), and hf_kvquant's
    # attention, handed plain tensors, takes its plain-PyTorch path. Only a model whose attention reads the buffers as
    # returned gets the kernel.

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _warn_dequantized(func)
        args, kwargs = torch.utils._pytree.tree_map(
            lambda x: x.dequantize() if isinstance(x, QuantizedKV) else x, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends look for these: not a tensor's business
            raise AttributeError(name)
        _warn_dequantized(name)
        return getattr(self.dequantize(), name)

    def __getitem__(self, index):
        _warn_dequantized("indexing")
        return self.dequantize()[index]

    def dequantize(self) -> torch.Tensor:
        """A dequantized, un-rotated copy ``[batch, kv_heads, end - start, head_dim]`` in ``dtype`` (a ring's tokens
        in position order), or ``[batch, kv_heads, columns, head_dim]`` with each token in its column."""
        dtype = self.dtype if self.rotation is None else torch.float32
        if self.ring:
            out = dequantize_ring(self.data, self.scale, self.length, dtype, self.start, self.end)
        else:
            window = slice(self.start, self.end)
            out = dequantize(self.data[:, :, window], self.scale[:, :, window], dtype)
        out = out if self.rotation is None else unrotate(out, self.rotation).to(self.dtype)
        return out if self.columns is None else self._in_columns(out)

    def _in_columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (in position order) at their columns of a ``columns`` wide tensor, zeros elsewhere. A ring's
        first column is ``length - min(length, capacity)``, on the device (no host read: compileable)."""
        out = tokens.new_zeros(*tokens.shape[:2], self.columns, tokens.shape[-1])
        count = tokens.shape[2]
        if self.ring:
            first = self.length - torch.clamp(self.length, max=count)
            return out.index_copy_(2, first + torch.arange(count, device=out.device), tokens)
        out[:, :, self.mask_offset : self.mask_offset + count] = tokens
        return out
