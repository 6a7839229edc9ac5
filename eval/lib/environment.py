"""Where a result was measured, the head of every eval/ result: the device, the versions, and the device's copy
bandwidth to read kernel times against."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform

import torch

GIB = 1 << 30


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or ``"cpu"``."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions(*extra: str) -> dict[str, str]:
    """Python's version and those of torch, triton, transformers and the ``extra`` distributions, where installed
    (read from their metadata: nothing is imported); CUDA's and NCCL's where CUDA is available."""
    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", *extra):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
        found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return found


def environment(device: torch.device | str, *extra: str) -> dict:
    """``{"device": ..., "versions": ...}``, the head of every result: `device_name` and `versions`."""
    return {"device": device_name(device), "versions": versions(*extra)}


def versions_line(found: dict[str, str]) -> str:
    """``"python 3.11.7, torch 2.11.0, ..."``, for a table's header or a log line."""
    return ", ".join(f"{name} {version}" for name, version in found.items())


def copy_bandwidth() -> dict[str, float]:
    """A 1 GiB device-to-device copy (well past L2), median of `triton.testing.do_bench`: its ms and TB/s counting
    the bytes read and the bytes written."""
    import triton.testing  # the GPU benchmarks only: the CPU-capable scripts do not need Triton

    src = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return {"ms": ms, "tb_per_s": 2 * src.nbytes / ms / 1e9}
