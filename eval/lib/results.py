"""Where eval/ scripts write their results, one policy for all of them, and the writer of a result's JSON and markdown.

A script writes into ``--out-dir DIR`` when given; without it, into a new folder under the system's temporary directory
(``hf_kvquant_results/NAME-<date>-<time>``), created by the first result written, so a run that stops on a bad argument
leaves nothing behind. The published results in eval/results/ (indexed in eval/results/README.md) are rewritten only
when named: ``--out-dir eval/results``. A trial or smoke run cannot overwrite them by accident.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime
from pathlib import Path

# The published results: written only when a run names them with --out-dir.
RESULTS = Path(__file__).resolve().parents[1] / "results"
OUT_DIR_HELP = ("where the result files go; eval/results holds the published ones (default: a new folder under "
                "the temporary directory, hf_kvquant_results/NAME-<date>-<time>)")


def default_out_dir(name: str) -> Path:
    """A folder no earlier run wrote, outside the repository: ``<temp>/hf_kvquant_results/NAME-<date>-<time>`` (a
    suffix where that exists). Not created here: the first result written creates it."""
    root = Path(tempfile.gettempdir()) / "hf_kvquant_results"
    stem = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = root / stem, 1
    while path.exists():
        n += 1
        path = root / f"{stem}-{n}"
    return path


def resolve_out_dir(given: Path | None, name: str) -> Path:
    """Where a run named ``name`` writes: ``given`` (its ``--out-dir``), else `default_out_dir`."""
    return Path(given) if given is not None else default_out_dir(name)


def add_out_dir(parser: argparse.ArgumentParser) -> None:
    """``--out-dir DIR`` (default None: `resolve_out_dir` picks a new folder)."""
    parser.add_argument("--out-dir", type=Path, default=None, metavar="DIR", help=OUT_DIR_HELP)


def results_parser(doc: str) -> argparse.ArgumentParser:
    """A script's command line with ``--out-dir``; its description is ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_out_dir(parser)
    return parser


def out_dir_argument(doc: str, name: str) -> Path:
    """The output folder of a benchmark whose only option is ``--out-dir``, writing results named ``name``."""
    return resolve_out_dir(results_parser(doc).parse_args().out_dir, name)


def write_results(out_dir: Path, name: str, result: dict, markdown: str | None = None) -> Path:
    """``out_dir/name.json`` and, when given, ``out_dir/name.md`` (``out_dir`` created if need be); returns
    ``out_dir/name``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if markdown is not None:
        (out_dir / f"{name}.md").write_text(markdown)
    return out_dir / name
