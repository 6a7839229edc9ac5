"""quanto's INT4 cache (``hf_quanto_int4`` in `lib.caches`) without a blocking JIT build.

Its cache dequantizes through ``torch.ops.quanto.unpack``, whose CUDA (and CPU) kernel is a C++/CUDA extension that
quanto JIT-compiles with ninja and nvcc on first use (with its Marlin and AWQ GEMMs: minutes), with no fallback of its
own. Here the extension is not built: its ``unpack`` is replaced by quanto's own plain-PyTorch version of the same op
(a few elementwise kernels instead of one). ``--quanto-build-timeout S`` builds it in a child process first and uses
it if that finishes within S seconds (the child's process group is killed otherwise; nothing hangs). quanto
re-quantizes its whole cache every 128 steps; the measured window is shorter, which favours it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import torch


def _quanto_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's own plain-PyTorch ``quanto::unpack`` (optimum/quanto/library/unpack.py): uint8 holding 8 // bits values
    each -> one uint8 per value, the i-th values of all items first."""
    parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)


def _build_quanto_extension(name: str, timeout_s: float) -> str | None:
    """Build quanto's extension in a child process; None when built, else why not. The child gets its own process
    group, killed as a whole on timeout (ninja and nvcc included)."""
    code = f"from optimum.quanto.library.extensions import get_extension; get_extension({name!r}).lib"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"not built: the build did not finish within {timeout_s:g} s and was stopped"
    if child.returncode != 0:
        return f"not built: {output.strip().splitlines()[-1] if output.strip() else f'exit status {child.returncode}'}"
    return None


def prepare_quanto(device: torch.device, build_timeout_s: float) -> str:
    """Make quanto's INT4 path usable without a blocking JIT build; returns how ``unpack`` runs (or raises
    ImportError when optimum-quanto is missing)."""
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    native = "quanto_cuda" if device.type == "cuda" else "quanto_cpp"
    why = "not built (--quanto-build-timeout 0)"
    if build_timeout_s > 0 and is_extension_available(native):
        start = time.perf_counter()
        why = _build_quanto_extension(native, build_timeout_s)
        if why is None:
            get_extension(native).lib  # noqa: B018 -- loads the finished build
            return f"quanto's {native} extension (built in {time.perf_counter() - start:.0f} s)"
    for name in ("quanto_cpp", "quanto_cuda", "quanto_hip", "quanto_mps"):
        if is_extension_available(name):
            # The `lib` property returns `_lib` once set: quanto then never starts a build.
            get_extension(name)._lib = SimpleNamespace(unpack=_quanto_unpack)
    return f"quanto's plain-PyTorch unpack; its {native} extension was {why}"
