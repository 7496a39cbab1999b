"""Build a "next release" of an Athena vocabulary from the bundled sample, for tests and for the release benchmark.

What changes, picked with a seeded generator among the targets of the sample's ICD10 'Maps to' (the concepts maps
point at) so that each case reaches maps:
- upgraded: a target becomes invalid 'U' with a new successor concept ('Concept replaced by' / 'Concept replaces');
  its incoming 'Maps to' move to the successor, as Athena does;
- deprecated: a target becomes invalid 'D' with no successor; its incoming 'Maps to' are invalidated;
- non_standard: a target stays valid but is no longer standard and 'Maps to' another standard concept;
- renamed: a target (and as many concepts nothing maps to) gets a new name; it stays right;
- maps_to_changed: an ICD10 source's 'Maps to' moves from its target to another standard concept of the domain;
- added: new standard concepts.
A manifest.json beside the files lists every case (old and new ids, successors), which the tests check the
re-check against.

`--scale K` writes K shifted copies (ids + k * 50,000,000, codes suffixed) of the sample's concepts below that id,
so the release benchmark gets 1M+ concepts from 20 copies; `--base-out` then writes the unchanged scaled release to
load first. Every case is applied to every copy.

    python scripts/make_next_release.py --out /tmp/next             # next release of the sample
    python scripts/make_next_release.py --scale 20 --base-out /tmp/big0 --out /tmp/big1
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from harmonia.paths import sample_dir

SHIFT = 50_000_000          # copies of concepts below this id are shifted by k * SHIFT
RELEASE_DATE = "20261201"
END_DATE = "20261130"
CONCEPT_COLS = ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
                "concept_code", "valid_start_date", "valid_end_date", "invalid_reason"]
REL_COLS = ["concept_id_1", "concept_id_2", "relationship_id", "valid_start_date", "valid_end_date", "invalid_reason"]
NEXT_VERSION = "Harmonia sample next release 2026-12"


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        return header, [line.rstrip("\n").split("\t") for line in fh if line.strip()]


def plan(concepts: list[list[str]], rels: list[list[str]], seed: int, counts: dict[str, int]) -> dict:
    """Pick the cases on the sample (copy 0); ids are the sample's."""
    rng = random.Random(seed)
    by_id = {int(r[0]): r for r in concepts}

    def valid_standard(cid: int) -> bool:
        r = by_id.get(cid)
        return r is not None and r[5] == "S" and r[9] == ""

    maps_to: dict[int, set[int]] = defaultdict(set)
    for r in rels:
        if r[2] == "Maps to" and r[5] == "":
            s, t = int(r[0]), int(r[1])
            if s != t and s in by_id and by_id[s][3] == "ICD10" and by_id[s][5] != "S" and valid_standard(t):
                maps_to[s].add(t)
    targets = sorted({t for ts in maps_to.values() for t in ts if t < SHIFT})
    rng.shuffle(targets)
    take = iter(targets)

    def pick(n: int) -> list[int]:
        return sorted(next(take) for _ in range(n))

    upgraded, deprecated = pick(counts["upgrade"]), pick(counts["deprecate"])
    non_standard, renamed_mapped = pick(counts["non_standard"]), pick(counts["rename"])
    touched = set(upgraded) | set(deprecated) | set(non_standard)
    mapped = set(targets)
    unmapped_standard = sorted(c for c in by_id if c < SHIFT and valid_standard(c) and c not in mapped)
    renamed_other = sorted(rng.sample(unmapped_standard, counts["rename"]))
    by_domain: dict[str, list[int]] = defaultdict(list)
    for c in sorted(by_id):
        if c < SHIFT and valid_standard(c) and c not in touched and by_id[c][3] == "SNOMED":
            by_domain[by_id[c][2]].append(c)
    next_id = max(c for c in by_id if c < SHIFT) + 1
    assert next_id + 10 * sum(counts.values()) < SHIFT, "no room for new concept ids below the shift"
    successors = {}
    for old in upgraded:
        successors[old] = next_id
        next_id += 1
    ns_maps_to = {c: rng.choice([x for x in by_domain[by_id[c][2]] if x != c]) for c in non_standard}
    # Sources whose targets are all untouched: their 'Maps to' moves from one target to another concept.
    renamed_set = set(renamed_mapped)
    clean = sorted(s for s, ts in maps_to.items() if s < SHIFT and not ts & (touched | renamed_set) and len(ts) == 1)
    changed_sources = sorted(rng.sample(clean, counts["maps_to"]))
    maps_to_changed = {}
    for s in changed_sources:
        (old,) = maps_to[s]
        new = rng.choice([x for x in by_domain[by_id[old][2]] if x not in maps_to[s]])
        maps_to_changed[s] = {"old": old, "new": new, "source_code": by_id[s][6]}
    added = list(range(next_id, next_id + counts["add"]))
    names = [by_id[c][1] for c in unmapped_standard]
    added_names = {cid: f"{rng.choice(names)} with {rng.choice(names).lower()}" for cid in added}
    # Which ICD10 sources reach each touched target (their maps are the ones the re-check must flag).
    sources_of: dict[int, list[int]] = defaultdict(list)
    for s, ts in sorted(maps_to.items()):
        for t in ts:
            sources_of[t].append(s)
    return {
        "upgraded": {str(o): successors[o] for o in upgraded},
        "deprecated": deprecated,
        "non_standard": {str(c): m for c, m in ns_maps_to.items()},
        "renamed": renamed_mapped + renamed_other,
        "renamed_mapped": renamed_mapped,
        "maps_to_changed": {str(s): v for s, v in maps_to_changed.items()},
        "added": added,
        "added_names": {str(k): v for k, v in added_names.items()},
        "sources_of": {str(t): sources_of[t] for t in [*upgraded, *deprecated, *non_standard, *renamed_mapped]},
    }


