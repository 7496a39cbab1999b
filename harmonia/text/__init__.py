"""Source-text understanding per kind of source (issue 20): lab names (labs.py: specimen, scale and unit hints; a
candidate's LOINC axes) and drug strings (drugs.py: ingredient, strength, dose form, brand).

`query_text(term, kind)` is the text retrieval and the rerankers see for a term of that kind (the term's own text for
other kinds); `term_features(term, kind, candidate_name)` the agreement features for a candidate. Pure text work,
imports only harmonia.domain: it sits with harmonia.sources (layer 4), below every stage that reads source text.
"""

from __future__ import annotations

from harmonia.domain import SourceKind, SourceTerm
from harmonia.text import drugs, labs

LAB_KINDS = ("labs",)
DRUG_KINDS = ("drugs",)


def query_text(term: SourceTerm, kind: SourceKind, *, lab_text: bool = True, drug_text: bool = True) -> str:
    """The rewritten text of a lab name or drug string (where its kind is labs or drugs and the switch is on)."""
    if lab_text and kind.name in LAB_KINDS:
        return labs.parse_lab(term.source_text, labs.unit_of(term.extra)).text
    if drug_text and kind.name in DRUG_KINDS:
        return drugs.parse_drug(term.source_text).text
    return term.source_text


def term_features(term: SourceTerm, kind: SourceKind, candidate_names: list[str], *, lab_text: bool = True,
                  drug_text: bool = True) -> list[dict[str, float]]:
    """Per candidate, how it agrees with what the term's text says (empty dicts for kinds without a parser)."""
    if lab_text and kind.name in LAB_KINDS:
        lab = labs.parse_lab(term.source_text, labs.unit_of(term.extra))
        return [labs.match_features(lab, n) for n in candidate_names]
    if drug_text and kind.name in DRUG_KINDS:
        d = drugs.parse_drug(term.source_text)
        return [drugs.match_features(d, n) for n in candidate_names]
    return [{} for _ in candidate_names]
