"""Locations: a local path, ``gs://bucket/key`` or ``s3://bucket/key``, named one way everywhere.

Pods and clusters keep runs, datasets and models on object storage, so every file the project
reads or writes goes through this module instead of ``os.path``/``open``.  It is a thin layer
over ``etils.epath`` (which reaches gs:// through gcsfs and s3:// through s3fs); what epath does
not give, and what the project's guarantees need, is added here:

- ``normalize``: local paths become absolute, object-store URIs keep their scheme, anything else
  (``http://``, ``hdfs://``, a ``gs:`` without ``//``) is refused with the supported forms named —
  a typo must not silently become a local folder called ``gs:``.
- ``write_bytes`` is atomic on every backend: locally a temporary file renamed over the target;
  on an object store one upload, which the store publishes only once complete (GCS and S3 never
  show a partial object), so a reader sees the old object or the whole new one.
- ``create_exclusive`` (create-if-absent) is what locks need: ``O_EXCL`` locally, a GCS upload
  with ``ifGenerationMatch=0`` (sent as a multipart upload, the kind every GCS implementation,
  the emulator included, enforces), an S3 ``PutObject`` with ``If-None-Match: *``.
- ``check_access``: one clear message naming the URI when a bucket is missing or credentials are
  refused, before any compilation.

Object-store clients find their endpoints through the environment the way each library documents
(``STORAGE_EMULATOR_HOST``/``TENSORSTORE_GCS_HTTP_URL`` for GCS emulators, ``AWS_ENDPOINT_URL``
for S3-compatible stores); docs/pods.md lists them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import fsspec.config
from etils import epath

from vlp_jax.runtime import object_store
from vlp_jax.runtime.uri import (  # noqa: F401  (re-exported: fs is the one import callers need)
    REMOTE_SCHEMES,
    Location,
    StorageAccessError,
    basename,
    bucket_and_key,
    is_remote,
    join,
    normalize,
    parent,
    scheme,
)

# gcsfs and s3fs cache directory listings per process by default; another process (a pod host,
# a racing run, the previous attempt) writes into the same prefixes, so a cached listing would
# hide its checkpoints, commit markers and locks.  Every listing asks the store.
for _protocol in ("gs", "gcs", "s3", "s3a"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def path(loc: Location) -> epath.Path:
    """The ``epath.Path`` of a location (local paths made absolute)."""
    return epath.Path(normalize(loc))


def exists(loc: Location) -> bool:
    return path(loc).exists()


def isdir(loc: Location) -> bool:
    return path(loc).is_dir()


def listdir(loc: Location) -> list[str]:
    """Names (not paths) in a folder, sorted; ``[]`` when it does not exist."""
    p = path(loc)
    if not p.exists():
        return []
    return sorted(child.name for child in p.iterdir())


def makedirs(loc: Location) -> None:
    """Create a folder and its parents (a no-op on object stores, where folders are prefixes)."""
    if not is_remote(loc):
        os.makedirs(normalize(loc), exist_ok=True)


def remove(loc: Location, missing_ok: bool = True) -> None:
    p = path(loc)
    try:
        p.unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(loc: Location) -> None:
    """Delete a folder and everything under it (nothing if it does not exist)."""
    p = path(loc)
    if p.exists():
        p.rmtree()


def read_bytes(loc: Location) -> bytes:
    return path(loc).read_bytes()


def read_text(loc: Location) -> str:
    return path(loc).read_text()


def read_json(loc: Location) -> Any:
    return json.loads(read_text(loc))


def size(loc: Location) -> int:
    return path(loc).stat().length


def write_bytes(loc: Location, data: bytes) -> None:
    """Replace ``loc`` with ``data`` atomically: never half a file, on any backend."""
    target = normalize(loc)
    if is_remote(target):
        path(target).write_bytes(data)  # one upload: the store publishes it only when complete
        return
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(target) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def write_json(loc: Location, obj: Any) -> None:
    """``obj`` as indented JSON (trailing newline), written atomically."""
    write_bytes(loc, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create ``loc`` holding ``data`` only if nothing is there; False if something is.

    Exactly one of several racing callers (processes, hosts) gets True, on every backend."""
    target = normalize(loc)
    kind = scheme(target)
    if kind == "gs":
        return object_store.gcs_create_if_absent(*bucket_and_key(target), data)
    if kind == "s3":
        return object_store.s3_create_if_absent(*bucket_and_key(target), data)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def check_access(loc: Location, what: str = "location") -> str:
    """Normalise ``loc`` and prove it can be listed; raise ``StorageAccessError`` naming the URI
    and the cause (missing bucket, refused credentials, unreachable endpoint) otherwise.

    Called before any compilation, so a typo in a bucket name costs a second, not a compile."""
    target = normalize(loc)
    if not is_remote(target):
        return target
    object_store.check_bucket(target, what)
    return target
