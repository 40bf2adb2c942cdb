"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Reports, benchmark results and other JSON/PNG outputs are rewritten in place while other tools
(or a second run) may read them, and a run can be killed mid-write.  The bytes go to a temporary
file in the same directory, which then replaces the target in one ``os.replace``; on any error
the temporary file is removed and the old target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (creating its directory if needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """For writers that need a path (``np.save``, faiss): yields ``path + suffix`` to write;
    it replaces ``path`` if the block succeeds and is deleted if it fails (a full disk must not
    leave a partial temporary file, nor take the space it holds)."""
    tmp = path + suffix
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (trailing newline), written atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())
