"""Ground truth without a database: the split rule, grouping 'Maps to' edges, reading Usagi and benchmark set
files; known mappings from the sample database."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from harmonia.domain import MapsToEdge, SourceTargets
from harmonia.groundtruth import (
    GroundTruthError,
    group_edges,
    known_mappings,
    part_of,
    read_mapping_file,
    read_set,
    read_usagi_truth,
    write_set,
)
from harmonia.metrics import score_row
from harmonia.store import concepts as concept_store


def _pairs(n_icd: int = 300, n_other: int = 40) -> list[MapsToEdge]:
    """Synthetic 'Maps to' edges: every 7th ICD10 source has two targets."""
    out: list[tuple[int, str, str, str, str, int]] = []
    for i in range(n_icd):
        sid = 1000 + i
        out.append((sid, f"A{i:03d}", "ICD10", f"disease {i}", "Condition", 5000 + i))
        if i % 7 == 0:
            out.append((sid, f"A{i:03d}", "ICD10", f"disease {i}", "Condition", 9000 + i))
    for i in range(n_other):
        out.append((2000 + i, f"L{i}", "LAB", f"lab {i}", "Measurement", 6000 + i))
    return [MapsToEdge(*p) for p in out]


def test_group_edges_keeps_every_target_of_a_source() -> None:
    rows = group_edges(_pairs(14, 0), {5000: "Disease 0", 9000: "other"})
    assert len(rows) == 14
    first = rows[0]
    assert first.source_concept_id == 1000 and first.targets == [5000, 9000]
    assert first.target_names == ["Disease 0", "other"]
    assert first.same_name  # case-insensitive, either target counts
    assert [r.targets for r in rows if len(r.targets) > 1] == [[5000, 9000], [5007, 9007]]
    # a prediction hitting the second target counts as correct
    assert score_row([9007, 1], [9007, 1], rows[7].targets).hit1


def _usagi(tmp_path: Path, text: str, gz: bool = True) -> Path:
    p = tmp_path / ("lab.usagi.csv.gz" if gz else "lab.usagi.csv")
    data = text.encode()
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


USAGI = """sourceCode,sourceName,sourceFrequency,conceptId,conceptName,domainId,mappingStatus
1,P -Sodium,10,3000001,Sodium,Measurement,APPROVED
1,P -Sodium,10,3000002,Sodium in blood,Measurement,APPROVED
2,B -Hemoglobin,5,3000003,Hemoglobin,Measurement,APPROVED
3,U -Thing,1,3000004,Thing,Measurement,UNCHECKED
4,X -Unmapped,1,0,,Measurement,APPROVED
5,fP -Gone,1,3999999,Gone,Measurement,APPROVED
"""


@pytest.mark.parametrize(("text", "message"), [
    ("sourceCode,sourceName\n1,x\n", "no conceptId column"),
    ("sourceCode,sourceName,conceptId\n1,x,12\n2,y,abc\n", "line 3: conceptId='abc'"),
    ("sourceCode,sourceName,conceptId\n,x,12\n", "line 2: empty sourceCode"),
    ("sourceCode,sourceName,conceptId,mappingStatus\n1,x,12,UNCHECKED\n", "no approved rows"),
])
def test_usagi_bad_input_names_the_line_or_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GroundTruthError, match=message.replace("(", r"\(")):
        read_usagi_truth(_usagi(tmp_path, text, gz=False))


def test_set_round_trip_and_bad_rows(tmp_path: Path) -> None:
    rows = [SourceTargets("C1", "ICD10", "Cholera, unspecified", [1, 2], source_concept_id=7,
                          source_domain="Condition", target_names=["a", "b"], same_name=True),
            SourceTargets("9", "lab", 'P -"Na"', [3])]
    path = write_set(rows, tmp_path / "s.csv")
    assert read_set(path) == rows
    (tmp_path / "bad.csv").write_text("source_code,source_vocab,source_text,target_concept_ids\nA,V,text,1;x\n")
    with pytest.raises(GroundTruthError, match="line 2: target_concept_ids='1;x'"):
        read_set(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("source_code,source_text\nA,t\n")
    with pytest.raises(GroundTruthError, match="missing column.*source_vocab"):
        read_set(tmp_path / "bad2.csv")


def test_known_mappings_keep_the_split_and_only_valid_targets(conn, settings) -> None:
    dev = known_mappings(conn, settings.embedding.vocabularies)
    everything = known_mappings(conn, settings.embedding.vocabularies, all_parts=True)
    assert len(dev) > 1000 and len(everything) > len(dev)
    assert all(part_of(km.split_key) == "dev" for km in dev)
    assert any(part_of(km.split_key) == "test" for km in everything)
    concepts = concept_store.get_concepts(conn, sorted({t for km in everything for t in km.targets}))
    assert all(concepts[t].standard_concept == "S" and concepts[t].invalid_reason is None
               and concepts[t].vocabulary_id in settings.embedding.vocabularies
               for km in everything for t in km.targets)


def test_a_mapping_file_is_a_benchmark_set_or_a_usagi_export(tmp_path: Path) -> None:
    usagi = _usagi(tmp_path, USAGI)
    assert {r.source_code for r in read_mapping_file(usagi)} == {"1", "2", "5"}
    bench = write_set([SourceTargets("C1", "ICD10", "Cholera", [1], source_concept_id=7)], tmp_path / "b.csv")
    assert [r.split_key for r in read_mapping_file(bench)] == [7]
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(GroundTruthError, match="neither a benchmark set nor a Usagi file"):
        read_mapping_file(tmp_path / "other.csv")
