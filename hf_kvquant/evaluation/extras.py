"""Optional dependencies, by the extra of `pyproject.toml` that installs them: a command whose extra is missing stops
with one line that names it, rather than a traceback from deep inside an import."""

from __future__ import annotations

import importlib.util

# module -> (its pip name, the extra that brings it)
EXTRAS = {
    "gguf": ("gguf", "demo"),
    "lm_eval": ("lm-eval", "eval"),
    "datasets": ("datasets", "eval"),
}


class MissingExtraError(ImportError):
    """A package of one of hf_kvquant's extras is not installed."""


def missing_extra(module: str, purpose: str) -> MissingExtraError:
    package, extra = EXTRAS[module]
    return MissingExtraError(f"{purpose} needs {package}, which hf_kvquant's `{extra}` extra installs: "
                             f'pip install -e ".[{extra}]" (from a clone) or pip install {package}')


def require(module: str, purpose: str) -> None:
    """Raise `MissingExtraError` (one line: the package and the extra to install) where ``module`` cannot be
    imported."""
    if importlib.util.find_spec(module) is None:
        raise missing_extra(module, purpose)
