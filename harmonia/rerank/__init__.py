"""Rerankers: given a source term and its retrieved candidates, rank the best few with a confidence.

One interface (base.py), three kinds chosen by the `reranker` setting: `none` (retrieval order, similarity as
confidence, base.py), `llm` (llm/: a provider forced through a JSON-schema tool call) and `classifier`
(classifier/: a local fine-tuned cross-encoder). `make_reranker` builds the one the settings name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harmonia.config import Settings
from harmonia.rerank.base import NoneReranker, Reranker

if TYPE_CHECKING:
    import psycopg

    from harmonia.kinds import KindRegistry


def make_reranker(settings: Settings, conn: psycopg.Connection | None = None, *, kind: str | None = None,
                  source_kinds: KindRegistry | None = None) -> Reranker:
    """The reranker the settings name, or `kind` (a second opinion; the caller closes it). Swapping providers or
    kinds is configuration, never code. `conn` only says a database is in use (the LLM reranker then logs and
    caches on its own connection). `source_kinds`: the caller's registry of source kinds (the pipeline's, which it
    keeps fresh), for the classifier's per-kind ranking."""
    kind = kind or settings.rerank.kind
    if kind == "none":
        return NoneReranker(settings.rerank.top_n)
    if kind == "llm":
        from harmonia.rerank.llm.reranker import LLMReranker

        return LLMReranker.from_settings(settings, conn=conn)
    if kind == "classifier":
        from harmonia.rerank.classifier.reranker import ClassifierReranker

        return ClassifierReranker.from_settings(settings, conn=conn, kinds=source_kinds)
    raise ValueError(f"unknown reranker {kind!r}")
