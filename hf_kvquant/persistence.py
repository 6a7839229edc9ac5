"""Saving a `QuantizedPerTokenHeadCache` to a file and loading it back (`QuantizedPerTokenHeadCache.save` / `.load`).

The file is a safetensors file (no pickle: loading runs no code from the file). It holds the quantized codes and the
scales of the live tokens of each layer, never the spare capacity, so it is at most the bytes the cache holds plus a
header of about 0.7 KB per layer (2 % of a layer holding 35 KB, e.g. 17 tokens of 8 kv heads of 128):

* tensors ``layers.{i}.key_data``, ``layers.{i}.value_data`` ``[batch, kv_heads, tokens, head_dim]`` (int8 or
  float8_e4m3fn; the keys' and the values' head dims may differ, as in MLA models) and ``layers.{i}.key_scale``,
  ``layers.{i}.value_scale`` ``[batch, kv_heads, tokens]`` (float32) for every initialized layer: slots
  ``[0, stored)`` of a growable layer, ``[0, length)`` of a preallocated one, the last ``min(length, window)`` tokens in
  position order of a preallocated sliding-window layer (a ring of one window; version 1 kept all ``length``, and such
  files still load: the window's tokens are taken from them);
* the header's ``metadata`` (string to string, structured values JSON-encoded): ``format``
  (``"hf_kvquant.QuantizedPerTokenHeadCache"``), ``format_version`` (``"2"``; ``"1"`` before preallocated sliding
  layers held one window), ``mode``, ``hadamard``,
  ``max_cache_len``, ``layers`` (one object per layer: ``type`` ``full_attention`` / ``sliding_attention`` /
  ``dummy``, ``sliding_window``, ``initialized``; for a growable sliding layer ``record_past`` and ``rollback_base``
  (assisted decoding's state, kept even before the first token); for an initialized layer ``dtype`` (of the keys it
  was filled with), its counters (``stored`` and ``cumulative_length``, or ``length`` for a preallocated layer) and
  ``crc32``, the CRC-32 of each of its four tensors), ``writer`` (the package version)
  and ``checksum`` (the CRC-32 of all the other metadata).

`load_cache` checks everything before it returns: the format and its version, the checksums (a flipped byte anywhere
in the file is caught), the model's config (layer count and types, sliding windows, kv heads and the key and value
head dims of every layer), the shapes and dtypes of the tensors, the counters. Any mismatch raises a `ValueError` that
names what was expected and what was found; the cache is built whole and returned only once everything has passed.
The layers are placed on the CPU unless a device is given (the file does not record where the cache lived: that device
may not exist where it is loaded). A loaded growable layer holds the capacity its growth policy gives its tokens, not
necessarily the spare capacity the saved one had; a preallocated layer holds ``max_cache_len`` slots (one window for a
sliding one), the slots past its length zeroed.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from importlib import metadata as _package_metadata

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .modes import KVQuantMode

FORMAT_NAME = "hf_kvquant.QuantizedPerTokenHeadCache"
FORMAT_VERSION = 2  # 2: a preallocated sliding-window layer saves its window (a ring); 1 saved every token
BUFFER_NAMES = ("key_data", "key_scale", "value_data", "value_scale")  # a layer's tensors, as its state names them


def _tensor_name(index: int, buffer: str) -> str:
    return f"layers.{index}.{buffer}"


def _crc32(t: torch.Tensor) -> str:
    raw = t.view(torch.uint8) if t.element_size() == 1 else t  # float8 has no CPU copy: its bytes are what counts
    return f"{zlib.crc32(raw.contiguous().view(torch.uint8).numpy()):08x}"


def _metadata_checksum(metadata: dict[str, str]) -> str:
    fields = sorted((k, v) for k, v in metadata.items() if k != "checksum")
    return f"{zlib.crc32(json.dumps(fields).encode('utf-8')):08x}"


def _writer() -> str:
    try:
        return f"hf_kvquant {_package_metadata.version('hf_kvquant')}"
    except _package_metadata.PackageNotFoundError:
        return "hf_kvquant"


def _write_file(path, tensors: dict[str, torch.Tensor], fields: dict) -> None:
    """Write ``tensors`` and the metadata ``fields`` (``mode``, ``hadamard``, ``max_cache_len``, ``layers``, and
    optionally ``format_version``), adding each tensor's CRC-32 to its layer and the metadata checksum. The file is
    written beside ``path`` and renamed over it: a failed save never leaves a partial file at ``path``."""
    layers = [dict(entry) for entry in fields["layers"]]
    for index, entry in enumerate(layers):
        if entry.get("initialized"):
            names = [_tensor_name(index, name) for name in BUFFER_NAMES]
            entry["crc32"] = {name: _crc32(tensors[n]) for name, n in zip(BUFFER_NAMES, names) if n in tensors}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(fields.get("format_version", FORMAT_VERSION)),
        "mode": fields["mode"],
        "hadamard": json.dumps(fields["hadamard"]),
        "max_cache_len": json.dumps(fields["max_cache_len"]),
        "layers": json.dumps(layers, separators=(",", ":")),
        "writer": _writer(),
    }
    metadata["checksum"] = _metadata_checksum(metadata)
    path = os.fspath(path)
    partial = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        save_file(tensors, partial, metadata=metadata)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def save_cache(state: tuple[dict, list[dict[str, torch.Tensor]]], path) -> None:
    """Write a cache's ``state`` (`QuantizedPerTokenHeadCache.export_state`: its fields and each layer's tensors) to
    ``path`` (safetensors; see the module docstring for the layout)."""
    fields, layer_tensors = state
    tensors = {_tensor_name(index, name): t for index, named in enumerate(layer_tensors) for name, t in named.items()}
    _write_file(path, tensors, fields)


# -- loading ---------------------------------------------------------------------------------------------------------


def _mismatch(path, what: str, expected, found) -> ValueError:
    return ValueError(f"{path}: {what} mismatch: expected {expected}, found {found}")


@contextlib.contextmanager
def _reading(path):
    """Turn the errors of the safetensors reader into a `ValueError` that says the file is not a readable one."""
    try:
        yield
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated, corrupted, or another format such as "
                         f"a pickle): {e}") from e


def _parse_header(path, metadata: dict[str, str]) -> dict:
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is a safetensors file but not a saved QuantizedPerTokenHeadCache "
                         f"(its metadata 'format' is {metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise ValueError(f"{path}: format_version {version!r} is not a version number (corrupted header)")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{path} was written in cache format version {int(version)} by a newer hf_kvquant "
                         f"({metadata.get('writer', 'unknown writer')}); this one reads versions up to "
                         f"{FORMAT_VERSION}: upgrade hf_kvquant to load it")
    if metadata.get("checksum") != _metadata_checksum(metadata):
        raise ValueError(f"{path}: the header's checksum does not match its metadata (corrupted header): expected "
                         f"{_metadata_checksum(metadata)}, found {metadata.get('checksum')!r}")
    try:
        header = {key: json.loads(metadata[key]) for key in ("hadamard", "max_cache_len", "layers")}
        header["mode"] = KVQuantMode.parse(metadata["mode"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: malformed cache metadata: {e}") from e
    if not isinstance(header["hadamard"], bool):
        raise ValueError(f"{path}: malformed cache metadata: hadamard is {header['hadamard']!r}")
    max_len = header["max_cache_len"]
    if max_len is not None and (type(max_len) is not int or max_len <= 0):
        raise ValueError(f"{path}: malformed cache metadata: max_cache_len is {max_len!r}")
    if not isinstance(header["layers"], list) or not all(isinstance(e, dict) for e in header["layers"]):
        raise ValueError(f"{path}: malformed cache metadata: layers is not a list of objects")
    return header


def _expected_shapes(config, count: int) -> list[tuple[int, int, int] | None]:
    """(kv_heads, key head_dim, value head_dim) of each layer according to ``config``, or None per layer without a
    config.

    MLA models (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite, ...: a config with ``kv_lora_rank``) cache their compressed
    latents, not per-head keys and values: transformers' attention hands `update` one head of the normalised latent
    (``kv_lora_rank`` channels) as keys and one of the rotary key part (``qk_rope_head_dim``) as values, and expands
    them to per-head keys (``qk_nope_head_dim + qk_rope_head_dim``) and values (``v_head_dim``) only after the cache.
    """
    if config is None:
        return [None] * count
    text = config.get_text_config(decoder=True)
    per_layer = getattr(text, "per_layer_config", None)
    shapes = []
    for index in range(count):
        c = per_layer[index] if per_layer is not None else text
        if getattr(c, "kv_lora_rank", None) and getattr(c, "qk_rope_head_dim", None):
            shapes.append((1, c.kv_lora_rank, c.qk_rope_head_dim))
            continue
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shapes.append((heads, head_dim, head_dim))
    return shapes


def _layer_devices(device, count: int) -> list[torch.device]:
    if device is None:
        return [torch.device("cpu")] * count
    if isinstance(device, (str, int, torch.device)):
        return [torch.device(device)] * count
    devices = [torch.device(d) for d in device]
    if len(devices) != count:
        raise ValueError(f"device: {len(devices)} devices given for a cache of {count} layers")
    return devices


@contextlib.contextmanager
def _in_file(path):
    """Name the file in what the cache and its layers say is wrong with their saved state."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _read_layer(f, path, index: int, entry: dict) -> dict[str, torch.Tensor]:
    """Layer ``index``'s tensors, by buffer name, each checked against its CRC-32 in the layer's entry."""
    crcs = entry.get("crc32") if isinstance(entry.get("crc32"), dict) else {}
    tensors = {}
    for name in BUFFER_NAMES:
        full_name = _tensor_name(index, name)
        tensors[name] = f.get_tensor(full_name)
        found = _crc32(tensors[name])
        if found != crcs.get(name):
            raise ValueError(f"{path}: tensor {full_name} does not match its checksum (corrupted data): expected "
                             f"{crcs.get(name)!r}, found {found!r}")
    return tensors


