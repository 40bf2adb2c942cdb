"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Reports, benchmark results and other JSON/PNG outputs are rewritten in place while other tools
(or a second run) may read them, and a run can be killed mid-write.  On a filesystem the bytes go
to a temporary file in the same directory, which then replaces the target in one ``os.replace``;
on an object store (gs://, s3://) one upload, which the store publishes only once complete
(``runtime.fs.write_bytes``).  On any error the old target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from vlp_jax.runtime import fs


def write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` (local or object store) with ``data`` atomically."""
    fs.write_bytes(path, data)


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """For writers that need a local path (``np.save``, faiss): yields a local file to write;
    it replaces ``path`` if the block succeeds and is deleted if it fails (a full disk must not
    leave a partial temporary file, nor take the space it holds).  For an object-store ``path``
    the local file is uploaded in one piece when the block succeeds."""
    if fs.is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix="vlp_upload_", suffix="-" + fs.basename(path))
        os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as f:
                fs.write_bytes(path, f.read())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return
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
    fs.write_json(path, obj)