def shift(cid: int, k: int) -> int:
    return cid + k * SHIFT if cid < SHIFT else cid


def copies(k_max: int, cid: int) -> range:
    return range(k_max) if cid < SHIFT else range(1)


def concept_rows(concepts: list[list[str]], p: dict | None, k_max: int) -> Iterator[list[str]]:
    up = {int(k): v for k, v in p["upgraded"].items()} if p else {}
    dep = set(p["deprecated"]) if p else set()
    ns = {int(k) for k in p["non_standard"]} if p else set()
    ren = set(p["renamed"]) if p else set()
    by_id = {int(r[0]): r for r in concepts}
    for k in range(k_max):
        for r in concepts:
            cid = int(r[0])
            if k and cid >= SHIFT:
                continue
            row = list(r)
            row[0] = str(shift(cid, k))
            if k:
                row[6] = f"{r[6]}~{k}"
            if cid in up or cid in dep:
                row[5], row[8], row[9] = "", END_DATE, "U" if cid in up else "D"
            elif cid in ns:
                row[5] = ""
            if cid in ren:
                row[1] = f"{r[1]} (revised)"
            yield row
        if p is None:
            continue
        for old, new in up.items():
            o = by_id[old]
            yield [str(shift(new, k)), f"{o[1]} (successor)", o[2], o[3], o[4], "S",
                   f"N{new}" + (f"~{k}" if k else ""), RELEASE_DATE, "20991231", ""]
        for cid_s, name in p["added_names"].items():
            cid = int(cid_s)
            yield [str(shift(cid, k)), name, "Condition", "SNOMED", "Clinical Finding", "S",
                   f"N{cid}" + (f"~{k}" if k else ""), RELEASE_DATE, "20991231", ""]


