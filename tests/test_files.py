"""files.py (atomic writes, content hashes) and progress.py (the one progress-bar set-up)."""

import hashlib

import pytest

from sfumato.files import atomic_write_bytes, file_sha256, sha256_bytes
from sfumato.progress import COLUMNS, start_progress


def test_hashes_agree_with_hashlib(tmp_path):
    data = bytes(range(256)) * 9000  # over two 1 MiB blocks
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, data)
    assert path.read_bytes() == data and not list(tmp_path.glob(".*tmp*"))
    assert file_sha256(path) == sha256_bytes(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("columns", COLUMNS)
def test_start_progress(columns):
    bar, task = start_progress(3, "working", columns, completed=1, loss=0.5, rate=10.0)
    try:
        bar.advance(task)
        assert bar.tasks[0].completed == 2 and bar.tasks[0].total == 3 and bar.tasks[0].description == "working"
    finally:
        bar.stop()
    with pytest.raises(ValueError, match="unknown progress columns"):
        start_progress(1, "x", "fancy")
