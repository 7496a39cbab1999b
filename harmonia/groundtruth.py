"""Ground truth: which sources belong to the development part and which to the test part, and where sources with
their correct targets come from (harmonia.domain.SourceTargets): benchmark set files, Usagi exports, the
vocabulary's own 'Maps to' edges and reviewers' decisions.

The split is one deterministic rule shared by curation, classifier and embedder training, retrieval tuning and the
mapping memory, so nothing trained, tuned or remembered on the development part can ever see a test source: a
source is in the test part when a hash of (seed, split key) falls below `test_share`. The split key is the source
concept_id for vocabulary ground truth, or "vocab:code" for external sets (SourceTargets.split_key).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harmonia.domain import MapsToEdge, SourceTargets
from harmonia.store import concepts as concept_store
from harmonia.store import mapping as map_store
from harmonia.store import vocab as vocab_store

if TYPE_CHECKING:
    import psycopg

DEFAULT_SEED = 13
DEFAULT_TEST_SHARE = 0.5
PARTS = ("dev", "test")

# The columns of a benchmark set file (write_set / read_set).
CSV_COLUMNS = ["source_concept_id", "source_code", "source_vocab", "source_text", "source_domain",
               "target_concept_ids", "target_names", "same_name"]


class GroundTruthError(ValueError):
    """A benchmark set, Usagi or ground-truth file cannot be used; the message names the file, line and field."""


# ------------------------------------------------------------------------------------------------ the split


def part_of(split_key: int | str, seed: int = DEFAULT_SEED, test_share: float = DEFAULT_TEST_SHARE) -> str:
    """'dev' or 'test' for a source (stable across runs, machines and Python versions)."""
    h = hashlib.sha256(f"{seed}:{split_key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    return "test" if u < test_share else "dev"


# -------------------------------------------------------------------------------------- grouping and names


def _norm(name: str) -> str:
    return " ".join(name.casefold().split())


def same_name(source: str, target_names: Iterable[str]) -> bool:
    """Whether the source's name equals (case and spacing aside) one of its targets' names."""
    s = _norm(source)
    return any(_norm(t) == s for t in target_names)


def group_edges(edges: Iterable[MapsToEdge], target_names: dict[int, str] | None = None) -> list[SourceTargets]:
    """'Maps to' edges -> one SourceTargets per source concept (targets sorted), by source concept_id."""
    by_src: dict[int, SourceTargets] = {}
    for e in edges:
        row = by_src.get(e.source_concept_id)
        if row is None:
            row = by_src[e.source_concept_id] = SourceTargets(
                source_code=str(e.source_code), source_vocab=str(e.source_vocab), source_text=str(e.source_text),
                targets=[], source_concept_id=int(e.source_concept_id), source_domain=str(e.source_domain or ""))
        if int(e.target_concept_id) not in row.targets:
            row.targets.append(int(e.target_concept_id))
    names = target_names or {}
    for row in by_src.values():
        row.targets.sort()
        row.target_names = [names.get(t, "") for t in row.targets]
        row.same_name = same_name(row.source_text, row.target_names)
    return [by_src[k] for k in sorted(by_src)]


# ------------------------------------------------------------------------------------------------ files


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GroundTruthError(f"{path}: not UTF-8 ({exc})") from exc


def _col(header: Sequence[str], *names: str) -> str | None:
    lower = {h.lower(): h for h in header}
    return next((lower[n.lower()] for n in names if n.lower() in lower), None)


def usagi_set_name(path: Path) -> str:
    n = path.name
    for suffix in (".gz", ".csv", ".tsv", ".usagi"):
        n = n.removesuffix(suffix)
    return n


def read_usagi_truth(path: Path, default_vocab: str | None = None) -> list[SourceTargets]:
    """Approved rows of a Usagi export (sourceCode, sourceName, conceptId), grouped per source code.

    Rows whose mappingStatus is present and not APPROVED are ignored; conceptId 0 (Usagi's 'unmapped') too."""
    path = Path(path)
    text = _open_text(path)
    sample = text[:4096]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if sample.count("\t") > sample.count(",")
                            else ",")
    header = reader.fieldnames or []
    code_c, name_c, cid_c = (_col(header, "sourceCode", "source_code"), _col(header, "sourceName", "source_name"),
                             _col(header, "conceptId", "concept_id", "targetConceptId"))
    if code_c is None or name_c is None or cid_c is None:
        missing = [n for n, c in (("sourceCode", code_c), ("sourceName", name_c), ("conceptId", cid_c)) if c is None]
        raise GroundTruthError(f"{path}: no {', '.join(missing)} column (header: {header})")
    status_c = _col(header, "mappingStatus")
    vocab_c = _col(header, "sourceVocabularyId", "source_vocab", "sourceVocabulary")
    domain_c = _col(header, "domainId", "domain_id")
    vocab_default = default_vocab or usagi_set_name(path)
    by_key: dict[tuple[str, str], SourceTargets] = {}
    for row in reader:
        line = reader.line_num
        if None in row:
            raise GroundTruthError(f"{path}: line {line}: more fields than the header")
        if status_c and (row.get(status_c) or "").strip().upper() not in ("APPROVED", ""):
            continue
        code, name = (row.get(code_c) or "").strip(), (row.get(name_c) or "").strip()
        cid_raw = (row.get(cid_c) or "").strip()
        if not code:
            raise GroundTruthError(f"{path}: line {line}: empty {code_c}")
        try:
            cid = int(cid_raw)
        except ValueError as exc:
            raise GroundTruthError(f"{path}: line {line}: {cid_c}={cid_raw!r} is not a concept id") from exc
        if cid == 0:
            continue
        vocab = ((row.get(vocab_c) or "").strip() if vocab_c else "") or vocab_default
        key = (vocab, code)
        r = by_key.get(key)
        if r is None:
            if not name:
                raise GroundTruthError(f"{path}: line {line}: empty {name_c}")
            r = by_key[key] = SourceTargets(source_code=code, source_vocab=vocab, source_text=name, targets=[],
                                            source_domain=(row.get(domain_c) or "").strip() if domain_c else "")
        if cid not in r.targets:
            r.targets.append(cid)
    if not by_key:
        raise GroundTruthError(f"{path}: no approved rows")
    return list(by_key.values())


