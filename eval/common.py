"""What every eval/ script shares: where a result was measured (device, versions), the device's copy bandwidth to read
kernel times against, and one writer for a result's JSON and markdown.

The scripts import this module and each other by their plain names: each entry script puts its own folder first on
``sys.path`` (whether run as ``python eval/X.py`` or loaded by path, as the tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
from pathlib import Path

import torch

GIB = 1 << 30
# The published results: every script's default --out-dir.
RESULTS = Path(__file__).resolve().parent / "results"


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


def results_parser(doc: str) -> argparse.ArgumentParser:
    """A script's command line with ``--out-dir`` (default eval/results); its description is ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser


def out_dir_argument(doc: str) -> Path:
    """The command line of a benchmark whose only option is ``--out-dir``."""
    return results_parser(doc).parse_args().out_dir


def write_results(out_dir: Path, name: str, result: dict, markdown: str | None = None) -> Path:
    """``out_dir/name.json`` and, when given, ``out_dir/name.md``; returns ``out_dir/name``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if markdown is not None:
        (out_dir / f"{name}.md").write_text(markdown)
    return out_dir / name
