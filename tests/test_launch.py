"""The launcher (`hf_kvquant.ops.launch`): its specialisation key, the Triton versions its shortcut is taken on, and on
a GPU that the shortcut reuses a compiled kernel only where Triton would specialise the same way."""

import pytest
import torch
from conftest import filled_buffers, requires_cuda, requires_triton

from hf_kvquant import KVQuantMode
from hf_kvquant.ops.reference import quantize_into_reference

pytestmark = requires_triton


def test_specialisation_key_tells_what_triton_specialises_on():
    from hf_kvquant.ops.launch import _specialisation_key

    t = torch.zeros(8)
    assert _specialisation_key((32,)) != _specialisation_key((17,))  # divisible by 16 or not
    assert _specialisation_key((1,)) != _specialisation_key((3,))  # equal to 1
    assert _specialisation_key((2**31,)) != _specialisation_key((2**31 - 16,))  # i64 or i32
    assert _specialisation_key((t,)) != _specialisation_key((t[1:],))  # 16-byte aligned or not
    assert _specialisation_key((t,)) != _specialisation_key((t.half(),))  # dtype
    assert _specialisation_key((32, t, 1.5, True)) == _specialisation_key((48, t.clone(), 2.5, True))
    with pytest.raises(TypeError, match="unsupported kernel argument type str"):
        _specialisation_key(("x",))


def test_shortcut_only_on_the_triton_versions_it_was_checked_on(monkeypatch):
    from hf_kvquant.ops import launch

    monkeypatch.setattr(launch, "_triton_version", lambda: (9, 9))
    assert not launch.Launcher(lambda: None).fast
    monkeypatch.setattr(launch, "_triton_version", lambda: launch.FAST_LAUNCH_TRITON[0])
    assert launch.Launcher(lambda: None).fast


@requires_cuda
@pytest.mark.parametrize("fast", [True, False], ids=["shortcut", "public"])
def test_launcher_recompiles_for_every_specialisation(fast, monkeypatch):
    """Each launch path against the reference, over arguments that Triton specialises differently: an unaligned
    (offset) view, a length that is or is not a multiple of 16, and 1."""
    from hf_kvquant.ops import quantize_kernel
    from hf_kvquant.ops.launch import Launcher

    launcher = Launcher(quantize_kernel._quantize_kv_kernel, fast=fast)
    monkeypatch.setattr(quantize_kernel, "_launch_quantize", launcher)
    mode, heads, head_dim = KVQuantMode.INT8_PER_TOKEN_HEAD, 2, 64
    flat = torch.randn(2 * heads * 40 * head_dim + 3)
    for tokens, offset in [(32, 0), (32, 0), (17, 0), (1, 0), (32, 3), (17, 1), (32, 0)]:
        key = flat[offset : offset + 2 * heads * tokens * head_dim].view(2, heads, tokens, head_dim)
        value = key.flip(-1)
        slots = torch.arange(tokens)
        expected = filled_buffers(2, heads, tokens, head_dim, mode, "cpu")
        quantize_into_reference(key, value, slots, expected, mode)
        got = filled_buffers(2, heads, tokens, head_dim, mode, "cuda")
        key_cuda = flat.cuda()[offset : offset + key.numel()].view(key.shape)  # keeps the offset, unlike key.cuda()
        quantize_kernel.quantize_into_triton(key_cuda, key_cuda.flip(-1), slots.cuda(), got, mode)
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e.view(torch.uint8) if e.dtype != torch.float32 else e,
                               g.cpu().view(torch.uint8) if g.dtype != torch.float32 else g.cpu()), (tokens, offset)
    # With the shortcut, distinct specialisations were compiled separately (aligned/unaligned, multiple of 16, 1).
    assert len(launcher._compiled) >= 4 if fast else not launcher._compiled