def _csv_row(r: SourceTargets) -> dict[str, str]:
    return {"source_concept_id": "" if r.source_concept_id is None else str(r.source_concept_id),
            "source_code": r.source_code, "source_vocab": r.source_vocab,
            "source_text": r.source_text, "source_domain": r.source_domain,
            "target_concept_ids": ";".join(str(t) for t in r.targets),
            "target_names": ";".join(r.target_names), "same_name": "1" if r.same_name else "0"}


def write_set(rows: Sequence[SourceTargets], path: Path) -> Path:
    """Write a benchmark set file atomically: it is either the old one or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(_csv_row(r))
    tmp.replace(path)
    return path


def read_set(path: Path) -> list[SourceTargets]:
    """A set written by `write_set` (or by hand with the same columns; target_names and same_name optional)."""
    path = Path(path)
    if not path.exists():
        raise GroundTruthError(f"{path}: no such file")
    reader = csv.DictReader(io.StringIO(_open_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("source_code", "source_vocab", "source_text", "target_concept_ids") if c not in header]
    if missing:
        raise GroundTruthError(f"{path}: missing column(s) {', '.join(missing)} (header: {header})")
    rows: list[SourceTargets] = []
    for rec in reader:
        line = reader.line_num
        if None in rec:
            raise GroundTruthError(f"{path}: line {line}: more fields than the header")
        try:
            targets = [int(t) for t in (rec.get("target_concept_ids") or "").split(";") if t.strip()]
        except ValueError as exc:
            raise GroundTruthError(f"{path}: line {line}: target_concept_ids={rec['target_concept_ids']!r} is not "
                                   "a ';'-separated list of concept ids") from exc
        if not targets:
            raise GroundTruthError(f"{path}: line {line}: empty target_concept_ids")
        text = (rec.get("source_text") or "").strip()
        if not text:
            raise GroundTruthError(f"{path}: line {line}: empty source_text")
        sid_raw = (rec.get("source_concept_id") or "").strip()
        try:
            sid = int(sid_raw) if sid_raw else None
        except ValueError as exc:
            raise GroundTruthError(f"{path}: line {line}: source_concept_id={sid_raw!r} is not an integer") from exc
        names = [n for n in (rec.get("target_names") or "").split(";")] if rec.get("target_names") else []
        rows.append(SourceTargets(source_code=(rec.get("source_code") or "").strip(),
                                  source_vocab=(rec.get("source_vocab") or "").strip(), source_text=text,
                                  targets=targets, source_concept_id=sid,
                                  source_domain=(rec.get("source_domain") or "").strip(), target_names=names,
                                  same_name=(rec.get("same_name") or "0").strip() in ("1", "true", "True")))
    return rows


def read_mapping_file(path: Path) -> list[SourceTargets]:
    """Every row of a mapping file: a benchmark set (write_set) or a Usagi export (its approved rows)."""
    try:
        return read_set(path)
    except GroundTruthError as exc:
        if "missing column" not in str(exc):
            raise
        try:
            return read_usagi_truth(path)
        except GroundTruthError as exc2:
            raise GroundTruthError(f"{path}: neither a benchmark set nor a Usagi file ({exc2})") from exc2


# ------------------------------------------------------------------------------------------ from the database


def maps_to_sources(conn: psycopg.Connection, source_vocabularies: Sequence[str] | None = None, *,
                    part: str | None = None) -> list[SourceTargets]:
    """The vocabulary's 'Maps to' ground truth (of some source vocabularies; of one part), by source concept_id."""
    edges = vocab_store.maps_to_edges(conn, source_vocabularies or None)
    return group_edges(e for e in edges if part is None or part_of(e.source_concept_id) == part)


