"""Launching Triton kernels with little host time.

Eager decoding calls each kernel once per layer and step, and there the host, not the GPU, sets the
pace: Triton's ``kernel[grid](...)`` spends 30-50 µs of Python per call binding and specialising
arguments (measured on an H100/H200 host, triton 3.6), as long as the attention kernel itself takes
at small batches. `Launcher` does that work once per specialisation: the first call goes through
Triton and keeps the compiled kernel it returns; later calls with the same specialisation key hand
the arguments straight to that kernel's launcher (skipping ``compiled[grid]``'s per-call stream
lookup and launch-metadata dict too, unless a launch hook such as a profiler's is installed).

The key holds the device and everything Triton specialises a compiled kernel on: each tensor's dtype and 16-byte
alignment, each integer's divisibility by 16, equality to 1 and width (i32/i64), and the constexprs
and launch options. Under the interpreter (`TRITON_INTERPRET=1`) nothing is compiled and every call
goes through Triton.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver


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


def _idle(hook) -> bool:
    """A launch hook that does nothing: None, or (triton >= 3.5) an empty HookChain."""
    return hook is None or not getattr(hook, "calls", True)


class Launcher:
    """``Launcher(kernel)(grid, args, constexprs, **options)`` launches ``kernel[grid](*args, **constexprs, **options)``.

    ``args`` are the kernel's runtime arguments in signature order, the first a tensor on the device to launch on;
    ``constexprs`` the remaining parameters, all of them, which must come after the runtime arguments in the signature
    (as in this package's kernels).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict, **options) -> None:
        device = args[0].device
        if device.type == "cuda" and torch.cuda.device_count() > 1 and device.index != torch.cuda.current_device():
            # Triton launches on the current device (a model split over GPUs in one process, device_map).
            with torch.cuda.device(device):
                return self(grid, args, constexprs, **options)
        key = (device, _specialisation_key(args), *constexprs.values(), *options.items())
        compiled = self._compiled.get(key)
        if compiled is not None:
            grid = (*grid, 1, 1)
            if _idle(knobs.runtime.launch_enter_hook) and _idle(knobs.runtime.launch_exit_hook):
                # What compiled[grid](...) does, less its per-call lookups (no launch hooks to call here).
                compiled.run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device.index),
                             compiled.function, compiled.packed_metadata, None, None, None, *args, *constexprs.values())
            else:
                compiled[grid[:3]](*args, *constexprs.values())
            return
        names = self.kernel.arg_names[len(args):]
        if list(constexprs) != names:
            raise TypeError(f"constexprs must be {names} in this order; got {list(constexprs)}")
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if hasattr(compiled, "packed_metadata"):  # a CompiledKernel (not the interpreter's return value)
            self._compiled[key] = compiled
