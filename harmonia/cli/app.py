"""The `harmonia` application: the command groups every command module registers on, and what commands share
(settings with the command-line overrides, a migrated connection, reading a source file, failing with a message)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from harmonia.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from collections.abc import Iterable

    import psycopg

    from harmonia.sources import SourceFile

app = typer.Typer(help="Harmonia: map clinical source codes to OMOP standard concepts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="The database: migrate, status, stop.", no_args_is_help=True)
vocab_app = typer.Typer(help="The OMOP vocabulary.", no_args_is_help=True)
embed_app = typer.Typer(help="Embed valid standard concepts (no subcommand), or train the embedder.",
                        invoke_without_command=True)
retrieve_app = typer.Typer(help="Retrieval tuning.", no_args_is_help=True)
memory_app = typer.Typer(help="The mapping memory: already-mapped sources as hybrid-retrieval candidates.",
                         no_args_is_help=True)
reranker_app = typer.Typer(help="The local classifier reranker.", no_args_is_help=True)
bench_app = typer.Typer(help="Acceptance benchmark: curate, run, calibrate.", no_args_is_help=True)
user_app = typer.Typer(help="Reviewers and their API tokens.", no_args_is_help=True)
config_app = typer.Typer(help="Show and set the configuration.", no_args_is_help=True)
calibrate_app = typer.Typer(help="Calibrate a source set from reviewers' verdicts: sample, fit, status.",
                            no_args_is_help=True)
kinds_app = typer.Typer(help="Source kinds: what each source set is (its expected domains and vocabularies).",
                        no_args_is_help=True)
for name, sub in (("db", db_app), ("vocab", vocab_app), ("embed", embed_app), ("retrieve", retrieve_app),
                  ("memory", memory_app), ("reranker", reranker_app), ("bench", bench_app), ("user", user_app),
                  ("config", config_app), ("calibrate", calibrate_app), ("kinds", kinds_app)):
    app.add_typer(sub, name=name)

_overrides: dict[str, object] = {}


@app.callback()
def _root(
    data_dir: str = typer.Option(None, "--data-dir", help="Overrides the data_dir setting."),
    database_url: str = typer.Option(None, "--database-url", help="Overrides the database_url setting."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _overrides.clear()  # one invocation's options never leak into the next (tests run many in one process)
    if data_dir:
        _overrides["data_dir"] = data_dir  # load_settings also looks for the config file there
    if database_url:
        _overrides["database_url"] = database_url


def settings(**extra: object) -> Settings:
    try:
        return load_settings({**_overrides, **{k: v for k, v in extra.items() if v is not None}})
    except ConfigError as exc:
        fail(str(exc))


def connect(s: Settings | None = None, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection to the configured database (embedded server started if needed), migrations applied."""
    from harmonia import db
    from harmonia.store import migrations

    conn = db.connect((s or settings()).database, autocommit=autocommit)
    migrations.migrate(conn)
    return conn


def read_sources(path: Path, source_vocab: str | None) -> SourceFile:
    """Read a Usagi-style source CSV for a command: a file-level error ends it, bad rows are reported and skipped."""
    from harmonia.sources import SourceFileError, read_source_csv

    try:
        src = read_source_csv(path, **({"default_vocab": source_vocab} if source_vocab else {}))
    except SourceFileError as exc:
        fail(str(exc))
    for p in src.problems:
        typer.secho(f"skipped {path.name} {p}", fg=typer.colors.YELLOW, err=True)
    return src


def declare_kinds(conn: psycopg.Connection, s: Settings, source_vocabs: Iterable[str], kind: str | None) -> None:
    """`--kind K` of map, enqueue and bench run: store K as the kind of these source sets (before anything is
    routed, so the workers and the API see it too); without it, print the kind each set has."""
    from harmonia.kinds import KindError, KindRegistry

    try:
        reg = KindRegistry.from_settings(s, conn)
        for vocab in sorted(set(source_vocabs)):
            if kind:
                if vocab in reg.configured and reg.configured[vocab].name != kind:
                    fail(f"--kind {kind}: the configuration's [sources.{vocab}] says kind "
                         f"{reg.configured[vocab].name!r}; change it there")
                with conn.transaction():
                    reg.declare(conn, vocab, kind, declared_by="cli")
            k = reg.kind_of(vocab)
            note = "" if k.calibratable else (" (undeclared: nothing is auto-approved until it is declared with "
                                             "--kind and calibrated, or calibrated from reviews)")
            typer.secho(f"{vocab}: kind {k.name} ({reg.origin_of(vocab)}){note}", err=True)
    except KindError as exc:
        fail(str(exc))


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
