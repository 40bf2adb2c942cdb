"""Parsing location names: local path, ``gs://bucket/key`` or ``s3://bucket/key``.

The bottom of the storage layer (``fs`` and ``object_store`` both build on it), kept free of any
client library so the parsing rules — what counts as a URI, what is refused — live in one place.
"""

from __future__ import annotations

import os
import posixpath

REMOTE_SCHEMES = ("gs", "s3")
Location = str | os.PathLike


class StorageAccessError(OSError):
    """A location cannot be used: missing bucket, refused credentials, unsupported scheme."""


def scheme(loc: Location) -> str:
    """``"gs"``, ``"s3"`` or ``""`` for a local path."""
    text = os.fspath(loc)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in REMOTE_SCHEMES else ""


def is_remote(loc: Location) -> bool:
    """True for gs:// and s3:// locations."""
    return bool(scheme(loc))


def normalize(loc: Location) -> str:
    """The canonical text of a location: absolute local path, or ``scheme://bucket/key``."""
    text = os.fspath(loc)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    head, sep, rest = text.partition("://")
    if sep:
        if head.lower() not in REMOTE_SCHEMES:
            raise StorageAccessError(
                f"unsupported location {text!r}: use a local path, gs://bucket/path or "
                "s3://bucket/path")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StorageAccessError(f"location {text!r} names no bucket")
        parts = rest.rstrip("/").split("/")
        # Object keys are literal: "a/../run" and "a//run" would name other objects than
        # "run" (two runs could then hold two locks for what a user means as one workdir).
        if text != text.strip() or any(p in ("", ".", "..") for p in parts[1:]):
            raise StorageAccessError(
                f"location {text!r}: empty, '.' or '..' path segments and surrounding spaces "
                "are not allowed in object-store URIs")
        return f"{head.lower()}://{rest.rstrip('/')}"
    if text.lower().startswith(("gs:", "s3:")):
        raise StorageAccessError(
            f"location {text!r} looks like a mistyped object-store URI (write gs://bucket/path "
            "or s3://bucket/path); refusing to create a local folder of that name")
    return os.path.abspath(os.path.expanduser(text))


def join(loc: Location, *parts: str) -> str:
    """``loc/part/...`` for local paths and URIs alike (always ``/``-separated for URIs)."""
    base = normalize(loc)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(loc: Location) -> str:
    """The containing folder (``gs://b/run`` for ``gs://b/run/x``)."""
    base = normalize(loc)
    return posixpath.dirname(base) if is_remote(base) else os.path.dirname(base)


def basename(loc: Location) -> str:
    return posixpath.basename(normalize(loc))


def bucket_and_key(loc: Location) -> tuple[str, str]:
    """``("bucket", "key/inside")`` of an object-store URI."""
    base = normalize(loc)
    if not is_remote(base):
        raise ValueError(f"{base} is not an object-store URI")
    rest = base.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key
