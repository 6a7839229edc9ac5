"""Launching Triton kernels with little host time, for eager decoding.

Eager decoding calls each kernel once per layer and step, and there the host, not the GPU, sets the pace: Triton's
``kernel[grid](...)`` binds and specialises every argument in Python on every call. `Launcher` does that once per
specialisation: the first call goes through ``kernel[grid]`` and keeps the compiled kernel it returns; later calls
with the same specialisation key hand the arguments straight to that kernel's launcher. Arguments are passed by name
(as vLLM launches its Triton attention), mapped to the signature's order once per kernel.

That shortcut calls ``CompiledKernel.run``, whose argument order is Triton's own and not public API, so it is taken
only on the Triton versions it was checked on (`FAST_LAUNCH_TRITON`) and when no launch hook (a profiler's) is
installed. Elsewhere every call goes through the public ``kernel[grid](...)``: slower on the host, the same on the GPU.
A compiled decode step (CUDA graphs) replays launches without any of this.

The key holds the device and everything Triton specialises a compiled kernel on: each tensor's dtype and 16-byte
alignment, each integer's divisibility by 16, equality to 1 and width (i32/i64), and the constexprs and launch options.
"""

from __future__ import annotations

import operator

import torch
import triton
from triton.runtime import driver

# Triton versions (major, minor) whose CompiledKernel.run takes (grid x, y, z, stream, function, packed metadata,
# launch metadata, enter hook, exit hook, *args), the order `Launcher` passes.
FAST_LAUNCH_TRITON = ((3, 6),)


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def _specialisation_key(args) -> tuple:
    """What Triton specialises a compiled kernel on, for each runtime argument (one flat tuple: this runs on every
    launch, so no call per argument)."""
    key = []
    append = key.append
    for arg in args:
        kind = type(arg)
        if kind is int:
            append(arg % 16 == 0)
            append(arg == 1)
            append(-(2**31) <= arg < 2**31)
        elif kind is float:
            append(float)
        elif isinstance(arg, torch.Tensor):
            append(arg.dtype)
            append(arg.data_ptr() % 16 == 0)
        elif kind is bool or arg is None:
            append(arg)
        else:
            raise TypeError(f"unsupported kernel argument type {kind.__name__}")
    return tuple(key)


def _hooks_idle() -> bool:
    """No launch hook installed: each is None, or an empty HookChain."""
    runtime = triton.knobs.runtime
    return all(hook is None or not getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _constexpr_names(kernel) -> set[str]:
    """The kernel's ``tl.constexpr`` parameters: from Triton's own parse where it has one (`JITFunction.params`), else
    (the interpreter's function) from the annotations, which ``from __future__ import annotations`` leaves as text."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return {p.name for p in params if p.is_constexpr}
    annotations = getattr(kernel.fn, "__annotations__", {})
    return {name for name in kernel.arg_names if "constexpr" in str(annotations.get(name, ""))}


class Launcher:
    """``Launcher(kernel)(grid, num_warps=..., num_stages=..., **arguments)`` is ``kernel[grid](**arguments,
    num_warps=..., num_stages=...)``: every parameter of the kernel by name, so that a reader matches each value to
    its parameter. The names are mapped to the signature's order once, here (``operator.itemgetter``), and a launch
    through the shortcut costs two C-level lookups more than a positional one.

    The kernel's first parameter is a tensor on the device to launch on; its ``tl.constexpr`` parameters come after
    all the runtime ones (as in this package's kernels): the shortcut hands ``CompiledKernel.run`` the runtime values,
    then the constexprs, in signature order. ``num_warps``/``num_stages`` None: Triton's defaults.
    """

    def __init__(self, kernel, fast: bool | None = None):
        self.kernel = kernel
        self.fast = _triton_version() in FAST_LAUNCH_TRITON if fast is None else fast
        self._compiled = {}
        names = list(kernel.arg_names)
        constexprs = _constexpr_names(kernel)
        runtime = [name for name in names if name not in constexprs]
        if names != runtime + [name for name in names if name in constexprs]:
            raise TypeError(f"Launcher needs a kernel whose constexpr parameters come after its runtime ones; got "
                            f"{names}")
        self._names = frozenset(names)
        # itemgetter of one name returns the value itself: always a tuple here.
        self._runtime = _tuple_getter(runtime)
        self._constexprs = _tuple_getter([name for name in names if name in constexprs])

    def _check_names(self, arguments: dict) -> None:
        missing, unexpected = self._names - arguments.keys(), arguments.keys() - self._names
        if missing or unexpected:
            raise TypeError(f"{getattr(self.kernel, '__name__', 'kernel')}: missing arguments {sorted(missing)}, "
                            f"unexpected {sorted(unexpected)}")

    def __call__(self, grid: tuple[int, ...], *, num_warps: int | None = None, num_stages: int | None = None,
                 **arguments) -> None:
        if len(arguments) != len(self._names):
            self._check_names(arguments)
        try:
            args, constexprs = self._runtime(arguments), self._constexprs(arguments)
        except KeyError:
            self._check_names(arguments)
            raise
        device = args[0].device
        if device.type == "cuda" and torch.cuda.device_count() > 1 and device.index != torch.cuda.current_device():
            # Triton launches on the current device (a model split over GPUs in one process, device_map).
            with torch.cuda.device(device):
                return self(grid, num_warps=num_warps, num_stages=num_stages, **arguments)
        key = (device, _specialisation_key(args), constexprs, num_warps, num_stages) if self.fast else None
        compiled = self._compiled.get(key)
        if compiled is not None and _hooks_idle():
            grid = (*grid, 1, 1)
            stream = driver.active.get_current_stream(device.index)
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                         None, *args, *constexprs)
            return
        options = {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages))
                   if value is not None}
        compiled = self.kernel[grid](**arguments, **options)
        if self.fast and hasattr(compiled, "packed_metadata"):  # a CompiledKernel (not the interpreter's result)
            self._compiled[key] = compiled


def _tuple_getter(names: list[str]):
    if not names:
        return lambda arguments: ()
    getter = operator.itemgetter(*names)
    return getter if len(names) > 1 else lambda arguments: (getter(arguments),)
