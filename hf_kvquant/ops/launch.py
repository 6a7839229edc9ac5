"""Launching Triton kernels with little host time, for eager decoding.

Eager decoding calls each kernel once per layer and step, and there the host, not the GPU, sets the pace: Triton's
``kernel[grid](...)`` binds and specialises every argument in Python on every call. `Launcher` does that once per
specialisation: the first call goes through ``kernel[grid]`` and keeps the compiled kernel it returns; later calls
with the same specialisation key hand the arguments straight to that kernel's launcher.

That shortcut calls ``CompiledKernel.run``, whose argument order is Triton's own and not public API, so it is taken
only on the Triton versions it was checked on (`FAST_LAUNCH_TRITON`) and when no launch hook (a profiler's) is
installed. Elsewhere every call goes through the public ``kernel[grid](...)``: slower on the host, the same on the GPU.
A compiled decode step (CUDA graphs) replays launches without any of this.

The key holds the device and everything Triton specialises a compiled kernel on: each tensor's dtype and 16-byte
alignment, each integer's divisibility by 16, equality to 1 and width (i32/i64), and the constexprs and launch options.
"""

from __future__ import annotations

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


class Launcher:
    """``Launcher(kernel)(grid, args, constexprs, **options)`` is ``kernel[grid](*args, **constexprs, **options)``.

    ``args`` are the kernel's runtime arguments in signature order, the first a tensor on the device to launch on;
    ``constexprs`` the remaining parameters, all of them, which must come after the runtime arguments in the signature
    (as in this package's kernels).
    """

    def __init__(self, kernel, fast: bool | None = None):
        self.kernel = kernel
        self.fast = _triton_version() in FAST_LAUNCH_TRITON if fast is None else fast
        self._compiled = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict, **options) -> None:
        device = args[0].device
        if device.type == "cuda" and torch.cuda.device_count() > 1 and device.index != torch.cuda.current_device():
            # Triton launches on the current device (a model split over GPUs in one process, device_map).
            with torch.cuda.device(device):
                return self(grid, args, constexprs, **options)
        key = (device, _specialisation_key(args), *constexprs.values(), *options.items()) if self.fast else None
        compiled = self._compiled.get(key)
        if compiled is not None and _hooks_idle():
            grid = (*grid, 1, 1)
            stream = driver.active.get_current_stream(device.index)
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                         None, *args, *constexprs.values())
            return
        names = self.kernel.arg_names[len(args):]
        if list(constexprs) != names:
            raise TypeError(f"constexprs must be {names} in this order; got {list(constexprs)}")
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if self.fast and hasattr(compiled, "packed_metadata"):  # a CompiledKernel (not the interpreter's result)
            self._compiled[key] = compiled
