"""KVQuantMode: parsing (names and short names), each mode's spec, and dispatch that cannot fall into another mode."""

import pytest
import torch

from hf_kvquant import KVQuantMode
from hf_kvquant.modes import FP8_E4M3_QMAX, INT8_QMAX, KERNEL_FP8_E4M3, KERNEL_INT8, SCALE_FLOOR, mode_names

ACCEPTED_NAMES = ("int8_per_token_head", "fp8_per_token_head", "int8", "fp8")


@pytest.mark.parametrize("mode", list(KVQuantMode))
def test_parse_accepts_member(mode):
    assert KVQuantMode.parse(mode) is mode


@pytest.mark.parametrize(
    "name, expected",
    [
        ("int8_per_token_head", KVQuantMode.INT8_PER_TOKEN_HEAD),
        ("fp8_per_token_head", KVQuantMode.FP8_PER_TOKEN_HEAD),
        ("int8", KVQuantMode.INT8_PER_TOKEN_HEAD),
        ("fp8", KVQuantMode.FP8_PER_TOKEN_HEAD),
    ],
)
def test_parse_accepts_names_and_short_names(name, expected):
    parsed = KVQuantMode.parse(name)
    assert parsed is expected
    assert isinstance(parsed, KVQuantMode)
    assert name in (parsed.value, parsed.short_name)


def test_exactly_two_modes():
    assert mode_names() == ACCEPTED_NAMES


@pytest.mark.parametrize(
    "bad",
    ["int4", "", None, 8, "INT8_PER_TOKEN_HEAD", "INT8", "int8+hadamard", " int8_per_token_head", 1.5, torch.int8,
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


@pytest.mark.parametrize(
    "mode, kernel_format",
    [(KVQuantMode.INT8_PER_TOKEN_HEAD, KERNEL_INT8), (KVQuantMode.FP8_PER_TOKEN_HEAD, KERNEL_FP8_E4M3)]
)
def test_every_mode_carries_its_spec(mode, kernel_format):
    spec = mode.spec
    assert (spec.qmax, spec.storage_dtype, spec.short_name) == (mode.qmax, mode.storage_dtype, mode.short_name)
    assert spec.values_per_byte == 1  # one code per byte; a packed mode (INT4) would say 2
    assert spec.kernel_format == kernel_format
    assert len({m.spec.kernel_format for m in KVQuantMode}) == len(KVQuantMode)


def test_a_mode_without_spec_or_handling_raises_instead_of_borrowing_another_modes_math(monkeypatch):
    """A new member with no `ModeSpec` raises on `spec`; the reference quantizer's dispatch is exhaustive: a mode it
    does not know (simulated by a spec-bearing stand-in) raises rather than falling into INT8's or FP8's rounding."""
    from hf_kvquant import modes
    from hf_kvquant.ops.reference import quantize_reference

    monkeypatch.delitem(modes._SPECS, KVQuantMode.FP8_PER_TOKEN_HEAD)
    with pytest.raises(NotImplementedError, match="fp8_per_token_head.*no ModeSpec"):
        KVQuantMode.FP8_PER_TOKEN_HEAD.spec

    class Int4Like:  # what a new member looks like to the dispatch: a spec, and not INT8 or FP8
        spec = modes.ModeSpec(torch.int8, 7.0, 2, 2, "int4")

    with pytest.raises(NotImplementedError, match="no rounding rule"):
        quantize_reference(torch.ones(2, 64), Int4Like())