def file_mappings(conn: psycopg.Connection, paths: Sequence[Path | str], vocabularies: Sequence[str] | None, *,
                  all_parts: bool = False) -> list[SourceTargets]:
    """The rows of mapping files (benchmark sets or Usagi exports) of the development part unless `all_parts`,
    targets kept where they are valid standard concepts of `vocabularies` (None: any); rows left without a target
    or a text dropped."""
    out = [st for path in paths for st in read_mapping_file(Path(path)) if all_parts or part_of(st.split_key) == "dev"]
    for st in out:
        st.origin = "file"
    return _with_valid_targets(conn, out, vocabularies)


def _with_valid_targets(conn: psycopg.Connection, rows: list[SourceTargets],
                        vocabularies: Sequence[str] | None) -> list[SourceTargets]:
    concepts = concept_store.get_concepts(conn, {t for st in rows for t in st.targets})
    wanted = set(vocabularies) if vocabularies else None

    def ok(cid: int) -> bool:
        c = concepts.get(cid)
        return c is not None and c.is_valid_standard and (wanted is None or c.vocabulary_id in wanted)

    for st in rows:
        st.targets = sorted({t for t in st.targets if ok(t)})
    return [st for st in rows if st.targets and st.source_text.strip()]


def known_mappings(conn: psycopg.Connection, vocabularies: Sequence[str] | None, *,
                   extra_sets: Sequence[Path] = (), include_reviews: bool = True,
                   all_parts: bool = False) -> list[SourceTargets]:
    """What is already mapped: the vocabulary's 'Maps to' sources, then the rows of mapping files (`extra_sets`:
    benchmark sets or Usagi exports), then reviewers' decisions (origin vocabulary | file | review, in that order).

    Of the development part unless `all_parts`; targets kept only where they are valid standard concepts of
    `vocabularies` (None: any), and sources left without a target or a text dropped. A reviewed code keeps the
    benchmark's split: its vocabulary concept's id where it is one, else "vocab:code"."""

    def wanted_part(key: int | str) -> bool:
        return all_parts or part_of(key) == "dev"

    out: list[SourceTargets] = []
    for st in maps_to_sources(conn):
        if wanted_part(st.split_key):
            st.origin = "vocabulary"
            out.append(st)
    out += file_mappings(conn, extra_sets, vocabularies, all_parts=all_parts)
    if include_reviews:
        approvals = map_store.reviewer_approvals(conn)
        as_concept = concept_store.concept_ids_by_code(conn, [(r.source_code, r.source_vocab) for r in approvals])
        for r in approvals:
            st = SourceTargets(source_code=r.source_code, source_vocab=r.source_vocab, source_text=r.source_text,
                               targets=[int(r.concept_id)],
                               source_concept_id=as_concept.get((r.source_code, r.source_vocab)), origin="review")
            if wanted_part(st.split_key):
                out.append(st)
    return _with_valid_targets(conn, out, vocabularies)
