"""Curating benchmark sets: ground truth from the vocabulary's own 'Maps to' rows, or from an external Usagi CSV.

A row is one source (a source concept, or a source code of an external set) with every correct target: a
prediction is right when it hits any of them. Sets are split into a development and a test part with the shared
rule in harmonia.benchmark.split, so nothing trained or tuned on the development part sees a test source.
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmonia.groundtruth import DEFAULT_TEST_SHARE, part_of

if TYPE_CHECKING:
    import psycopg

CSV_COLUMNS = ["source_concept_id", "source_code", "source_vocab", "source_text", "source_domain",
               "target_concept_ids", "target_names", "same_name"]
PARTS = ("dev", "test")


class BenchSetError(ValueError):
    """A benchmark or ground-truth file cannot be used; the message names the file, line and field."""


@dataclass
class BenchRow:
    source_concept_id: int | None  # None for external sets (their key is "vocab:code")
    source_code: str
    source_vocab: str
    source_text: str
    source_domain: str
    targets: list[int]
    target_names: list[str] = field(default_factory=list)
    same_name: bool = False

    @property
    def split_key(self) -> int | str:
        if self.source_concept_id is not None:
            return self.source_concept_id
        return f"{self.source_vocab}:{self.source_code}"

    def to_csv(self) -> dict[str, str]:
        return {"source_concept_id": "" if self.source_concept_id is None else str(self.source_concept_id),
                "source_code": self.source_code, "source_vocab": self.source_vocab,
                "source_text": self.source_text, "source_domain": self.source_domain,
                "target_concept_ids": ";".join(str(t) for t in self.targets),
                "target_names": ";".join(self.target_names), "same_name": "1" if self.same_name else "0"}


@dataclass
class CuratedSet:
    name: str
    parts: dict[str, list[BenchRow]]
    summary: dict[str, Any]


def _norm(name: str) -> str:
    return " ".join(name.casefold().split())


def _same_name(source: str, target_names: Iterable[str]) -> bool:
    s = _norm(source)
    return any(_norm(t) == s for t in target_names)


def group_pairs(pairs: Iterable[Sequence], target_names: dict[int, str] | None = None) -> list[BenchRow]:
    """maps_to_pairs rows (source id, code, vocab, name, domain, target id) -> one row per source concept."""
    by_src: dict[int, BenchRow] = {}
    for sid, code, vocab, name, domain, target in pairs:
        row = by_src.get(sid)
        if row is None:
            row = by_src[sid] = BenchRow(int(sid), str(code), str(vocab), str(name), str(domain or ""), [])
        if int(target) not in row.targets:
            row.targets.append(int(target))
    names = target_names or {}
    for row in by_src.values():
        row.targets.sort()
        row.target_names = [names.get(t, "") for t in row.targets]
        row.same_name = _same_name(row.source_text, row.target_names)
    return [by_src[k] for k in sorted(by_src)]


def split_balanced(rows: Sequence[BenchRow], seed: int, per_vocab: int | None,
                   test_share: float = DEFAULT_TEST_SHARE) -> dict[str, list[BenchRow]]:
    """Split by the shared rule, then sample at most `per_vocab` sources per source vocabulary in each part.

    Splitting first keeps a source's part independent of the sample size, so a bigger sample only adds rows.
    The sample order is shuffled with the seed (so `--max-rows` takes a random subset)."""
    parts: dict[str, dict[str, list[BenchRow]]] = {p: defaultdict(list) for p in PARTS}
    for row in sorted(rows, key=lambda r: str(r.split_key)):
        parts[part_of(row.split_key, seed, test_share)][row.source_vocab].append(row)
    out: dict[str, list[BenchRow]] = {}
    for p in PARTS:
        rng = random.Random(f"{seed}:{p}")
        chosen: list[BenchRow] = []
        for vocab in sorted(parts[p]):
            group = list(parts[p][vocab])
            rng.shuffle(group)
            chosen.extend(group[:per_vocab] if per_vocab else group)
        rng.shuffle(chosen)
        out[p] = chosen
    return out


def summarize(name: str, seed: int, parts: dict[str, list[BenchRow]], **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"name": name, "seed": seed, **extra}
    for p, rows in parts.items():
        s[p] = {"rows": len(rows), "same_name": sum(r.same_name for r in rows),
                "multi_target": sum(len(r.targets) > 1 for r in rows),
                "per_vocab": dict(sorted(Counter(r.source_vocab for r in rows).items())),
                "per_domain": dict(sorted(Counter(r.source_domain for r in rows).items()))}
    return s


def curate_maps_to(pairs: Iterable[Sequence], target_names: dict[int, str], *, seed: int,
                   per_vocab: int | None, name: str = "maps_to") -> CuratedSet:
    rows = group_pairs(pairs, target_names)
    parts = split_balanced(rows, seed, per_vocab)
    return CuratedSet(name, parts, summarize(name, seed, parts, sources_available=len(rows),
                                             per_vocab_limit=per_vocab))


# ---------------------------------------------------------------------------------------------- Usagi input


def _open_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BenchSetError(f"{path}: not UTF-8 ({exc})") from exc


def _col(header: Sequence[str], *names: str) -> str | None:
    lower = {h.lower(): h for h in header}
    return next((lower[n.lower()] for n in names if n.lower() in lower), None)


def usagi_set_name(path: Path) -> str:
    n = path.name
    for suffix in (".gz", ".csv", ".tsv", ".usagi"):
        n = n.removesuffix(suffix)
    return n


def read_usagi_truth(path: Path, default_vocab: str | None = None) -> list[BenchRow]:
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
    missing = [n for n, c in (("sourceCode", code_c), ("sourceName", name_c), ("conceptId", cid_c)) if c is None]
    if missing:
        raise BenchSetError(f"{path}: no {', '.join(missing)} column (header: {header})")
    status_c = _col(header, "mappingStatus")
    vocab_c = _col(header, "sourceVocabularyId", "source_vocab", "sourceVocabulary")
    domain_c = _col(header, "domainId", "domain_id")
    vocab_default = default_vocab or usagi_set_name(path)
    by_key: dict[tuple[str, str], BenchRow] = {}
    for row in reader:
        line = reader.line_num
        if None in row:
            raise BenchSetError(f"{path}: line {line}: more fields than the header")
        if status_c and (row.get(status_c) or "").strip().upper() not in ("APPROVED", ""):
            continue
        code, name = (row.get(code_c) or "").strip(), (row.get(name_c) or "").strip()
        cid_raw = (row.get(cid_c) or "").strip()
        if not code:
            raise BenchSetError(f"{path}: line {line}: empty {code_c}")
        try:
            cid = int(cid_raw)
        except ValueError as exc:
            raise BenchSetError(f"{path}: line {line}: {cid_c}={cid_raw!r} is not a concept id") from exc
        if cid == 0:
            continue
        vocab = ((row.get(vocab_c) or "").strip() if vocab_c else "") or vocab_default
        key = (vocab, code)
        r = by_key.get(key)
        if r is None:
            if not name:
                raise BenchSetError(f"{path}: line {line}: empty {name_c}")
            r = by_key[key] = BenchRow(None, code, vocab, name, (row.get(domain_c) or "").strip() if domain_c
                                       else "", [])
        if cid not in r.targets:
            r.targets.append(cid)
    if not by_key:
        raise BenchSetError(f"{path}: no approved rows")
    return list(by_key.values())


def curate_usagi(path: Path, valid_targets: dict[int, str], *, seed: int, per_vocab: int | None) -> CuratedSet:
    """An external set. Targets that are not valid standard concepts of the loaded vocabulary cannot be retrieved,
    so they are dropped (and rows left without any), and both counts are reported."""
    rows = read_usagi_truth(path)
    kept: list[BenchRow] = []
    dropped_targets = dropped_rows = 0
    for r in rows:
        ok = sorted(t for t in r.targets if t in valid_targets)
        dropped_targets += len(r.targets) - len(ok)
        if not ok:
            dropped_rows += 1
            continue
        r.targets = ok
        r.target_names = [valid_targets[t] for t in ok]
        r.same_name = _same_name(r.source_text, r.target_names)
        kept.append(r)
    name = usagi_set_name(Path(path))
    parts = split_balanced(kept, seed, per_vocab)
    return CuratedSet(name, parts, summarize(name, seed, parts, source_file=str(path), sources_read=len(rows),
                                             rows_dropped_no_valid_target=dropped_rows,
                                             targets_dropped_not_in_vocabulary=dropped_targets,
                                             per_vocab_limit=per_vocab))


# ----------------------------------------------------------------------------------------------- set files


def write_set(rows: Sequence[BenchRow], path: Path) -> Path:
    """Write atomically: a set file is either the old one or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r.to_csv())
    tmp.replace(path)
    return path


