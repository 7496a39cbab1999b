"""Retrieval as a decision sees it: each source term read as its kind reads it, searched in its kind's domains and
vocabularies, its candidates carrying what its text says about them. The pipeline retrieves so for every decision,
and the classifier's trainer mines its negatives so (harmonia.rerank.classifier.train), so a model learns from the
very candidate lists it will rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from harmonia.domain import Candidate, SourceKind, SourceTerm
from harmonia.kinds import KindRegistry
from harmonia.retrieval.base import Retriever
from harmonia.text import query_text, term_features


def views(terms: Sequence[SourceTerm], kinds: KindRegistry, *, lab_text: bool = True,
          drug_text: bool = True) -> list[SourceTerm]:
    """Each term as retrieval and the rerankers see it: a lab name's or drug string's text rewritten by
    harmonia.text where `retrieval_lab_text` / `retrieval_drug_text` is on (the original text kept in
    extra["original_text"])."""
    if not (lab_text or drug_text):
        return list(terms)
    out = []
    for t in terms:
        text = query_text(t, kinds.kind_of(t.source_vocab), lab_text=lab_text, drug_text=drug_text)
        out.append(t if text == t.source_text else
                   replace(t, source_text=text, extra={**t.extra, "original_text": t.source_text}))
    return out


def search(retriever: Retriever, terms: Sequence[SourceTerm], kinds: KindRegistry, *, kind_filter: bool = True,
           lab_text: bool = True, drug_text: bool = True) -> list[list[Candidate]]:
    """Candidates per term as given (a view, see `views`); with the kind filter on, each kind's terms are searched
    in its domains and vocabularies only (retrievers still return K rows under a filter). A lab or drug term's
    candidates get its text's agreement features in `Candidate.scores` (lab_system, ..., drug_brand) for the
    classifier's stacker."""
    out: list[list[Candidate]] = [[] for _ in terms]
    groups: dict[SourceKind, list[int]] = {}
    for i, t in enumerate(terms):
        groups.setdefault(kinds.kind_of(t.source_vocab), []).append(i)
    for kind, idx in groups.items():
        domains = kind.retrieve_domains if kind_filter and kind.retrieve_domains else None
        vocabularies = kind.vocabularies if kind_filter and kind.vocabularies else None
        found = retriever.search_many([terms[i].source_text for i in idx], domains=domains,
                                      vocabularies=vocabularies, source_keys=[terms[i].key for i in idx])
        for i, cands in zip(idx, found, strict=True):
            out[i] = cands
            if lab_text or drug_text:
                term = terms[i]
                original = SourceTerm(term.source_code, term.source_vocab,
                                      str(term.extra.get("original_text", term.source_text)), extra=term.extra)
                feats = term_features(original, kind, [c.concept_name for c in cands], lab_text=lab_text,
                                      drug_text=drug_text)
                # Features only, the order stays: moving contradicted candidates behind the rest was measured
                # and lost top-5 on the ICU drug set without gaining on the lab sets (docs/retrieval.md).
                for c, f in zip(cands, feats, strict=True):
                    c.scores.update(f)
    return out
