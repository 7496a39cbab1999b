"""`harmonia vocab ...`: load a release (beside the current one, swapped in atomically), upgrade to a new release
(load, re-embed what changed, the mapping memory follows, re-check every map), diff two releases, re-check maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import connect, fail, settings, vocab_app
from harmonia.config import Settings

if TYPE_CHECKING:
    from harmonia.vocabulary import ReleaseDiff

console = Console()


def _lexical_index(conn: psycopg.Connection, s: Settings, *, always: bool = False) -> None:
    """The release's BM25 index, where the settings choose that generator (or `always`)."""
    if s.retrieval.lexical_generator != "bm25" and not always:
        return
    from harmonia.retrieval.bm25 import build_index

    r = build_index(conn, s)
    console.print(f"BM25 lexical index: {r.documents:,} names and synonyms in {r.seconds:.1f}s ({r.path})")


def _load(conn: psycopg.Connection, directory: Path, progress: bool, s: Settings) -> None:
    from harmonia.vocabulary import VocabLoadError, load_vocabulary

    try:
        report = load_vocabulary(conn, directory, progress=progress)
    except (VocabLoadError, RuntimeError, psycopg.Error) as exc:
        fail(f"{exc}\nnothing was changed: the previous vocabulary is intact (its release stays current)")
    rate = report.total_rows / report.seconds if report.seconds else 0
    console.print(f"loaded release [bold]{report.release_label}[/] (#{report.release_id}): {report.total_rows:,} "
                  f"rows in {report.seconds:.1f}s ({rate:,.0f} rows/s): "
                  + ", ".join(f"{t}={n:,}" for t, n in report.rows.items() if n))
    _lexical_index(conn, s)
    if report.missing:
        console.print(f"optional files not present: {', '.join(report.missing)}")
    if report.kept:
        console.print(f"[yellow]{report.kept:,} concept(s) the files lack are still referenced by maps: kept, "
                      "marked gone (invalid D); the re-check flags their maps[/]")


def _recheck(conn: psycopg.Connection, s: Settings | None) -> None:
    """Re-check; with settings, a fresh retrieve + rerank for findings without a successor."""
    from harmonia.pipeline.recheck import recheck

    if s is None:
        report = recheck(conn)
    else:
        from harmonia.cli.core import _pipeline

        with _pipeline(conn, s) as pipe:
            report = recheck(conn, pipeline=pipe)
    console.print(f"re-check against release {report.release_label}: {report.maps_affected:,} map(s) affected, "
                  f"{report.new_findings:,} new finding(s), {report.reviews_opened:,} review item(s) opened "
                  f"({report.seconds:.1f}s)")
    if report.by_reason:
        t = Table()
        t.add_column("reason")
        t.add_column("detail")
        t.add_column("maps", justify="right")
        for key, n in report.by_reason.items():
            reason, detail = key.split("/", 1)
            t.add_row(reason, detail, f"{n:,}")
        console.print(t)
    if report.proposed_by:
        console.print("successors of the new findings: "
                      + ", ".join(f"{k}={v:,}" for k, v in sorted(report.proposed_by.items())))
    if report.retrieved:
        console.print(f"{report.retrieved:,} finding(s) without a successor got a fresh retrieve + rerank")


@vocab_app.command("load")
def vocab_load(directory: Path = typer.Argument(..., help="Folder of an Athena download (plain or .gz)."),
               progress: bool = typer.Option(True, help="Show a progress bar."),
               recheck: bool = typer.Option(True, help="Re-check every map against the release afterwards.")
               ) -> None:
    """Load an Athena release beside the current one and swap it in atomically; then re-check every map."""
    s = settings()
    with connect(s) as conn:
        _load(conn, directory, progress, s)
        if recheck:
            _recheck(conn, None)
    console.print("next: `harmonia embed` re-embeds only new and renamed concepts (`harmonia vocab upgrade` does "
                  "it all, the mapping memory included)")


@vocab_app.command("upgrade")
def vocab_upgrade(directory: Path = typer.Argument(..., help="Folder of the new Athena release."),
                  progress: bool = typer.Option(True, help="Show progress bars."),
                  retrieve: bool = typer.Option(True, help="Fresh retrieve + rerank for findings without a "
                                                          "successor in the release.")) -> None:
    """Load a new release, re-embed only what changed, bring the mapping memory along, re-check every map, and
    print what changed."""
    from harmonia.embedding.ingest import embed_concepts
    from harmonia.embedding.model import Embedder
    from harmonia.pipeline.recheck import follow_memory

    s = settings()
    with connect(s) as conn:
        _load(conn, directory, progress, s)
        embedder = Embedder.from_settings(s)
        r = embed_concepts(conn, embedder, vocabularies=s.embedding.vocabularies,
                           batch_size=s.embedding.batch_size, progress=progress, retrieval=s.retrieval)
        console.print(f"embeddings: {r.written:,} concept(s) embedded ({r.new:,} new, {r.changed:,} renamed) in "
                      f"{r.seconds:.1f}s; {r.deleted:,} left the index; {r.total:,} in it")
        mf = follow_memory(conn)
        console.print(f"mapping memory: {mf.repointed:,} row(s) re-pointed, {mf.dropped:,} dropped "
                      "(no valid target left)")
        _recheck(conn, s if retrieve else None)
        _print_diff_summary(conn)


