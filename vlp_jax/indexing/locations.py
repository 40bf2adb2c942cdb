"""Serving artefacts on object storage: publish a finished folder to ``gs://`` / ``s3://``, and
stage a bundle or an index from there to a verified local cache before serving it.

faiss reads and memory-maps local files only, and the bundle is read by Orbax and the tokenizer
loader from one folder, so the server copies both to local disk first
(``runtime.staging.stage``: every file's size checked against the store's listing, the copy
renamed into place only when complete, reused while the store still lists the same files and
versions).  An index additionally carries the SHA-256 of its data files in
``index_info.json`` (written by the index job), checked on the staged copy: a corrupt or
mismatched cache is refused with the file named, whatever the store reported.

Publishing needs the opposite care, because object stores have no rename: the file readers test
for completeness (``index_info.json`` of an index, ``manifest.json`` of a bundle) is deleted
first and uploaded last, so a reader sees the previous finished folder, or "unfinished", never a
finished-looking mixture; objects of an earlier version that the new one lacks are deleted.

Both sides stage (the index job its bundle and ``--update_from`` index, the service its bundle
and every index it loads) and the offline side publishes, so this module lives with the offline
side, below ``vlp_jax.serve``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Collection, Mapping
from typing import Any

from vlp_jax.runtime import fs, staging

CACHE_ENV = "VLP_SERVE_CACHE"
_CHUNK = 8 << 20


class VerificationError(OSError):
    """A staged file does not match the checksum its folder recorded."""


def is_remote(loc: str) -> bool:
    return fs.is_remote(loc)


def default_cache_dir() -> str:
    """``$VLP_SERVE_CACHE`` or ``~/.cache/vlp_jax/serve``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "vlp_jax", "serve")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def digests(folder: str, names: Collection[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of files in a local folder (recorded by the writers)."""
    return {name: {"size": os.path.getsize(os.path.join(folder, name)),
                   "sha256": sha256_file(os.path.join(folder, name))} for name in sorted(names)}


def verify(folder: str, files: Mapping[str, Mapping[str, Any]], what: str) -> None:
    """VerificationError unless every recorded file has its recorded size and SHA-256."""
    for name, want in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != want["size"]:
            raise VerificationError(f"{what}: {name} is missing or not {want['size']} bytes")
        if sha256_file(path) != want["sha256"]:
            raise VerificationError(f"{what}: {name} does not match its recorded SHA-256 "
                                    f"{want['sha256'][:12]}...")


def _local_files(local: str, skip: Collection[str]) -> list[str]:
    out = []
    for folder, dirs, files in os.walk(local):
        rel_dir = os.path.relpath(folder, local)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in files:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel not in skip:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def publish_dir(local: str, uri: str, *, last: str, skip: Collection[str] = ()) -> None:
    """Upload the finished folder ``local`` to ``uri`` with ``last`` (the completeness marker)
    deleted first and uploaded last; objects under ``uri`` that ``local`` lacks are deleted."""
    start, total = time.perf_counter(), 0
    fs.remove(fs.join(uri, last))  # from here on readers see "unfinished"
    names = _local_files(local, set(skip))
    if last not in names:
        raise ValueError(f"{local} has no {last}; refusing to publish an unfinished folder")
    stale = set(staging.listing(uri)) - set(names) if fs.exists(uri) else set()
    for rel in [n for n in names if n != last] + [last]:
        with open(os.path.join(local, *rel.split("/")), "rb") as fin, \
                fs.path(fs.join(uri, rel)).open("wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)
        total += os.path.getsize(os.path.join(local, *rel.split("/")))
    for rel in sorted(stale):
        fs.remove(fs.join(uri, rel))
    logging.info("published %d files, %.1f MB to %s in %.2f s", len(names), total / 1e6, uri,
                 time.perf_counter() - start)


def stage_bundle(loc: str, cache_dir: str | None = None) -> str:
    """A local folder holding the bundle at ``loc`` (``loc`` itself when local)."""
    if not is_remote(loc):
        return loc
    local = staging.stage(loc, cache_dir or default_cache_dir(), what="serving bundle")
    if not os.path.isfile(os.path.join(local, "manifest.json")):
        raise FileNotFoundError(f"{loc} is not a finished serving bundle (no manifest.json)")
    return local


def stage_index(loc: str, cache_dir: str | None = None) -> str:
    """A local, verified copy of the index directory at ``loc`` (``loc`` itself when local)."""
    if not is_remote(loc):
        return loc
    from vlp_jax.indexing import ann

    local = staging.stage(loc, cache_dir or default_cache_dir(), what="index")
    info = ann.read_info(local)  # ValueError: not a finished index directory
    verify(local, info.get("files", {}), f"index {loc} (staged in {local})")
    return local
