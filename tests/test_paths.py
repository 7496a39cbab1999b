"""Where migrations/, prompts/ and data/ are found: $HARMONIA_RESOURCES, the installed package, the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmonia import paths


def test_a_checkout_finds_its_top_level_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONIA_RESOURCES", raising=False)
    assert paths.resource_dir("migrations") == paths.CHECKOUT / "migrations"
    assert (paths.sample_dir() / "vocab" / "CONCEPT.csv.gz").exists()


def test_harmonia_resources_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prompts").mkdir()
    monkeypatch.setenv("HARMONIA_RESOURCES", str(tmp_path))
    assert paths.resource_dir("prompts") == tmp_path / "prompts"
    with pytest.raises(FileNotFoundError, match="HARMONIA_RESOURCES must hold migrations/"):
        paths.resource_dir("migrations")
    with pytest.raises(ValueError, match="unknown resource folder"):
        paths.resource_dir("secrets")


def test_an_installed_package_uses_its_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = tmp_path / "_resources" / "prompts"
    packaged.mkdir(parents=True)
    monkeypatch.delenv("HARMONIA_RESOURCES", raising=False)
    monkeypatch.setattr(paths, "_packaged", lambda name: packaged if name == "prompts" else None)
    assert paths.resource_dir("prompts") == packaged
