"""Athena vocabulary loader: CONCEPT.csv and friends (tab-separated, YYYYMMDD dates, plain or .gz) -> vocab.*.

Rows are checked here (field count, integers, dates, required fields, UTF-8) so that a bad row stops the load with
its file and line; good rows stream into PostgreSQL with COPY into staging tables beside the live ones, which
replace them in the same transaction (harmonia.store.vocab). A failed load leaves the old vocabulary as it was.

Each load is a release: named by the VOCABULARY file's 'None' version (Athena's release name) when present, else
by a hash of the loaded rows; the replaced release stays readable for `harmonia vocab diff` and the re-check.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from harmonia.store import release as release_store
from harmonia.store import vocab as vocab_store

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class TableSpec:
    table: str
    stem: str  # file name without .csv / .csv.gz
    required: bool
    columns: tuple[str, ...]
    int_columns: frozenset[str]
    date_columns: frozenset[str] = frozenset()
    not_null: frozenset[str] = frozenset()


def _spec(table: str, stem: str, required: bool, columns: str, ints: str = "", dates: str = "",
          nullable: str = "") -> TableSpec:
    cols = tuple(columns.split())
    return TableSpec(table, stem, required, cols, frozenset(ints.split()), frozenset(dates.split()),
                     frozenset(c for c in cols if c not in nullable.split()))


SPECS: list[TableSpec] = [
    _spec("concept", "CONCEPT", True,
          "concept_id concept_name domain_id vocabulary_id concept_class_id standard_concept concept_code "
          "valid_start_date valid_end_date invalid_reason",
          ints="concept_id", dates="valid_start_date valid_end_date", nullable="standard_concept invalid_reason"),
    _spec("concept_relationship", "CONCEPT_RELATIONSHIP", False,
          "concept_id_1 concept_id_2 relationship_id valid_start_date valid_end_date invalid_reason",
          ints="concept_id_1 concept_id_2", dates="valid_start_date valid_end_date", nullable="invalid_reason"),
    _spec("concept_synonym", "CONCEPT_SYNONYM", False, "concept_id concept_synonym_name language_concept_id",
          ints="concept_id language_concept_id"),
    _spec("concept_ancestor", "CONCEPT_ANCESTOR", False,
          "ancestor_concept_id descendant_concept_id min_levels_of_separation max_levels_of_separation",
          ints="ancestor_concept_id descendant_concept_id min_levels_of_separation max_levels_of_separation"),
    _spec("vocabulary", "VOCABULARY", False,
          "vocabulary_id vocabulary_name vocabulary_reference vocabulary_version vocabulary_concept_id",
          ints="vocabulary_concept_id", nullable="vocabulary_reference vocabulary_version"),
    _spec("domain", "DOMAIN", False, "domain_id domain_name domain_concept_id", ints="domain_concept_id"),
    _spec("concept_class", "CONCEPT_CLASS", False, "concept_class_id concept_class_name concept_class_concept_id",
          ints="concept_class_concept_id"),
    _spec("relationship", "RELATIONSHIP", False,
          "relationship_id relationship_name is_hierarchical defines_ancestry reverse_relationship_id "
          "relationship_concept_id", ints="relationship_concept_id"),
]


class VocabLoadError(ValueError):
    """A vocabulary file cannot be loaded; the message names the file and line."""


@dataclass
class LoadReport:
    directory: str
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    release_id: int | None = None
    release_label: str = ""
    previous_release_id: int | None = None
    kept: int = 0  # concepts the files lack that maps still point at: kept, marked gone

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def find_file(directory: Path, stem: str) -> Path | None:
    by_lower = {p.name.lower(): p for p in directory.iterdir() if p.is_file()}
    for suffix in (".csv", ".csv.gz", ".tsv", ".tsv.gz"):
        hit = by_lower.get((stem + suffix).lower())
        if hit:
            return hit
    return None


def _open(path: Path) -> io.BufferedIOBase:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned object
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _is_int(v: str) -> bool:
    return v.isdigit() or (v[:1] == "-" and v[1:].isdigit())


def validated_chunks(path: Path, spec: TableSpec, on_bytes: Callable[[int], object] | None = None
                     ) -> Iterator[tuple[list[str], bytes, int]]:
    """Yield (columns, chunk of COPY-ready lines, rows in chunk); raise VocabLoadError on the first bad row."""
    with _open(path) as fh:
        header_raw = fh.readline()
        if not header_raw:
            raise VocabLoadError(f"{path.name}: empty file (expected a header row)")
        header = header_raw.decode("utf-8-sig").rstrip("\r\n").split("\t")
        header = [h.strip().lower() for h in header]
        unknown = [h for h in header if h not in spec.columns]
        if unknown:
            raise VocabLoadError(f"{path.name} line 1: unknown column(s) {unknown}; expected {list(spec.columns)}")
        missing = [c for c in spec.columns if c in spec.not_null and c not in header]
        if missing:
            raise VocabLoadError(f"{path.name} line 1: required column(s) {missing} missing")
        n = len(header)
        int_idx = [i for i, h in enumerate(header) if h in spec.int_columns]
        date_idx = [i for i, h in enumerate(header) if h in spec.date_columns]
        req_idx = [i for i, h in enumerate(header) if h in spec.not_null]
        buf: list[bytes] = []
        size = 0
        rows = 0
        line_no = 1
        last_pos = 0
        raw_fh = getattr(fh, "fileobj", fh)
        for raw in fh:
            line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise VocabLoadError(f"{path.name} line {line_no}: not valid UTF-8 ({exc.reason})") from exc
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields_ = line.split("\t")
            if len(fields_) != n:
                raise VocabLoadError(f"{path.name} line {line_no}: {len(fields_)} fields, expected {n} "
                                     f"({', '.join(header)})")
            for i in req_idx:
                if not fields_[i]:
                    raise VocabLoadError(f"{path.name} line {line_no}: field {header[i]} is empty")
            for i in int_idx:
                v = fields_[i]
                if v and not _is_int(v):
                    raise VocabLoadError(f"{path.name} line {line_no}: field {header[i]}={v!r} is not an integer")
            for i in date_idx:
                v = fields_[i]
                if v and not (len(v) == 8 and v.isdigit()):
                    raise VocabLoadError(f"{path.name} line {line_no}: field {header[i]}={v!r} is not a "
                                         "YYYYMMDD date")
            if "\x01" in line:
                raise VocabLoadError(f"{path.name} line {line_no}: contains a control character \\x01")
            b = line.encode("utf-8") + b"\n"
            buf.append(b)
            size += len(b)
            rows += 1
            if size >= CHUNK_BYTES:
                yield header, b"".join(buf), rows
                buf, size, rows = [], 0, 0
                if on_bytes:
                    pos = raw_fh.tell()
                    on_bytes(pos - last_pos)
                    last_pos = pos
        if buf:
            yield header, b"".join(buf), rows
        if on_bytes:
            pos = raw_fh.tell()
            on_bytes(pos - last_pos)


def _hashed(chunks: Iterator[tuple[list[str], bytes, int]], update: Callable[[bytes], object]
            ) -> Iterator[tuple[list[str], bytes, int]]:
    for header, chunk, rows in chunks:
        update(chunk)
        yield header, chunk, rows


def release_identity(content_sha256: str, versions: dict[str, str]) -> vocab_store.ReleaseIdentity:
    """Athena names a release in VOCABULARY's row for vocabulary_id 'None' (e.g. 'v5.0 30-AUG-24'); without it the
    label is a hash: of the vocabularies' versions when the file is there, else of the content."""
    if versions.get("None"):
        label = versions["None"]
    elif versions:
        joined = ";".join(f"{k}={v}" for k, v in sorted(versions.items()))
        label = "versions:" + hashlib.sha256(joined.encode()).hexdigest()[:12]
    else:
        label = "sha256:" + content_sha256[:12]
    return vocab_store.ReleaseIdentity(label=label, content_sha256=content_sha256, versions=versions)