def rel_rows(rels: list[list[str]], p: dict | None, k_max: int) -> Iterator[list[str]]:
    up = {int(k): v for k, v in p["upgraded"].items()} if p else {}
    dep = set(p["deprecated"]) if p else set()
    ns = {int(k): v for k, v in p["non_standard"].items()} if p else {}
    moved = {int(s): v for s, v in p["maps_to_changed"].items()} if p else {}
    for k in range(k_max):
        sh = (lambda c, k=k: str(shift(c, k)))  # noqa: E731 - a one-line id shifter for this copy
        for r in rels:
            a, b = int(r[0]), int(r[1])
            if k and (a >= SHIFT or b >= SHIFT):
                continue
            row = [sh(a), sh(b), *r[2:]]
            if r[2] == "Maps to" and r[5] == "":
                retire = (b in up or b in dep or (a in ns and a == b)
                          or (a in moved and b == moved[a]["old"]))
                if retire:
                    row[4], row[5] = END_DATE, "D"
                    yield row
                    if b in up and a != b:
                        yield [sh(a), sh(up[b]), "Maps to", RELEASE_DATE, "20991231", ""]
                    if a in moved and b == moved[a]["old"]:
                        yield [sh(a), sh(moved[a]["new"]), "Maps to", RELEASE_DATE, "20991231", ""]
                    continue
            yield row
        for old, new in up.items():
            yield [sh(old), sh(new), "Concept replaced by", RELEASE_DATE, "20991231", ""]
            yield [sh(new), sh(old), "Concept replaces", RELEASE_DATE, "20991231", ""]
            yield [sh(new), sh(new), "Maps to", RELEASE_DATE, "20991231", ""]
        for c, m in ns.items():
            yield [sh(c), sh(m), "Maps to", RELEASE_DATE, "20991231", ""]
        for cid in p["added"] if p else []:
            yield [sh(cid), sh(cid), "Maps to", RELEASE_DATE, "20991231", ""]


def write(path: Path, header: list[str], rows: Iterator[list[str]]) -> int:
    n = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        out: TextIO = fh
        out.write("\t".join(header) + "\n")
        for r in rows:
            out.write("\t".join(r) + "\n")
            n += 1
    return n


def write_release(out: Path, concepts: list[list[str]], rels: list[list[str]], p: dict | None, k_max: int,
                  version: str) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {"concept": write(out / "CONCEPT.csv.gz", CONCEPT_COLS, concept_rows(concepts, p, k_max)),
              "concept_relationship": write(out / "CONCEPT_RELATIONSHIP.csv.gz", REL_COLS, rel_rows(rels, p, k_max))}
    (out / "VOCABULARY.csv").write_text(
        "vocabulary_id\tvocabulary_name\tvocabulary_reference\tvocabulary_version\tvocabulary_concept_id\n"
        f"None\tOMOP Standardized Vocabularies\tHarmonia\t{version}\t44819096\n", encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=sample_dir() / "vocab", help="The release to start from.")
    ap.add_argument("--out", type=Path, required=True, help="Folder for the next release (created).")
    ap.add_argument("--base-out", type=Path, help="Also write the unchanged (scaled) release here.")
    ap.add_argument("--scale", type=int, default=1, help="Copies of the sample (20: 1M+ concepts).")
    ap.add_argument("--seed", type=int, default=16)
    for name, default in (("upgrade", 30), ("deprecate", 20), ("non-standard", 20), ("rename", 20),
                          ("maps-to", 30), ("add", 50)):
        ap.add_argument(f"--{name}", type=int, default=default, help=f"How many cases (per copy; {default}).")
    a = ap.parse_args(argv)
    if a.scale > 1 and not a.base_out:
        ap.error("--scale needs --base-out (the scaled release to load first)")
    _, concepts = read_rows(a.sample / "CONCEPT.csv.gz")
    _, rels = read_rows(a.sample / "CONCEPT_RELATIONSHIP.csv.gz")
    p = plan(concepts, rels, a.seed, {"upgrade": a.upgrade, "deprecate": a.deprecate,
                                      "non_standard": a.non_standard, "rename": a.rename, "maps_to": a.maps_to,
                                      "add": a.add})
    if a.base_out:
        base = write_release(a.base_out, concepts, rels, None, a.scale, "Harmonia sample (scaled) 2026-06")
        print(f"base release {a.base_out}: {base}")
    nxt = write_release(a.out, concepts, rels, p, a.scale, NEXT_VERSION)
    (a.out / "CONCEPT_SYNONYM.csv.gz").write_bytes((a.sample / "CONCEPT_SYNONYM.csv.gz").read_bytes())
    p["scale"], p["shift"], p["version"] = a.scale, SHIFT, NEXT_VERSION
    (a.out / "manifest.json").write_text(json.dumps(p, indent=1), encoding="utf-8")
    summary = {k: len(v) for k, v in p.items() if isinstance(v, (list, dict)) and k not in ("sources_of",
                                                                                          "added_names")}
    print(f"next release {a.out}: {nxt}; cases per copy: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
