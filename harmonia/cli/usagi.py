"""`harmonia import usagi FILE`: bring a Usagi save file into the maps and the review queue (the export side is
`harmonia export --format usagi`, in core.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from harmonia.cli.app import app, connect, fail

console = Console()
import_app = typer.Typer(help="Import mapping work from other tools.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("usagi")
def import_usagi(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A Usagi save file (CSV)."),
    source_vocab: str = typer.Option(None, "--source-vocab",
                                     help="The source set's name (default: the file name without .csv/.usagi)."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite codes that already have a map (with history); "
                                                          "default: skip them."),
) -> None:
    """Load every column of a Usagi file (statuses, equivalence, comments, mapping types, statusSetBy/On, several
    rows per code, ADD_INFO columns) into the maps; UNCHECKED, FLAGGED and INVALID_TARGET codes join the review
    queue. A bad file is refused whole, naming each bad line."""
    from harmonia.export import UsagiError
    from harmonia.export import import_usagi as run_import
    from harmonia.groundtruth import usagi_set_name

    vocab = source_vocab or usagi_set_name(path)
    with connect() as conn:
        try:
            s = run_import(conn, path, vocab, replace=replace)
        except UsagiError as exc:
            fail(str(exc))
        except UnicodeDecodeError as exc:
            fail(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(s.by_status.items()))
    console.print(f"{path.name} -> {vocab}: {s.rows:,} rows, {s.codes:,} codes; imported {s.imported:,} ({statuses}), "
                  f"{s.targets:,} targets; skipped (already mapped) {s.skipped_existing:,}; replaced {s.replaced:,}; "
                  f"invalid targets {s.invalid_target:,}; review items {s.review_items:,}", markup=False)
