"""Helpers every store module shares."""

from __future__ import annotations

from typing import Any

import psycopg


def one(cur: psycopg.Cursor[Any]) -> Any:
    """The row of a query that always returns exactly one (count(*), an aggregate, an upsert's RETURNING)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def scalar(cur: psycopg.Cursor[Any]) -> Any:
    """The first column of `one`."""
    return one(cur)[0]
