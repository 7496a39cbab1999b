"""`harmonia kinds list / set`: which kind each source set has, and the kinds there are."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import connect, declare_kinds, fail, kinds_app, settings

console = Console(width=200)


@kinds_app.command("list")
def list_kinds() -> None:
    """The kinds (expected domains, retrieval domains and vocabularies) and every source set's kind and origin."""
    from harmonia.kinds import BUILTIN_SOURCE_VOCABS, KindError, KindRegistry

    s = settings()
    with connect(s) as conn:
        try:
            reg = KindRegistry.from_settings(s, conn)
        except KindError as exc:
            fail(str(exc))
    t = Table("kind", "approvable domains", "retrieval domains", "target vocabularies", title="kinds")
    for k in reg.kinds.values():
        t.add_row(k.name, ", ".join(k.domains) or "any", ", ".join(k.retrieve_domains) or "all",
                  ", ".join(k.vocabularies) or "all configured")
    console.print(t)
    sets = Table("source vocabulary", "kind", "from", title="source sets")
    for vocab in sorted(set(BUILTIN_SOURCE_VOCABS) | set(reg.declared) | set(reg.configured)):
        sets.add_row(vocab, reg.kind_of(vocab).name, reg.origin_of(vocab))
    console.print(sets)
    console.print("Any other source vocabulary is of kind unknown: nothing of it is auto-approved until its kind is "
                  "declared and calibrated, or the set is calibrated from reviews.", markup=False)


@kinds_app.command("set")
def set_kind(source_vocab: str = typer.Argument(..., help="The source set (its source vocabulary)."),
             kind: str = typer.Argument(..., help="A kind `harmonia kinds list` shows.")) -> None:
    """Declare a source set's kind (stored in the database: `harmonia map`, the workers and the API use it)."""
    s = settings()
    with connect(s) as conn:
        declare_kinds(conn, s, [source_vocab], kind)
