"""SQL for reviewers and their API tokens. Only the sha256 of a token is stored; the token is shown once."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypedDict

import psycopg

ROLES = ("reader", "reviewer", "admin")
WRITE_ROLES = ("reviewer", "admin")


class UserError(ValueError):
    pass


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "hmn_" + secrets.token_urlsafe(32)


class User(TypedDict):
    id: int
    name: str
    role: str
    created_at: datetime
    disabled_at: datetime | None


def _row(r: Sequence[Any]) -> User:
    return User(id=r[0], name=r[1], role=r[2], created_at=r[3], disabled_at=r[4])


_COLS = "id, name, role, created_at, disabled_at"


def add_user(conn: psycopg.Connection, name: str, role: str = "reviewer", *, rotate: bool = False,
             expires_at: datetime | None = None) -> tuple[User, str]:
    """Create a user (or, with rotate, give an existing one a new token: the old ones stop working). Returns the
    user and the token; `expires_at`: when the token stops working (None: never)."""
    name = name.strip()
    if not name:
        raise UserError("user name must not be empty")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if rotate:
        row = conn.execute(
            f"""UPDATE harmonia.users SET role = %s, disabled_at = NULL WHERE name = %s
                RETURNING {_COLS}""", (role, name)).fetchone()
        if row is not None:
            user = _row(row)
            conn.execute("UPDATE harmonia.api_token SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL",
                         (user["id"],))
            return user, issue_token(conn, user["id"], expires_at=expires_at)
    row = conn.execute(
        f"""INSERT INTO harmonia.users (name, role) VALUES (%s, %s)
            ON CONFLICT (name) DO NOTHING RETURNING {_COLS}""", (name, role)).fetchone()
    if row is None:
        raise UserError(f"user {name!r} already exists (use --rotate to issue a new token)")
    user = _row(row)
    return user, issue_token(conn, user["id"], expires_at=expires_at)


def issue_token(conn: psycopg.Connection, user_id: int, *, kind: str = "api", expires_at: datetime | None = None,
                ttl_s: float | None = None) -> str:
    """A new token for the user (shown once; only its hash is kept), expiring at `expires_at` or in `ttl_s`."""
    token = new_token()
    conn.execute(
        """INSERT INTO harmonia.api_token (user_id, token_hash, kind, expires_at)
           VALUES (%s, %s, %s, coalesce(%s, now() + make_interval(secs => %s)))""",
        (user_id, hash_token(token), kind, expires_at, ttl_s))
    return token


_BY_TOKEN = f"""SELECT {', '.join('u.' + c for c in _COLS.split(', '))} FROM harmonia.api_token t
    JOIN harmonia.users u ON u.id = t.user_id
    WHERE t.token_hash = %s AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())
      AND u.disabled_at IS NULL"""


def user_by_token(conn: psycopg.Connection, token: str) -> User | None:
    """The user of a token that is neither revoked nor expired, of a user not disabled."""
    row = conn.execute(_BY_TOKEN, (hash_token(token),)).fetchone()
    return _row(row) if row else None


async def user_by_token_async(conn: psycopg.AsyncConnection, token: str) -> User | None:
    """user_by_token on an async connection (the API checks each request's token on its event loop)."""
    cur = await conn.execute(_BY_TOKEN, (hash_token(token),))
    row = await cur.fetchone()
    return _row(row) if row else None


def revoke_token(conn: psycopg.Connection, token: str) -> bool:
    """Revoke one token (logging out): it stops working at once."""
    return conn.execute("UPDATE harmonia.api_token SET revoked_at = now() WHERE token_hash = %s "
                        "AND revoked_at IS NULL", (hash_token(token),)).rowcount > 0


def list_users(conn: psycopg.Connection) -> list[User]:
    return [_row(r) for r in conn.execute(f"SELECT {_COLS} FROM harmonia.users ORDER BY name").fetchall()]


def disable_user(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("UPDATE harmonia.users SET disabled_at = now() WHERE name = %s AND disabled_at IS NULL "
                       "RETURNING id", (name,)).fetchone()
    return row is not None


def get_user_later(conn: psycopg.Connection, user_id: int) -> Callable[[], User | None]:
    """Send the query now, read the user when called (one round trip with the others of a pipeline)."""
    cur = conn.execute(f"SELECT {_COLS} FROM harmonia.users WHERE id = %s", (user_id,))
    return lambda: _row(row) if (row := cur.fetchone()) else None


def get_user(conn: psycopg.Connection, user_id: int) -> User | None:
    return get_user_later(conn, user_id)()


def user_by_name(conn: psycopg.Connection, name: str) -> User | None:
    row = conn.execute(f"SELECT {_COLS} FROM harmonia.users WHERE name = %s", (name,)).fetchone()
    return _row(row) if row else None