def read_set(path: Path) -> list[BenchRow]:
    """A set written by `write_set` (or by hand with the same columns; target_names and same_name optional)."""
    path = Path(path)
    if not path.exists():
        raise BenchSetError(f"{path}: no such file")
    reader = csv.DictReader(io.StringIO(_open_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("source_code", "source_vocab", "source_text", "target_concept_ids") if c not in header]
    if missing:
        raise BenchSetError(f"{path}: missing column(s) {', '.join(missing)} (header: {header})")
    rows: list[BenchRow] = []
    for rec in reader:
        line = reader.line_num
        if None in rec:
            raise BenchSetError(f"{path}: line {line}: more fields than the header")
        try:
            targets = [int(t) for t in (rec.get("target_concept_ids") or "").split(";") if t.strip()]
        except ValueError as exc:
            raise BenchSetError(f"{path}: line {line}: target_concept_ids={rec['target_concept_ids']!r} is not "
                                "a ';'-separated list of concept ids") from exc
        if not targets:
            raise BenchSetError(f"{path}: line {line}: empty target_concept_ids")
        text = (rec.get("source_text") or "").strip()
        if not text:
            raise BenchSetError(f"{path}: line {line}: empty source_text")
        sid_raw = (rec.get("source_concept_id") or "").strip()
        try:
            sid = int(sid_raw) if sid_raw else None
        except ValueError as exc:
            raise BenchSetError(f"{path}: line {line}: source_concept_id={sid_raw!r} is not an integer") from exc
        names = [n for n in (rec.get("target_names") or "").split(";")] if rec.get("target_names") else []
        rows.append(BenchRow(sid, (rec.get("source_code") or "").strip(), (rec.get("source_vocab") or "").strip(),
                             text, (rec.get("source_domain") or "").strip(), targets, names,
                             (rec.get("same_name") or "0").strip() in ("1", "true", "True")))
    return rows


# ------------------------------------------------------------------------------------ from the database


def curate_maps_to_from_db(conn: psycopg.Connection, *, seed: int, per_vocab: int | None,
                           vocabularies: Sequence[str] | None = None, name: str = "maps_to") -> CuratedSet:
    """The 'Maps to' set of the loaded vocabulary (optionally only some source vocabularies)."""
    from harmonia.store import vocab as vocab_store

    pairs = vocab_store.maps_to_pairs(conn, list(vocabularies) if vocabularies else None)
    if not pairs:
        only = f" of {', '.join(vocabularies)}" if vocabularies else ""
        raise BenchSetError(f"no 'Maps to' rows from non-standard sources{only} in the loaded vocabulary")
    targets = vocab_store.get_concepts(conn, sorted({p[5] for p in pairs}))
    return curate_maps_to(pairs, {i: c["concept_name"] for i, c in targets.items()}, seed=seed,
                          per_vocab=per_vocab, name=name)


def curate_usagi_from_db(conn: psycopg.Connection, path: Path, *, seed: int) -> CuratedSet:
    """An external Usagi set, its targets checked against the loaded vocabulary (kept whole: no sampling)."""
    from harmonia.store import vocab as vocab_store

    if not Path(path).exists():
        raise BenchSetError(f"{path}: no such file")
    ids = sorted({t for r in read_usagi_truth(path) for t in r.targets})
    found = vocab_store.get_concepts(conn, ids)
    valid = {i: c["concept_name"] for i, c in found.items()
             if c["standard_concept"] == "S" and c["invalid_reason"] is None}
    return curate_usagi(path, valid, seed=seed, per_vocab=None)
