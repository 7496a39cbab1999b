"""Hardening of the review service against the real embedded PostgreSQL: body size limit before authentication,
non-ASCII digits in concept search, security headers, LIKE wildcards taken literally, API docs without a CDN,
logout revokes the token, tokens expire."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from test_review_api import auth, concepts_like, seed_item
from typer.testing import CliRunner

from harmonia.cli import app as cli_app
from harmonia.cli.review import parse_expiry
from harmonia.review.api import create_app
from harmonia.store import users as user_store


@pytest.fixture
def client(fresh_db: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(fresh_db, tmp_path, review_max_body_bytes=4096))) as c:
        yield c


def test_body_limit_comes_before_authentication(client: TestClient) -> None:
    big = b"x" * 5000
    r = client.post("/api/source-queue", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    # Without a Content-Length (chunked), the limit holds while reading.
    r = client.post("/api/source-queue", content=iter([b"x" * 3000, b"x" * 3000]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    # Under the limit, no token: the 401 as before.
    assert client.post("/api/source-queue", json={"terms": []}).status_code == 401


def test_security_headers_docs_without_cdn_and_search(client: TestClient, conn: psycopg.Connection) -> None:
    token = user_store.add_user(conn, "ann", "reviewer")[1]
    for path in ("/", "/api/me", "/docs", "/static/review.js"):
        r = client.get(path, headers=auth(token))
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    docs = client.get("/docs").text
    assert not re.search(r"https?://", docs)  # nothing from another origin: it works offline
    for src in re.findall(r'(?:src|href)="([^"]+)"', docs):
        assert client.get(src).status_code == 200, src
    # Digits that are not ASCII are text to search, never a 500.
    for q in ("²", "٣", "12²"):
        r = client.get("/api/concepts/search", params={"q": q, "k": 3}, headers=auth(token))
        assert r.status_code == 200, (q, r.text)


def test_like_wildcards_match_themselves(client: TestClient, conn: psycopg.Connection) -> None:
    token = user_store.add_user(conn, "ann", "reviewer")[1]
    diabetes = concepts_like(conn, "%diabetes mellitus%")
    for code in ("E11.9", "E10_9"):
        item = seed_item(conn, code, f"diabetes {code}", diabetes)
        assert client.post(f"/api/review/items/{item}/approve", json={"rank": 1, "version": 0},
                           headers=auth(token)).is_success
    h = auth(token)
    assert client.get("/api/maps", params={"q": "%"}, headers=h).json()["total"] == 0
    assert [m["source_code"] for m in client.get("/api/maps", params={"q": "_"}, headers=h).json()["items"]] == [
        "E10_9"]
    assert client.get("/api/maps", params={"q": "E1"}, headers=h).json()["total"] == 2


def test_logout_revokes_and_tokens_expire(client: TestClient, conn: psycopg.Connection, fresh_db: str,
                                          tmp_path: Path) -> None:
    api_token = user_store.add_user(conn, "ann", "reviewer")[1]
    r = client.post("/api/session", headers=auth(api_token))
    assert r.status_code == 200 and r.json()["expires_in_s"] > 0
    session = r.json()["token"]
    assert client.get("/api/me", headers=auth(session)).json()["name"] == "ann"
    assert client.post("/api/logout", headers=auth(session)).json() == {"revoked": True}
    assert client.get("/api/me", headers=auth(session)).status_code == 401
    assert client.get("/api/me", headers=auth(api_token)).status_code == 200  # the API token itself stays
    # A token that has expired stops working.
    _, old = user_store.add_user(conn, "bob", "reviewer", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert client.get("/api/me", headers=auth(old)).status_code == 401
    # `harmonia user add --expires`
    runner = CliRunner()
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    r = runner.invoke(cli_app, ["--database-url", fresh_db, "user", "add", "cy", "--expires", "30d"], env=env)
    assert r.exit_code == 0 and "expires" in r.output, r.output
    token = r.stdout.strip().splitlines()[-1]
    left = conn.execute("SELECT expires_at - now() FROM harmonia.api_token t JOIN harmonia.users u "
                        "ON u.id = t.user_id WHERE u.name = 'cy'").fetchone()[0]
    assert timedelta(days=29) < left <= timedelta(days=30)
    assert client.get("/api/me", headers=auth(token)).status_code == 200
    r = runner.invoke(cli_app, ["--database-url", fresh_db, "user", "add", "dee", "--expires", "2001-01-01"], env=env)
    assert r.exit_code == 1 and "not in the future" in r.output
    now = datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    with pytest.raises(ValueError):
        parse_expiry("soon", now)
