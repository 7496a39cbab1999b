"""Lab- and drug-aware text (issue 20 points 3-4): the parsers on the real names of the sample's lab and drug sets,
the rewritten text reaching the encoder through the pipeline, and the agreement features in the candidates' scores
and the classifier's stacker."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from harmonia.config import Settings
from harmonia.domain import Candidate, SourceKind, SourceTerm
from harmonia.embedding.model import Embedder
from harmonia.kinds import builtin_kind_of
from harmonia.paths import sample_dir
from harmonia.text import drugs, labs, query_text
from tests.conftest import make_settings

LABS = SourceKind("labs", ("Measurement",), ("Measurement",))


def usagi_rows(name: str) -> list[dict[str, str]]:
    with gzip.open(sample_dir() / "benchmark" / name, "rt") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(("name", "text", "system"), [
    ("P -Potassium", "Potassium in Plasma", "Plasma"),
    ("dU-Urea", "Urea in 24 hour Urine", "24 hour Urine"),
    ("Li-immunoglobulin G", "immunoglobulin G in Cerebral spinal fluid", "Cerebral spinal fluid"),
    ("F -Adenovirus, antigen", "Adenovirus, antigen in Stool", "Stool"),
    ("fP-Folate", "Folate in Plasma --fasting", "Plasma"),
    ("U -Albumin (kval)", "Albumin [Presence] in Urine", "Urine"),
    ("Potassium (sat. urine)", "Potassium in 24 hour Urine", "24 hour Urine"),
    ("Potassium (feces collected)", "Potassium in 24 hour Stool", "24 hour Stool"),
    ("Glucose pleural fluid (pleural puncture)", "Glucose in Pleural fluid", "Pleural fluid"),
    ("Albumin (imm.) (liquor)", "Albumin (imm.) in Cerebral spinal fluid", "Cerebral spinal fluid"),
])
def test_lab_names_of_the_sets_are_read(name: str, text: str, system: str) -> None:
    lab = labs.parse_lab(name)
    assert lab.text == text and lab.specimen is not None and lab.specimen.text == system


@pytest.mark.parametrize("name", ["C-reactive protein, sensitive", "Anti-Mullerian hormone", "Beta-2", "L-dopa",
                                  "E-selectin", "platelets", "Cephaline timed", "SD-Score of IGF1 concentration"])
def test_names_without_a_known_hint_are_left_alone(name: str) -> None:
    lab = labs.parse_lab(name)
    assert not lab.changed and lab.text == name


def test_unit_column_gives_the_property() -> None:
    assert labs.parse_lab("Sodium", "mmol/L").text == "Sodium [Moles/volume]"
    assert labs.parse_lab("U -Urea", "mmol/24h").text == "Urea [Moles/time] in Urine"
    assert labs.parse_lab("ALT", "U/L").prop == "Enzymatic activity/volume"
    assert labs.unit_of({"Unit": " g/L "}) == "g/L" and labs.unit_of({"comment": "x"}) == ""


@pytest.mark.parametrize("set_name", ["finomop_lab.usagi.csv.gz", "amstel_lab.dev.usagi.csv.gz"])
def test_parsed_specimens_agree_with_the_approved_targets(set_name: str) -> None:
    """Where the parser reads a specimen and the approved LOINC target names a system, they agree: the features
    would point the ranking the right way."""
    rows = usagi_rows(set_name)
    verdicts = [labs.match_features(labs.parse_lab(r["sourceName"]), r["conceptName"])["lab_system"]
                for r in rows if r["domainId"] == "Measurement"]
    read = [v for v in verdicts if v != 0]
    assert len(read) >= 0.6 * len(verdicts)          # most names carry a specimen the tables know
    assert sum(v > 0 for v in read) >= 0.98 * len(read), sum(v < 0 for v in read)


def test_loinc_axes_of_candidate_names() -> None:
    ax = labs.loinc_axes("Potassium [Moles/volume] in Serum or Plasma")
    assert (ax.component, ax.property, ax.system, ax.scale) == ("Potassium", "Moles/volume", "Serum or Plasma", "Qn")
    ax = labs.loinc_axes("Gentamicin [Mass/volume] in Serum or Plasma --trough")
    assert ax.system == "Serum or Plasma"
    assert labs.loinc_axes("Albumin [Presence] in Urine").scale == "Ord"
    assert labs.loinc_axes("pH of Arterial blood").system == "Arterial blood"
    assert labs.loinc_axes("Potassium [Moles/volume] in 24 hour Urine").timing == "24 hour"
    # the miss: a 24-hour urine candidate for a faeces name contradicts on the system
    f = labs.match_features(labs.parse_lab("Potassium (faeces)"), "Potassium [Moles/volume] in 24 hour Urine")
    assert f["lab_system"] == -1.0
    assert labs.match_features(labs.parse_lab("U -Albumin (kval)"), "Albumin [Presence] in Urine") == {
        "lab_system": 1.0, "lab_scale": 1.0, "lab_property": 0.0, "lab_timing": 1.0}


@pytest.mark.parametrize(("name", "ingredient", "strength", "form", "brand"), [
    ("Diazepam (Valium)", "Diazepam", "", "", "Valium"),
    ("Sodium Bicarbonate 4.2%", "Sodium Bicarbonate", "42 MG/ML", "", ""),
    ("glucose 40% syringe pump infusion", "glucose", "400 MG/ML", "Injectable Solution", ""),
    ("salbutamol inhalation solution", "salbutamol", "", "Inhalation Solution", ""),
    ("mupirocin ointment", "mupirocin", "", "Topical Ointment", ""),
    ("sodium chloride 0.9% piggyback (secondary) infusion", "sodium chloride", "9 MG/ML", "Injectable Solution", ""),
    ("Water 200ml", "Water 200ml", "", "", ""),
])
def test_drug_strings_of_the_set_are_read(name: str, ingredient: str, strength: str, form: str, brand: str) -> None:
    d = drugs.parse_drug(name)
    assert (d.ingredient, d.strength, d.dose_form, d.brand) == (ingredient, strength, form, brand)


def test_drug_features_against_the_approved_rxnorm_targets() -> None:
    rows = [r for r in usagi_rows("amstel_drug.dev.usagi.csv.gz") if r["domainId"] == "Drug"]
    feats = [drugs.match_features(drugs.parse_drug(r["sourceName"]), r["conceptName"]) for r in rows]
    brands = [f["drug_brand"] for f in feats if f["drug_brand"]]
    assert len(brands) >= 50 and sum(b > 0 for b in brands) >= 0.85 * len(brands)
    assert drugs.rxnorm_parts("500 ML Sodium Chloride 9 MG/ML Injectable Solution").strength == "9 MG/ML"
    assert drugs.match_features(drugs.parse_drug("glucose 40% infusion"), "Glucose 50 MG/ML Injectable Solution") \
        == {"drug_strength": -1.0, "drug_form": 1.0, "drug_brand": 0.0}


def test_only_the_kinds_of_the_parsers_are_rewritten() -> None:
    lab = SourceTerm("1", "finomop_lab", "P -Potassium")
    assert query_text(lab, LABS) == "Potassium in Plasma"
    assert query_text(lab, builtin_kind_of("ICD10")) == "P -Potassium"     # diagnosis: as written
    assert query_text(lab, LABS, lab_text=False) == "P -Potassium"
    drug = SourceTerm("2", "NDC", "Diazepam (Valium)")
    assert query_text(drug, builtin_kind_of("NDC")) == "Diazepam [Valium]"


def _recording(embedder: Embedder, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what the (real) embedder is asked to encode as queries."""
    seen: list[str] = []
    inner = embedder.encode_queries

    def encode_queries(texts: list[str], *a: Any, **kw: Any) -> np.ndarray:
        seen.extend(texts)
        return inner(texts, *a, **kw)

    monkeypatch.setattr(embedder, "encode_queries", encode_queries)
    return seen


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_rewritten_lab_text_reaches_the_encoder_and_features_the_candidates(
        conn: psycopg.Connection, settings: Settings, tmp_path: Path, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from harmonia.kinds import KindRegistry
    from harmonia.pipeline.run import Pipeline

    KindRegistry().declare(conn, "finomop_lab", "labs")
    terms = [SourceTerm("1020", "finomop_lab", "P -Adrenocorticotropin"),
             SourceTerm("k", "finomop_lab", "Potassium (sat. urine)", extra={"unit": "mmol/24h"}),
             SourceTerm("A00", "ICD10", "Cholera")]
    for on in (True, False):
        s = make_settings(settings.database.url, tmp_path, retrieval_mode=mode, retrieval_lab_text=on)
        with Pipeline.from_settings(conn, s) as pipe:
            assert pipe.retriever.embedder is not None
            seen = _recording(pipe.retriever.embedder, monkeypatch)
            decisions = pipe.decide(terms)
        if on:
            assert seen == ["Adrenocorticotropin in Plasma", "Potassium [Moles/time] in 24 hour Urine", "Cholera"]
        else:
            assert seen == [t.source_text for t in terms]
        # decisions keep the term as it was read (stored, shown to reviewers)
        assert [d.term.source_text for d in decisions] == [t.source_text for t in terms]
        lab_cands: list[Candidate] = decisions[0].candidates
        assert lab_cands and all(c.domain_id == "Measurement" for c in lab_cands)
        if on:
            assert all("lab_system" in c.scores for c in lab_cands)
            assert {c.scores["lab_system"] for c in lab_cands} <= {-1.0, 0.0, 1.0}
            assert any(c.scores["lab_system"] == 1.0 for c in lab_cands)
            potassium = decisions[1].candidates  # 24-hour urine: serum and plasma potassium contradict
            assert any(c.scores["lab_system"] < 0 for c in potassium)
            assert "24 hour Urine" in potassium[0].concept_name
            assert "lab_system" not in decisions[2].candidates[0].scores   # diagnosis: no lab features
        else:
            assert not any("lab_system" in c.scores for c in lab_cands)


def test_stacker_reads_the_text_features_and_ignores_those_it_never_saw_vary() -> None:
    from harmonia.rerank.classifier.stacker import FEATURES, Stacker, features

    cands = [Candidate(i, f"c{i}", "Measurement", "LOINC", "Lab Test", str(i), 0.9 - i / 10,
                       scores={"vector": 0.9 - i / 10, "lab_system": 1.0 if i == 2 else -1.0}) for i in range(4)]
    x = features(cands, np.zeros(4))
    assert x.shape == (4, len(FEATURES))
    assert list(x[:, FEATURES.index("lab_system")]) == [-1.0, -1.0, 1.0, -1.0]
    # fit where the lab features are constant (no lab sources): varying them later changes nothing
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(200, len(FEATURES)))
    xs[:, [FEATURES.index(f) for f in ("lab_system", "lab_scale", "drug_brand")]] = 0.0
    y = (xs[:, 0] > 0).astype(float)
    st = Stacker.fit(xs, y, hidden=(8,))
    moved = xs.copy()
    moved[:, FEATURES.index("lab_system")] = 1.0
    assert np.allclose(st.logits(xs), st.logits(moved))
