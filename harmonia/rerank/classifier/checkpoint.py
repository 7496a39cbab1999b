"""A classifier checkpoint: the folder `harmonia reranker train` writes (model/, calibration.json, stacker.json,
model_card.json), where the settings find it (classifier_checkpoint, else <data_dir>/reranker/latest), the hash that
names it, and the calibration that turns the top probability into a confidence."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harmonia.config import Settings


class CheckpointError(RuntimeError):
    """No usable classifier checkpoint."""


# "VOCAB:CODE" of the sources the cross-encoder trained on (written by `harmonia reranker train`): rows that a
# calibration must leave out, since the model is surer of its own training rows than of new codes.
TRAINED_SOURCES = "trained_sources.json"


def trained_sources(checkpoint: Path) -> frozenset[str] | None:
    """The checkpoint's training sources; None for a checkpoint that does not record them (made before they were)."""
    f = checkpoint / TRAINED_SOURCES
    if not f.exists():
        return None
    try:
        doc = json.loads(f.read_text())
        return frozenset(str(k) for k in doc["sources"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{f}: not a list of training sources ({exc})") from exc


@dataclass
class Calibration:
    """A non-decreasing step-wise-linear map from the top pair's probability to a confidence in 0..1."""

    x: list[float]
    y: list[float]
    method: str = "isotonic"
    n: int = 0

    def __call__(self, p: float | np.ndarray) -> np.ndarray | float:
        out = np.clip(np.interp(p, self.x, self.y) if self.x else p, 0.0, 1.0)
        return float(out) if np.ndim(out) == 0 else out

    @classmethod
    def identity(cls) -> Calibration:
        return cls(x=[0.0, 1.0], y=[0.0, 1.0], method="identity", n=0)

    @classmethod
    def fit(cls, probs: Sequence[float], correct: Sequence[bool], min_points: int = 20) -> Calibration:
        """Isotonic regression of correctness on the top probability; identity when there is too little data or
        only one outcome (nothing to learn a mapping from)."""
        p = np.asarray(probs, dtype=float)
        y = np.asarray(correct, dtype=float)
        if len(p) < min_points or y.min(initial=1) == y.max(initial=0):
            return cls.identity()
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        xs = [float(v) for v in iso.X_thresholds_]
        ys = [float(v) for v in iso.y_thresholds_]
        return cls(x=xs, y=ys, method="isotonic", n=len(p))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        x, y = list(d.get("x", [])), list(d.get("y", []))
        if len(x) != len(y) or any(b < a for a, b in zip(x, x[1:], strict=False)):
            raise CheckpointError("calibration.json: x and y must be equally long and x sorted")
        return cls(x=x, y=y, method=d.get("method", "isotonic"), n=int(d.get("n", 0)))


def reranker_root(data_path: Path) -> Path:
    """Where `harmonia reranker train` puts its runs (and the `latest` pointer)."""
    return data_path / "reranker"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, following a `latest` pointer (a symlink, or a file naming the folder)."""
    p = Path(path).expanduser()
    if p.is_file():  # a pointer file
        target = Path(p.read_text().strip())
        p = target if target.is_absolute() else p.parent / target
    p = p.resolve()
    if not (p / "model" / "config.json").exists():
        raise CheckpointError(f"{p} is not a classifier checkpoint (no model/config.json): run "
                              "`harmonia reranker train` or set classifier_checkpoint")
    return p


def checkpoint_from_settings(settings: Settings) -> Path:
    """The checkpoint `classifier_checkpoint` names, else the latest trained one under the data dir."""
    if settings.classifier.checkpoint:
        return resolve_checkpoint(settings.classifier.checkpoint)
    latest = reranker_root(settings.data_path) / "latest"
    if not latest.exists():
        raise CheckpointError(f"no trained classifier at {latest}: run `harmonia reranker train` first "
                              "(or set classifier_checkpoint)")
    return resolve_checkpoint(latest)


def weights_hash(model_dir: Path, *extra: Path) -> str:
    """Short hash of the model weights and config (and of `extra` files, e.g. the stacker, where they exist):
    what model_version names."""
    h = hashlib.sha256()
    for p in [*sorted(model_dir.iterdir()), *extra]:
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"):
            h.update(p.name.encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]
