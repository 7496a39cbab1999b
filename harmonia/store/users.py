"""SQL for reviewers and their API tokens. Only the sha256 of a token is stored; the token is shown once."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
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


def add_user(conn: psycopg.Connection, name: str, role: str = "reviewer", *, rotate: bool = False
             ) -> tuple[User, str]:
    """Create a user (or, with rotate, give an existing one a new token). Returns the user and the token."""
    name = name.strip()
    if not name:
        raise UserError("user name must not be empty")
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    token = new_token()
    if rotate:
        row = conn.execute(
            f"""UPDATE harmonia.users SET token_hash = %s, role = %s, disabled_at = NULL WHERE name = %s
                RETURNING {_COLS}""", (hash_token(token), role, name)).fetchone()
        if row is not None:
            return _row(row), token
    row = conn.execute(
        f"""INSERT INTO harmonia.users (name, role, token_hash) VALUES (%s, %s, %s)
            ON CONFLICT (name) DO NOTHING RETURNING {_COLS}""", (name, role, hash_token(token))).fetchone()
    if row is None:
        raise UserError(f"user {name!r} already exists (use --rotate to issue a new token)")
    return _row(row), token


def user_by_token(conn: psycopg.Connection, token: str) -> User | None:
    row = conn.execute(f"SELECT {_COLS} FROM harmonia.users WHERE token_hash = %s AND disabled_at IS NULL",
                       (hash_token(token),)).fetchone()
    return _row(row) if row else None


def list_users(conn: psycopg.Connection) -> list[User]:
    return [_row(r) for r in conn.execute(f"SELECT {_COLS} FROM harmonia.users ORDER BY name").fetchall()]


def disable_user(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("UPDATE harmonia.users SET disabled_at = now() WHERE name = %s AND disabled_at IS NULL "
                       "RETURNING id", (name,)).fetchone()
    return row is not None


def get_user(conn: psycopg.Connection, user_id: int) -> User | None:
    row = conn.execute(f"SELECT {_COLS} FROM harmonia.users WHERE id = %s", (user_id,)).fetchone()
    return _row(row) if row else None


def user_by_name(conn: psycopg.Connection, name: str) -> User | None:
    row = conn.execute(f"SELECT {_COLS} FROM harmonia.users WHERE name = %s", (name,)).fetchone()
    return _row(row) if row else None
