"""The launcher (`hf_kvquant.ops.launch`): its specialisation key, the Triton versions its shortcut is taken on,
launches by keyword (each name reaches its parameter, on the public path and through the shortcut), and on a GPU that
the shortcut reuses a compiled kernel only where Triton would specialise the same way."""

from types import SimpleNamespace

import pytest
import torch
from conftest import HAS_CUDA, filled_buffers, requires_cuda, requires_triton

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
    assert not launch.Launcher(_FakeKernel()).fast
    monkeypatch.setattr(launch, "_triton_version", lambda: launch.FAST_LAUNCH_TRITON[0])
    assert launch.Launcher(_FakeKernel()).fast


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


# -- launches by keyword ---------------------------------------------------------------------------------------------

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _axpy_kernel(
    x_ptr,  # [n] float32
    y_ptr,  # [n] float32
    out_ptr,  # [n] float32
    n, alpha,
    BLOCK: tl.constexpr, NEGATE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    out = alpha * tl.load(x_ptr + offs, mask=valid) + tl.load(y_ptr + offs, mask=valid)
    if NEGATE:
        out = -out
    tl.store(out_ptr + offs, out, mask=valid)


def test_keywords_reach_their_parameters_in_any_order():
    """Names given in an order other than the signature's land on their parameters (x and y differ in role: alpha
    scales only x), on the public path (the interpreter here, the first launch on a GPU)."""
    from hf_kvquant.ops.launch import Launcher

    device = "cuda" if HAS_CUDA else "cpu"
    x, y = torch.arange(40.0, device=device), torch.full((40,), 100.0, device=device)
    out = torch.empty(40, device=device)
    launch = Launcher(_axpy_kernel)
    for _ in range(2):  # on a GPU with the shortcut, the second call takes it
        launch((3,), NEGATE=True, alpha=2.0, n=40, BLOCK=16, out_ptr=out, y_ptr=y, x_ptr=x, num_warps=1)
        assert torch.equal(out, -(2.0 * x + y))


def test_missing_or_unexpected_names_are_refused():
    from hf_kvquant.ops.launch import Launcher

    launch = Launcher(_axpy_kernel)
    x = torch.zeros(4)
    arguments = dict(x_ptr=x, y_ptr=x, out_ptr=x, n=4, alpha=1.0, BLOCK=16, NEGATE=False)
    with pytest.raises(TypeError, match=r"missing arguments \['alpha'\], unexpected \[\]"):
        launch((1,), **{k: v for k, v in arguments.items() if k != "alpha"})
    with pytest.raises(TypeError, match=r"missing arguments \['alpha'\], unexpected \['alfa'\]"):
        launch((1,), **{k: v for k, v in arguments.items() if k != "alpha"}, alfa=1.0)
    with pytest.raises(TypeError, match=r"unexpected \['num_ctas'\]"):
        launch((1,), **arguments, num_ctas=1)  # launch options other than num_warps and num_stages are not taken


class _FakeCompiled:
    """What the shortcut needs of a `CompiledKernel`: it records the arguments `run` receives."""

    packed_metadata = function = None

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class _FakeKernel:
    """A kernel as the launcher sees it: names, constexpr flags, and ``kernel[grid](**arguments)``."""

    arg_names = ["a_ptr", "n", "scale", "BLOCK", "FLAG"]
    params = [SimpleNamespace(name=name, is_constexpr=name.isupper()) for name in arg_names]

    def __init__(self):
        self.compiled = _FakeCompiled()
        self.public_calls = []

    def __getitem__(self, grid):
        def launch(**arguments):
            self.public_calls.append((grid, arguments))
            return self.compiled
        return launch


def test_shortcut_hands_run_the_values_in_signature_order(monkeypatch):
    from hf_kvquant.ops import launch

    monkeypatch.setattr(launch, "driver", SimpleNamespace(active=SimpleNamespace(get_current_stream=lambda i: "s")))
    kernel = _FakeKernel()
    launcher = launch.Launcher(kernel, fast=True)
    a = torch.zeros(4)
    for n in (32, 48):  # one specialisation (both multiples of 16): public, then the shortcut
        launcher((2,), FLAG=True, scale=0.5, BLOCK=64, n=n, a_ptr=a, num_warps=2)
    assert kernel.public_calls == [((2,), dict(FLAG=True, scale=0.5, BLOCK=64, n=32, a_ptr=a, num_warps=2))]
    (run,) = kernel.compiled.runs
    assert run[:4] == (2, 1, 1, "s") and run[9:] == (a, 48, 0.5, 64, True)  # grid, stream; then signature order
    launcher((2,), FLAG=True, scale=0.5, BLOCK=64, n=17, a_ptr=a, num_warps=2)  # another specialisation: public
    assert len(kernel.public_calls) == 2


def test_constexprs_must_come_after_the_runtime_arguments():
    from hf_kvquant.ops.launch import Launcher

    kernel = _FakeKernel()
    kernel.arg_names = ["a_ptr", "BLOCK", "n"]
    kernel.params = [SimpleNamespace(name=name, is_constexpr=name.isupper()) for name in kernel.arg_names]
    with pytest.raises(TypeError, match="constexpr parameters come after its runtime ones"):
        Launcher(kernel)
