"""Where the project's own files are: migrations/, prompts/ and data/ (the sample vocabulary and mapping sets).

They live at the top of the source checkout; a built wheel carries copies under harmonia/_resources/ (see
pyproject.toml). Looked up in that order: $HARMONIA_RESOURCES/<name> when set, the installed package's copy, the
checkout's folder (an editable install).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent  # the source checkout, when the package runs from one
RESOURCE_NAMES = ("migrations", "prompts", "data")


def _packaged(name: str) -> Path | None:
    found = resources.files("harmonia") / "_resources" / name
    return found if isinstance(found, Path) and found.is_dir() else None  # a zipped install has no real path


def resource_dir(name: str) -> Path:
    """A project folder (`migrations`, `prompts`, `data`)."""
    if name not in RESOURCE_NAMES:
        raise ValueError(f"unknown resource folder {name!r}: one of {', '.join(RESOURCE_NAMES)}")
    if os.environ.get("HARMONIA_RESOURCES"):
        path = Path(os.environ["HARMONIA_RESOURCES"]) / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} not found: $HARMONIA_RESOURCES must hold {name}/")
        return path
    path = _packaged(name) or CHECKOUT / name
    if not path.is_dir():
        raise FileNotFoundError(f"{name}/ not found: neither in the installed package (harmonia/_resources/) nor in "
                                f"a source checkout at {CHECKOUT}; reinstall Harmonia, or point $HARMONIA_RESOURCES "
                                f"at a folder holding {name}/")
    return path


def sample_dir() -> Path:
    """The bundled sample: vocab/ (an Athena export) and benchmark/ (Usagi mapping sets)."""
    return resource_dir("data") / "sample"
