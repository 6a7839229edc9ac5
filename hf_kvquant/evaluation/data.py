"""Evaluation text: the WikiText-2 raw test split from a local file or the hub, and its split into documents.

The machines this project runs on cannot reach the dataset hub, so the default is a local copy of
``wiki.test.raw`` (the 2,891 non-empty rows of ``wikitext-2-raw-v1``'s test split, one per line), found at
``$HF_KVQUANT_WIKITEXT`` or at ``../shared/data/wikitext-2-raw-v1/wiki.test.raw`` next to a checkout of this
repository. Where the hub is reachable, ``hf:Salesforce/wikitext:wikitext-2-raw-v1:test`` reads the same text
through `datasets` (its rows joined as they are: every non-empty row ends with its newline, empty rows add
nothing, so the result equals the local file).
"""

from __future__ import annotations

import os
from pathlib import Path

from .extras import require

WIKITEXT_ENV = "HF_KVQUANT_WIKITEXT"
WIKITEXT = "wikitext"  # the name that means "WikiText-2 raw test, local file if present, else the hub"
HUB_WIKITEXT = "hf:Salesforce/wikitext:wikitext-2-raw-v1:test"
_REPO_RELATIVE_WIKITEXT = Path("..") / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


def local_wikitext_path() -> Path | None:
    """The local WikiText-2 raw test file: ``$HF_KVQUANT_WIKITEXT`` if set (even when missing: an explicit
    choice is not silently replaced), else ``../shared/data/...`` beside the repository if it exists, else None."""
    if os.environ.get(WIKITEXT_ENV):
        return Path(os.environ[WIKITEXT_ENV])
    candidate = (Path(__file__).resolve().parents[2] / _REPO_RELATIVE_WIKITEXT).resolve()
    return candidate if candidate.is_file() else None


def load_text(source: str = WIKITEXT) -> tuple[str, str]:
    """``(text, description)`` of ``source``: ``"wikitext"`` (the local WikiText-2 file, else the hub dataset),
    ``"hf:DATASET[:CONFIG[:SPLIT]]"`` (a hub dataset's ``text`` column, split ``test`` by default) or a file path.

    Raises `FileNotFoundError` for a path that is not a file, with the path in the message.
    """
    hint = ""
    if source == WIKITEXT:
        path = local_wikitext_path()
        source = HUB_WIKITEXT if path is None else str(path)
        hint = f" (from ${WIKITEXT_ENV})" if os.environ.get(WIKITEXT_ENV) else ""
    if source.startswith("hf:"):
        return _load_hub_text(source), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {source}{hint}")
    return path.read_text(encoding="utf-8"), str(path)


def _load_hub_text(source: str) -> str:
    hint = (f" (no local WikiText-2: set ${WIKITEXT_ENV} to a copy of wiki.test.raw, or pass a file path)"
            if source == HUB_WIKITEXT else "")
    require("datasets", f"reading {source} from the hub{hint}")
    import datasets  # optional: only hub sources need it

    name, config, split = (source[3:].split(":") + [None, "test"])[:3]
    if not name:
        raise ValueError(f"bad hub text source {source!r}; expected hf:DATASET[:CONFIG[:SPLIT]]")
    rows = datasets.load_dataset(name, config or None, split=split or "test")["text"]
    return "".join(row if row.endswith("\n") or not row else row + "\n" for row in rows)


def is_document_title(line: str) -> bool:
    """Whether ``line`` opens a WikiText article: `` = Title = `` (not a `` = = Section = = `` heading).

    The rule of lm-eval's document-level WikiText (``EleutherAI/wikitext_document_level``), so the local task
    sees the same 62 test documents.
    """
    stripped = line.replace("= = =", "===").replace("= =", "==").strip()
    return stripped.startswith("= ") and stripped.endswith(" =")


def wikitext_documents(text: str) -> list[str]:
    """The articles of a WikiText raw text, each from its title line to the line before the next title, lines
    joined with ``\\n`` (as in lm-eval's document-level WikiText; text before the first title is its own document)."""
    documents, lines = [], []
    for line in text.split("\n"):
        if is_document_title(line) and any(s.strip() for s in lines):
            documents.append("\n".join(lines))
            lines = []
        lines.append(line)
    if any(s.strip() for s in lines):
        documents.append("\n".join(lines))
    return documents
