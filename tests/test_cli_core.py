"""The foundation commands through the real CLI, against a copy of the template database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harmonia.cli import app

runner = CliRunner()


def run(fresh_db: str, tmp_path: Path, *args: str):
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path)}
    return runner.invoke(app, ["--database-url", fresh_db, *args], env=env)


def test_db_migrate_is_idempotent_and_status_reports(fresh_db: str, tmp_path: Path) -> None:
    assert run(fresh_db, tmp_path, "db", "migrate").exit_code == 0
    r = run(fresh_db, tmp_path, "db", "migrate")
    assert r.exit_code == 0, r.output
    assert "applied 0 migration(s)" in r.output
    r = run(fresh_db, tmp_path, "db", "status")
    assert r.exit_code == 0 and "pgvector 0.8" in r.output and "'concept': 55294" in r.output


def test_search_prints_candidates_and_filters(fresh_db: str, tmp_path: Path) -> None:
    r = run(fresh_db, tmp_path, "search", "Type 2 diabetes mellitus", "-k", "5", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 5 and "diabetes" in rows[0]["concept_name"].lower()
    r = run(fresh_db, tmp_path, "search", "sodium", "-k", "7", "--vocabulary", "LOINC", "--json")
    assert {x["vocabulary_id"] for x in json.loads(r.stdout)} == {"LOINC"}


@pytest.mark.slow
def test_quickstart_maps_and_scores_sample_terms(fresh_db: str, tmp_path: Path) -> None:
    r = run(fresh_db, tmp_path, "quickstart", "--n", "12", "--show", "1", "--calibrate-rows", "60")
    assert r.exit_code == 0, r.output
    # 60 development rows certify no threshold (149 right rows at least): nothing is auto-approved
    assert "too few calibration rows" in " ".join(r.output.split())
    assert "auto-approved 0 of 12 test-part terms" in r.output
    assert "vocabulary already loaded" in r.output
    assert "input rows 12 = approved" in r.output and "top-1" in r.output and "recall@50" in r.output
    assert "remembered 6," in r.output and "retrieval=hybrid" in r.output  # the dev part's ~6.8k mapped sources


def test_vocab_load_error_exits_non_zero_with_line(fresh_db: str, tmp_path: Path) -> None:
    from tests.athena_files import concept_row, write_vocab

    d = write_vocab(tmp_path / "bad", [concept_row(1, "x"), "2\tbroken"])
    r = run(fresh_db, tmp_path, "vocab", "load", str(d), "--no-progress")
    assert r.exit_code == 1
    assert "CONCEPT.csv line 3: 2 fields, expected 10" in r.output and "previous vocabulary is intact" in r.output
    r = run(fresh_db, tmp_path, "vocab", "status")
    assert "55,294" in r.output


def test_config_show_masks_nothing_secret_and_names_sources(tmp_path: Path) -> None:
    r = runner.invoke(app, ["config", "show"], env={"HARMONIA_CONFIG": "", "HARMONIA_RERANKER": "llm"})
    assert r.exit_code == 0
    assert "HARMONIA_RERANKER" in r.output
