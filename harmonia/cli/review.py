"""Review commands: `harmonia serve` and the reviewers (`harmonia user add/list/disable`)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from harmonia.cli.app import app, connect, fail, settings, user_app
from harmonia.store import users as user_store

console = Console()


@app.command("serve")
def serve(
    host: str = typer.Option(None, "--host", help="Overrides the serve_host setting."),
    port: int = typer.Option(None, "--port", help="Overrides the serve_port setting."),
) -> None:
    """Run the review service: the JSON API (docs at /docs) and the review page at /."""
    import uvicorn

    from harmonia.review.api import create_app

    s = settings(serve_host=host, serve_port=port)
    with connect(s) as conn:
        if not user_store.list_users(conn):
            console.print("[yellow]no users yet: create one with `harmonia user add NAME`[/yellow]")
    console.print(f"review page: http://{s.review.host}:{s.review.port}/   API docs: /docs")
    uvicorn.run(create_app(s), host=s.review.host, port=s.review.port, log_level="info")


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="The user's name (unique)."),
    role: str = typer.Option("reviewer", "--role", help="reviewer | reader | admin."),
    rotate: bool = typer.Option(False, "--rotate", help="If the user exists, issue a new token (the old one stops "
                                                        "working) and set the role."),
) -> None:
    """Create a user and print their API token; it is shown only this once (only its hash is stored)."""
    s = settings()
    with connect(s) as conn:
        try:
            user, token = user_store.add_user(conn, name, role, rotate=rotate)
        except user_store.UserError as exc:
            fail(str(exc))
    typer.echo(f"user {user['name']} (role {user['role']}); API token, shown once:", err=True)
    print(token)


@user_app.command("list")
def user_list() -> None:
    """Users and their roles (tokens are never shown: only their hashes are stored)."""
    s = settings()
    with connect(s) as conn:
        users = user_store.list_users(conn)
    table = Table("id", "name", "role", "created", "disabled")
    for u in users:
        table.add_row(str(u["id"]), u["name"], u["role"], f"{u['created_at']:%Y-%m-%d %H:%M}",
                      f"{u['disabled_at']:%Y-%m-%d %H:%M}" if u["disabled_at"] else "")
    console.print(table)


@user_app.command("disable")
def user_disable(name: str = typer.Argument(..., help="The user's name.")) -> None:
    """Disable a user: their token stops working at once."""
    s = settings()
    with connect(s) as conn:
        if not user_store.disable_user(conn, name):
            fail(f"no active user {name!r}")
    console.print(f"disabled {name}")
