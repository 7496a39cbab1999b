"""Where the project's own files are: migrations/, prompts/, data/sample/ (beside the package in a checkout)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resource_dir(name: str) -> Path:
    """A top-level project folder (`migrations`, `prompts`, `data`); HARMONIA_RESOURCES overrides the root."""
    root = Path(os.environ["HARMONIA_RESOURCES"]) if os.environ.get("HARMONIA_RESOURCES") else REPO_ROOT
    path = root / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: Harmonia reads {name}/ from its source checkout (install with `pip install -e .`) "
            "or from $HARMONIA_RESOURCES")
    return path


def sample_dir() -> Path:
    return resource_dir("data") / "sample"