def load_vocabulary(conn: psycopg.Connection, directory: Path, *, progress: bool = True) -> LoadReport:
    """Load every Athena file found in `directory`, replacing the live vocabulary atomically."""
    import time

    from tqdm import tqdm

    directory = Path(directory)
    if not directory.is_dir():
        raise VocabLoadError(f"{directory}: not a directory")
    report = LoadReport(directory=str(directory))
    plan: list[tuple[TableSpec, Path | None]] = []
    for spec in SPECS:
        path = find_file(directory, spec.stem)
        if path is None:
            if spec.required:
                raise VocabLoadError(f"{directory}: {spec.stem}.csv (or .csv.gz) is required and was not found")
            report.missing.append(spec.stem)
        plan.append((spec, path))
    total = sum(p.stat().st_size for _, p in plan if p)
    t0 = time.perf_counter()
    content = hashlib.sha256()  # of the rows as loaded: the same release reads the same, plain or .gz
    with tqdm(total=total, unit="B", unit_scale=True, desc="vocab load", disable=not progress) as bar, \
            vocab_store.staged_replace(conn, [s.table for s in SPECS]) as stage:
        for spec, path in plan:
            if path is None:
                report.rows[spec.table] = 0
                continue
            bar.set_postfix_str(path.name)
            report.files[spec.table] = path.name
            count = 0
            content.update(f"\0{spec.table}\0".encode())
            chunks = _hashed(validated_chunks(path, spec, bar.update), content.update)
            first = next(chunks, None)  # None: a header-only file (e.g. the sample's CONCEPT_SYNONYM)
            if first is not None:
                try:
                    with stage.copy_in(spec.table, first[0]) as copy:
                        copy.write(first[1])
                        count = first[2]
                        for _, chunk, rows in chunks:
                            copy.write(chunk)
                            count += rows
                except psycopg.Error as exc:
                    raise VocabLoadError(f"{path.name}: {vocab_store.describe_copy_error(exc)}") from exc
            report.rows[spec.table] = count
        identity = release_identity(content.hexdigest(), stage.versions())
        swap = stage.finish(report.rows, str(directory.resolve()), identity)
    report.release_id, report.previous_release_id, report.kept = swap.release_id, swap.previous_id, swap.kept
    report.release_label = identity.label
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------------- release diff


