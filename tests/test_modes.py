"""KVQuantMode: parsing and per-mode constants."""

import pytest
import torch

from hf_kvquant import KVQuantMode
from hf_kvquant.modes import FP8_E4M3_QMAX, INT8_QMAX, SCALE_FLOOR

ACCEPTED_NAMES = ("int8_per_token_head", "fp8_per_token_head")


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_parse_accepts_member(mode):
    assert KVQuantMode.parse(mode) is mode


@pytest.mark.parametrize(
    "name, expected",
    [
        ("int8_per_token_head", KVQuantMode.INT8_PER_TOKEN_HEAD),
        ("fp8_per_token_head", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ],
)
def test_parse_accepts_string_names(name, expected):
    parsed = KVQuantMode.parse(name)
    assert parsed is expected
    assert isinstance(parsed, KVQuantMode)
    assert parsed.value == name


def test_exactly_two_modes():
    assert {m.value for m in KVQuantMode} == set(ACCEPTED_NAMES)


@pytest.mark.parametrize(
    "bad",
    ["int4", "", None, 8, "INT8_PER_TOKEN_HEAD", "int8", "fp8", " int8_per_token_head", 1.5, torch.int8,
     torch.float8_e4m3fn, b"int8_per_token_head"],
)
def test_parse_rejects_everything_else(bad):
    with pytest.raises(ValueError) as excinfo:
        KVQuantMode.parse(bad)
    message = str(excinfo.value)
    for name in ACCEPTED_NAMES:
        assert name in message, f"{name!r} missing from error message {message!r}"


@pytest.mark.parametrize(
    "mode, qmax, storage_dtype",
    [
        (KVQuantMode.INT8_PER_TOKEN_HEAD, 127.0, torch.int8),
        (KVQuantMode.FP8_PER_TOKEN_HEAD, 448.0, torch.float8_e4m3fn),
    ],
)
def test_qmax_and_storage_dtype(mode, qmax, storage_dtype):
    assert mode.qmax == qmax
    assert mode.storage_dtype == storage_dtype
    # qmax is exactly the largest finite value of the storage dtype
    if storage_dtype.is_floating_point:
        assert torch.finfo(storage_dtype).max == qmax
    else:
        assert torch.iinfo(storage_dtype).max == qmax
        # symmetric: -qmax is representable too, the asymmetric -128 is never used
        assert torch.iinfo(storage_dtype).min <= -qmax
    assert torch.tensor(qmax).to(storage_dtype).float().item() == qmax
    assert torch.tensor(-qmax).to(storage_dtype).float().item() == -qmax


def test_constants():
    assert INT8_QMAX == 127.0
    assert FP8_E4M3_QMAX == 448.0
    assert SCALE_FLOOR == 1e-6 and SCALE_FLOOR > 0
