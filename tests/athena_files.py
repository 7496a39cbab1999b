"""Writes small Athena-format vocabulary folders for loader tests."""

from __future__ import annotations

import gzip
from pathlib import Path

CONCEPT_HEADER = ("concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\t"
                  "concept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason")
REL_HEADER = "concept_id_1\tconcept_id_2\trelationship_id\tvalid_start_date\tvalid_end_date\tinvalid_reason"


def concept_row(cid: int, name: str, std: str = "S", vocab: str = "SNOMED", domain: str = "Condition",
                invalid: str = "") -> str:
    return f"{cid}\t{name}\t{domain}\t{vocab}\tClinical Finding\t{std}\tC{cid}\t19700101\t20991231\t{invalid}"


def write_vocab(directory: Path, concepts: list[str], relationships: list[str] | None = None, *,
                gz: bool = False, extra: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        if gz:
            with gzip.open(directory / f"{name}.csv.gz", "wt", encoding="utf-8") as fh:
                fh.write(text)
        else:
            (directory / f"{name}.csv").write_text(text, encoding="utf-8")

    put("CONCEPT", "\n".join([CONCEPT_HEADER, *concepts]) + "\n")
    if relationships is not None:
        put("CONCEPT_RELATIONSHIP", "\n".join([REL_HEADER, *relationships]) + "\n")
    for name, text in (extra or {}).items():
        put(name, text)
    return directory
