"""The `harmonia` command. The application and its groups are in app.py; each stage's commands live in their own
module of this package and register on those groups when imported below, so adding a stage means one module and
one name in this import, never an edit of another stage's commands."""

from __future__ import annotations

import sys

# Importing a command module registers its commands, in this order (the order `harmonia --help` lists them).
from harmonia.cli import core, vocab, llm, bench, calibrate, kinds, reranker, worker, review, retrieval, local, usagi  # noqa: F401  # isort: skip
from harmonia.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