def _check_against_config(path, index: int, layer, shape) -> None:
    """The kv heads and head dims of a filled layer against the (kv_heads, key head_dim, value head_dim) of the
    config (`_expected_shapes`)."""
    heads, head_dims = layer.key_data.shape[1], layer.head_dims
    expected_heads, *expected_head_dims = shape
    if heads != expected_heads:
        raise _mismatch(path, f"layer {index} kv heads (num_key_value_heads)", expected_heads, heads)
    if head_dims[0] != expected_head_dims[0]:
        what = "head_dim" if expected_head_dims[0] == expected_head_dims[1] else "key head_dim (kv_lora_rank)"
        raise _mismatch(path, f"layer {index} {what}", expected_head_dims[0], head_dims[0])
    if head_dims[1] != expected_head_dims[1]:
        what = "value head_dim" + ("" if expected_head_dims[0] == expected_head_dims[1] else " (qk_rope_head_dim)")
        raise _mismatch(path, f"layer {index} {what}", expected_head_dims[1], head_dims[1])


def load_cache(path, cls, config=None, device=None, mode=None):
    """A cache of class ``cls`` (`QuantizedPerTokenHeadCache`) read from ``path`` (written by `save_cache`), checked
    against the model's ``config``.

    Args:
        config: the model's config (what the cache was built with). The cache's layers are built from it, and the
            file must agree: layer count and types, sliding windows, kv heads and the key and value head dims of every
            layer. ``None`` for a cache built without a config (full-attention layers only); then only the file's own
            consistency is checked.
        device: where the layers go: None (the CPU), a device, or one device per layer (a model split by
            ``device_map``). The file does not record the device the cache was saved from.
        mode: if given, the file's mode must be this one.
    Raises:
        ValueError: the file is not a safetensors file, is truncated or corrupted, is not a saved cache, was written
            by a newer format version, or disagrees with ``config``/``mode``; the message names the mismatch.

    The header is checked first, then the cache built from it checks every layer's description
    (`QuantizedPerTokenHeadCache.check_state`); each layer's tensors are then read, checked against their checksums
    and restored into the new cache one layer at a time (host memory for one layer), each checked against the config.
    The cache is returned only when every layer has passed.
    """
    with _reading(path), safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        header = _parse_header(path, f.metadata() or {})
        if mode is not None and KVQuantMode.parse(mode) is not header["mode"]:
            raise _mismatch(path, "mode", KVQuantMode.parse(mode).value, header["mode"].value)
        cache = cls(config=config, mode=header["mode"], max_cache_len=header["max_cache_len"],
                    hadamard=header["hadamard"])
        entries = header["layers"]
        with _in_file(path):
            cache.check_state(entries)
        names = set(f.keys())
        expected = {_tensor_name(i, n) for i, e in enumerate(entries) if e["initialized"] for n in BUFFER_NAMES}
        if names != expected:
            raise ValueError(f"{path}: the tensors do not match the layers described: missing "
                             f"{sorted(expected - names)}, unexpected {sorted(names - expected)}")
        shapes = _expected_shapes(config, len(entries))
        devices = _layer_devices(device, len(entries))
        for index, entry in enumerate(entries):
            tensors = _read_layer(f, path, index, entry) if entry["initialized"] else {}
            with _in_file(path):
                cache.restore_layer_state(index, entry, tensors, devices[index])
            if entry["initialized"] and shapes[index] is not None:
                _check_against_config(path, index, cache.layers[index], shapes[index])
    return cache
