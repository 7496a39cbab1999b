"""The retriever interface: the top-K valid standard concepts for source texts (harmonia.retrieval.make_retriever
builds the one the settings name)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

from harmonia.domain import Candidate, SourceKey

if TYPE_CHECKING:
    from harmonia.embedding.model import Embedder


class RetrievalError(RuntimeError):
    """A retriever cannot work (e.g. nothing is embedded for its model)."""


class Retriever(ABC):
    """Subclasses implement `search_many`; `close` releases what the retriever opened itself (never the connection
    it was given). A retriever is a context manager."""

    embedder: Embedder | None = None  # the query encoder, where the retriever has one

    def search(self, text: str, k: int | None = None, *, domains: Sequence[str] | None = None,
               vocabularies: Sequence[str] | None = None, exact: bool = False) -> list[Candidate]:
        return self.search_many([text], k, domains=domains, vocabularies=vocabularies, exact=exact)[0]

    @abstractmethod
    def search_many(self, texts: Sequence[str], k: int | None = None, *, domains: Sequence[str] | None = None,
                    vocabularies: Sequence[str] | None = None, exact: bool = False,
                    source_keys: Sequence[SourceKey | None] | None = None) -> list[list[Candidate]]:
        """The candidates of each text, best first. `k` defaults to retrieval_top_k and `domains` to
        retrieval_domains; `source_keys` ((source_code, source_vocab) of each text) matter only to a retriever with
        a mapping memory, which never returns a source's own map."""

    def close(self) -> None:  # noqa: B027 - optional hook: most retrievers hold nothing of their own
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
