"""Launching Triton kernels with little host time.

Eager decoding calls each kernel once per layer and step, and there the host, not the GPU, sets the
pace: Triton's ``kernel[grid](...)`` spends 30-50 µs of Python per call binding and specialising
arguments (measured on an H100/H200 host, triton 3.6), as long as the attention kernel itself takes
at small batches. `Launcher` does that work once per specialisation: the first call goes through
Triton and keeps the compiled kernel it returns; later calls with the same specialisation key launch
that compiled kernel directly.

The key holds the device and everything Triton specialises a compiled kernel on: each tensor's dtype and 16-byte
alignment, each integer's divisibility by 16, equality to 1 and width (i32/i64), and the constexprs
and launch options. Under the interpreter (`TRITON_INTERPRET=1`) nothing is compiled and every call
goes through Triton.
"""

from __future__ import annotations

import torch

_INT32 = range(-(2**31), 2**31)


def _arg_key(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or arg is None:
        return arg
    if isinstance(arg, int):
        return arg % 16 == 0, arg == 1, arg in _INT32
    if isinstance(arg, float):
        return float
    raise TypeError(f"unsupported kernel argument type {type(arg).__name__}")


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
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            # Triton launches on the current device (a model split over GPUs in one process, device_map).
            with torch.cuda.device(device):
                return self(grid, args, constexprs, **options)
        key = (device, tuple(map(_arg_key, args)), tuple(constexprs.values()), tuple(options.items()))
        compiled = self._compiled.get(key)
        if compiled is not None:
            compiled[(*grid, 1, 1)[:3]](*args, *constexprs.values())
            return
        names = self.kernel.arg_names[len(args):]
        if list(constexprs) != names:
            raise TypeError(f"constexprs must be {names} in this order; got {list(constexprs)}")
        compiled = self.kernel[grid](*args, **constexprs, **options)
        if hasattr(compiled, "packed_metadata"):  # a CompiledKernel (not the interpreter's return value)
            self._compiled[key] = compiled
