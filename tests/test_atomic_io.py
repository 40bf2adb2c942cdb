"""vlp_jax.runtime.atomic_io: whole-file replacement; a failed write leaves the old file alone."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vlp_jax.runtime import atomic_io


def test_write_json_round_trips_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "result.json"
    atomic_io.write_json(str(path), {"rows": [1, 2.5], "nan": float("nan")})
    text = path.read_text()
    assert text.endswith("\n")
    loaded = json.loads(text)
    assert loaded["rows"] == [1, 2.5] and loaded["nan"] != loaded["nan"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(path.parent) == ["result.json"]  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    atomic_io.write_bytes(str(path), b"old report\n")
    with pytest.raises(TypeError):
        atomic_io.write_bytes(str(path), "not bytes")  # fails inside the write
    assert path.read_bytes() == b"old report\n"
    assert os.listdir(tmp_path) == ["report.md"]