def _print_diff_summary(conn: psycopg.Connection) -> None:
    from harmonia.vocabulary import NoPreviousRelease, diff_releases

    try:
        d = diff_releases(conn)
    except NoPreviousRelease as exc:
        console.print(str(exc))
        return
    _print_diff(d, show=0)


def _print_diff(d: ReleaseDiff, show: int) -> None:
    t = Table(title=f"concepts: {d.previous} -> {d.current} ({d.seconds:.1f}s)")
    t.add_column("change")
    t.add_column("concepts", justify="right")
    for k, n in d.concept_counts().items():
        t.add_row(k.replace("_", " "), f"{n:,}")
    console.print(t)
    e = Table(title="'Maps to' edges by source vocabulary")
    for col in ("source vocabulary", "added", "removed"):
        e.add_column(col, justify="left" if col.startswith("source") else "right")
    for vocab, n_edges in d.maps_to_counts().items():
        e.add_row(vocab, f"{n_edges['added']:,}", f"{n_edges['removed']:,}")
    console.print(e)
    if show:
        x = Table(title=f"first {show} concept changes")
        for col in ("change", "concept_id", "vocabulary", "name", "old", "new", "successors"):
            x.add_column(col)
        for c in d.concepts[:show]:
            x.add_row(c.change, str(c.concept_id), c.vocabulary_id, c.concept_name, c.old_value or "",
                      c.new_value or "", ";".join(map(str, c.successors)))
        console.print(x)


@vocab_app.command("diff")
def vocab_diff(csv_path: Path = typer.Option(None, "--csv", help="Write every change as CSV here."),
               json_path: Path = typer.Option(None, "--json", help="Write counts and every change as JSON here."),
               show: int = typer.Option(20, help="Print the first N concept changes (0: counts only).")) -> None:
    """What changed from the previous release to the current one: concepts added, removed, deprecated, upgraded
    (with successors), made (non-)standard, renamed; 'Maps to' edges added and removed per source vocabulary."""
    from harmonia.vocabulary import NoPreviousRelease, diff_releases

    with connect() as conn:
        try:
            d = diff_releases(conn)
        except NoPreviousRelease as exc:
            fail(str(exc))
    _print_diff(d, show)
    if csv_path:
        n = d.write_csv(csv_path)
        console.print(f"wrote {n:,} change(s) to {csv_path}")
    if json_path:
        json_path.write_text(json.dumps(d.to_json(), indent=1, default=str), encoding="utf-8")
        console.print(f"wrote {json_path}")


@vocab_app.command("recheck")
def vocab_recheck(retrieve: bool = typer.Option(False, help="Fresh retrieve + rerank (the configured pipeline) "
                                                           "for findings without a successor in the release.")
                  ) -> None:
    """Re-check every map against the current release and print the maps affected per reason. Findings already
    recorded for this release are counted, not re-opened."""
    s = settings()
    with connect(s) as conn:
        try:
            _recheck(conn, s if retrieve else None)
        except ValueError as exc:
            fail(str(exc))


@vocab_app.command("index")
def vocab_index() -> None:
    """(Re)build the current release's BM25 lexical index in the data dir (`vocab load` does it when
    retrieval_lexical_generator is bm25; each machine that searches needs its own copy)."""
    s = settings()
    with connect(s) as conn:
        _lexical_index(conn, s, always=True)


@vocab_app.command("status")
def vocab_status() -> None:
    """The current release, the one it replaced, and row counts."""
    from harmonia.store import release as release_store
    from harmonia.store import vocab as vocab_store

    with connect() as conn:
        cur = release_store.current(conn)
        if cur:
            prev = release_store.get(conn, cur.previous_id) if cur.previous_id else None
            console.print(f"release: [bold]{cur.label}[/] (#{cur.id}, loaded {cur.loaded_at:%Y-%m-%d %H:%M} from "
                          f"{cur.source_dir}); previous: {prev.label if prev else '-'}; re-checked: "
                          f"{cur.rechecked_at or 'no (harmonia vocab recheck)'}")
        for k, v in vocab_store.counts(conn).items():
            console.print(f"{k:>22}: {v:,}")
