"""Review commands: `harmonia serve` and the reviewers (`harmonia user add/list/disable`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

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
    rotate: bool = typer.Option(False, "--rotate", help="If the user exists, issue a new token (the old ones stop "
                                                        "working) and set the role."),
    expires: str = typer.Option(None, "--expires", help="When the token stops working: a duration (90m, 12h, 30d) "
                                                        "or a date/time (2027-01-31, 2027-01-31T18:00+01:00); "
                                                        "default never."),
) -> None:
    """Create a user and print their API token; it is shown only this once (only its hash is stored)."""
    s = settings()
    expires_at = None
    if expires:
        try:
            expires_at = parse_expiry(expires)
        except ValueError as exc:
            fail(f"--expires {expires!r}: {exc}")
    with connect(s) as conn:
        try:
            user, token = user_store.add_user(conn, name, role, rotate=rotate, expires_at=expires_at)
        except user_store.UserError as exc:
            fail(str(exc))
    until = f", expires {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else ""
    typer.echo(f"user {user['name']} (role {user['role']}{until}); API token, shown once:", err=True)
    print(token)


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """A duration from now (90m, 12h, 30d) or an ISO date/time (a date: its midnight UTC) in the future."""
    now = now or datetime.now(UTC)
    m = re.fullmatch(r"\s*(\d+)\s*([mhd])\s*", text)
    if m:
        n = int(m.group(1))
        if n <= 0:
            raise ValueError("the duration must be positive")
        at = now + timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[m.group(2)]: n})
    else:
        try:
            at = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError("give a duration (90m, 12h, 30d) or an ISO date/time") from None
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    if at <= now:
        raise ValueError("that is not in the future")
    return at


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
