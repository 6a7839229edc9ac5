"""The `wikitext_local` task's dataset: the local WikiText-2 raw test file, split into its 62 articles.

Documents, detokenizer and metrics are those of lm-eval's own `wikitext` task (`EleutherAI/wikitext_document_level`):
the same article boundaries, ``page`` holding an article's lines joined with ``\\n``. The local file has no
blank lines (it keeps only the non-empty rows), so a page lacks the `` `` lines the hub's document-level pages
carry between paragraphs; word and byte counts differ from the hub task's by those.
"""

from __future__ import annotations

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

from hf_kvquant.evaluation.data import WIKITEXT, load_text, wikitext_documents

__all__ = ["load_wikitext", "process_results", "wikitext_detokenizer"]


def load_wikitext(wikitext_path: str | None = None, **_) -> datasets.DatasetDict:
    """``{"test": Dataset({"page": [...]})}``. lm-eval passes the task metadata and model args as keyword
    arguments (hence ``**_``); ``wikitext_path`` comes from ``--metadata``."""
    text, _source = load_text(wikitext_path or WIKITEXT)
    pages = wikitext_documents(text)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})