class NoPreviousRelease(VocabLoadError):
    """There is nothing to compare with: only one release was ever loaded here."""


@dataclass
class ReleaseDiff:
    """What changed from the previous release to the current one (`harmonia vocab diff`)."""

    previous: str
    current: str
    concepts: list[release_store.ConceptChange]
    maps_to: list[release_store.EdgeChange]
    seconds: float = 0.0

    def concept_counts(self) -> dict[str, int]:
        out = dict.fromkeys(release_store.CONCEPT_CHANGES, 0)
        for c in self.concepts:
            out[c.change] += 1
        return out

    def maps_to_counts(self) -> dict[str, dict[str, int]]:
        """source vocabulary -> {'added': n, 'removed': n}"""
        out: dict[str, dict[str, int]] = {}
        for e in self.maps_to:
            out.setdefault(e.source_vocabulary, {"added": 0, "removed": 0})[e.change] += 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, object]:
        return {"previous": self.previous, "current": self.current,
                "concept_counts": self.concept_counts(), "maps_to_counts": self.maps_to_counts(),
                "concepts": [{**asdict(c), "successors": list(c.successors)} for c in self.concepts],
                "maps_to": [asdict(e) for e in self.maps_to]}

    def write_csv(self, path: Path) -> int:
        """One row per change: concept changes, then 'Maps to' edges (kind maps_to_added / maps_to_removed)."""
        cols = ["change", "concept_id", "vocabulary_id", "domain_id", "concept_name", "old_value", "new_value",
                "successors", "target_concept_id"]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for c in self.concepts:
                w.writerow([c.change, c.concept_id, c.vocabulary_id, c.domain_id, c.concept_name, c.old_value or "",
                            c.new_value or "", ";".join(map(str, c.successors)), ""])
            for e in self.maps_to:
                w.writerow([f"maps_to_{e.change}", e.source_concept_id, e.source_vocabulary, "", e.source_code,
                            "", "", "", e.target_concept_id])
        return len(self.concepts) + len(self.maps_to)


def diff_releases(conn: psycopg.Connection) -> ReleaseDiff:
    """The current release against the one it replaced."""
    import time

    t0 = time.perf_counter()
    cur = release_store.current(conn)
    if cur is None or cur.previous_id is None or not release_store.has_previous(conn):
        raise NoPreviousRelease("no previous release to compare with: the diff needs two loads "
                                "(`harmonia vocab load` of the next release keeps the one it replaces)")
    prev = release_store.get(conn, cur.previous_id)
    with conn.transaction():  # one snapshot for both halves
        concepts = release_store.concept_changes(conn, cur.id)
        edges = release_store.maps_to_changes(conn)
    return ReleaseDiff(previous=prev.label if prev else str(cur.previous_id), current=cur.label,
                       concepts=concepts, maps_to=edges, seconds=time.perf_counter() - t0)
