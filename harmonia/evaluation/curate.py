"""Curating benchmark sets: ground truth from the vocabulary's own 'Maps to' rows, or from an external Usagi CSV.

A row is one source (a source concept, or a source code of an external set) with every correct target: a
prediction is right when it hits any of them. Sets are split into a development and a test part with the shared
rule in harmonia.groundtruth, so nothing trained or tuned on the development part sees a test source; the set
files are read and written by harmonia.groundtruth (read_set, write_set).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmonia.domain import SourceTargets
from harmonia.groundtruth import (
    DEFAULT_TEST_SHARE,
    PARTS,
    GroundTruthError,
    group_edges,
    part_of,
    read_usagi_truth,
    same_name,
    usagi_set_name,
)
from harmonia.store import concepts as concept_store
from harmonia.store import release as release_store
from harmonia.store import vocab as vocab_store

if TYPE_CHECKING:
    import psycopg

    from harmonia.domain import MapsToEdge


@dataclass
class CuratedSet:
    name: str
    parts: dict[str, list[SourceTargets]]
    summary: dict[str, Any]


def split_balanced(rows: Sequence[SourceTargets], seed: int, per_vocab: int | None,
                   test_share: float = DEFAULT_TEST_SHARE) -> dict[str, list[SourceTargets]]:
    """Split by the shared rule, then sample at most `per_vocab` sources per source vocabulary in each part.

    Splitting first keeps a source's part independent of the sample size, so a bigger sample only adds rows.
    The sample order is shuffled with the seed (so `--max-rows` takes a random subset)."""
    parts: dict[str, dict[str, list[SourceTargets]]] = {p: defaultdict(list) for p in PARTS}
    for row in sorted(rows, key=lambda r: str(r.split_key)):
        parts[part_of(row.split_key, seed, test_share)][row.source_vocab].append(row)
    out: dict[str, list[SourceTargets]] = {}
    for p in PARTS:
        rng = random.Random(f"{seed}:{p}")
        chosen: list[SourceTargets] = []
        for vocab in sorted(parts[p]):
            group = list(parts[p][vocab])
            rng.shuffle(group)
            chosen.extend(group[:per_vocab] if per_vocab else group)
        rng.shuffle(chosen)
        out[p] = chosen
    return out


def summarize(name: str, seed: int, parts: dict[str, list[SourceTargets]], **extra: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"name": name, "seed": seed, **extra}
    for p, rows in parts.items():
        s[p] = {"rows": len(rows), "same_name": sum(r.same_name for r in rows),
                "multi_target": sum(len(r.targets) > 1 for r in rows),
                "per_vocab": dict(sorted(Counter(r.source_vocab for r in rows).items())),
                "per_domain": dict(sorted(Counter(r.source_domain for r in rows).items()))}
    return s


def curate_maps_to(edges: Sequence[MapsToEdge], target_names: dict[int, str], *, seed: int,
                   per_vocab: int | None, name: str = "maps_to") -> CuratedSet:
    rows = group_edges(edges, target_names)
    parts = split_balanced(rows, seed, per_vocab)
    return CuratedSet(name, parts, summarize(name, seed, parts, sources_available=len(rows),
                                             per_vocab_limit=per_vocab))


def curate_usagi(path: Path, valid_targets: dict[int, str], *, seed: int, per_vocab: int | None) -> CuratedSet:
    """An external set. Targets that are not valid standard concepts of the loaded vocabulary cannot be retrieved,
    so they are dropped (and rows left without any), and both counts are reported."""
    rows = read_usagi_truth(path)
    kept: list[SourceTargets] = []
    dropped_targets = dropped_rows = 0
    for r in rows:
        ok = sorted(t for t in r.targets if t in valid_targets)
        dropped_targets += len(r.targets) - len(ok)
        if not ok:
            dropped_rows += 1
            continue
        r.targets = ok
        r.target_names = [valid_targets[t] for t in ok]
        r.same_name = same_name(r.source_text, r.target_names)
        kept.append(r)
    name = usagi_set_name(Path(path))
    parts = split_balanced(kept, seed, per_vocab)
    return CuratedSet(name, parts, summarize(name, seed, parts, source_file=str(path), sources_read=len(rows),
                                             rows_dropped_no_valid_target=dropped_rows,
                                             targets_dropped_not_in_vocabulary=dropped_targets,
                                             per_vocab_limit=per_vocab))


# ------------------------------------------------------------------------------------ from the database


def curate_maps_to_from_db(conn: psycopg.Connection, *, seed: int, per_vocab: int | None,
                           vocabularies: Sequence[str] | None = None, name: str = "maps_to") -> CuratedSet:
    """The 'Maps to' set of the loaded vocabulary (optionally only some source vocabularies)."""
    edges = vocab_store.maps_to_edges(conn, list(vocabularies) if vocabularies else None)
    if not edges:
        only = f" of {', '.join(vocabularies)}" if vocabularies else ""
        raise GroundTruthError(f"no 'Maps to' rows from non-standard sources{only} in the loaded vocabulary")
    targets = concept_store.get_concepts(conn, {e.target_concept_id for e in edges})
    cs = curate_maps_to(edges, {i: c.concept_name for i, c in targets.items()}, seed=seed,
                        per_vocab=per_vocab, name=name)
    cs.summary["vocab_release"] = release_of(conn)
    return cs


def release_of(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The release a set was curated from (its summary keeps it: a set is ground truth of that release)."""
    cur = release_store.current(conn)
    return None if cur is None else {"id": cur.id, "label": cur.label, "content_sha256": cur.content_sha256}


def curate_usagi_from_db(conn: psycopg.Connection, path: Path, *, seed: int) -> CuratedSet:
    """An external Usagi set, its targets checked against the loaded vocabulary (kept whole: no sampling)."""
    if not Path(path).exists():
        raise GroundTruthError(f"{path}: no such file")
    found = concept_store.get_concepts(conn, {t for r in read_usagi_truth(path) for t in r.targets})
    valid = {i: c.concept_name for i, c in found.items() if c.is_valid_standard}
    cs = curate_usagi(path, valid, seed=seed, per_vocab=None)
    cs.summary["vocab_release"] = release_of(conn)
    return cs
