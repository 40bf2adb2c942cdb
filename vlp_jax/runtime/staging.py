"""Stage a folder from object storage to local disk, verified, and reuse it while it is current.

Some readers only take local files — faiss indexes, ArrayRecord on s3:// (its reader reports 0
records there, with no error) — and random-access reads through an object store cost one ranged
GET per record.  Such data is copied once per host into a local cache and read from there.

Guarantees:
- **never a partial copy in use**: files are copied into ``<cache>.partial-<pid>-<nonce>/``, each
  checked against the size the store reports, and the folder is renamed into place only when all
  are there, with a ``_staged.json`` manifest (source URI, every file's size and version tag);
- **never a stale copy**: a cached folder is reused only if the store still lists the same files
  with the same sizes and version tags (ETag / generation / mtime); otherwise it is staged again;
- **never an empty source**: staging a folder that holds no files raises, naming the URI.

Local sources are returned as they are (nothing to stage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any

from vlp_jax.runtime import fs

MANIFEST = "_staged.json"
_CHUNK = 8 << 20


class StagingError(OSError):
    """A staged copy could not be made complete (size mismatch, empty source)."""


def _version_tag(info: Any) -> str:
    """A per-object version from an fsspec info dict: ETag, GCS generation, else mtime."""
    for key in ("ETag", "etag", "generation", "md5Hash", "crc32c", "LastModified", "mtime",
                "updated"):
        if isinstance(info, dict) and info.get(key) not in (None, ""):
            return f"{key}={info[key]}"
    return ""


def listing(src: fs.Location) -> dict[str, dict[str, Any]]:
    """Every file under ``src`` (relative ``/``-separated name → size and version tag)."""
    import fsspec

    root = fs.normalize(src)
    filesystem, stripped = fsspec.core.url_to_fs(root)
    found = {}
    for name, info in filesystem.find(stripped, detail=True).items():
        if info.get("type") == "directory":
            continue
        rel = name[len(stripped):].lstrip("/")
        found[rel] = {"size": int(info.get("size") or 0), "version": _version_tag(info)}
    return found


def cache_dir_for(src: fs.Location, cache_root: str) -> str:
    """The local folder a source stages into: readable name plus a hash of the full URI."""
    uri = fs.normalize(src)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_root), f"{fs.basename(uri) or 'root'}-{digest}")


def _current(local: str, uri: str, files: dict[str, dict[str, Any]]) -> bool:
    try:
        with open(os.path.join(local, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("source") != uri or manifest.get("files") != files:
        return False
    paths = {rel: os.path.join(local, *rel.split("/")) for rel in files}
    return all(os.path.isfile(p) and os.path.getsize(p) == files[rel]["size"]
               for rel, p in paths.items())


def stage(src: fs.Location, cache_root: str, *, what: str = "data") -> str:
    """A local folder holding exactly the files under ``src``; ``src`` itself if it is local.

    Logs the bytes moved and the rate, so data staging on a pod host shows its cost."""
    uri = fs.normalize(src)
    if not fs.is_remote(uri):
        return uri
    files = listing(uri)
    if not files:
        raise StagingError(f"{what} {uri} holds no files; refusing to stage an empty folder")
    local = cache_dir_for(uri, cache_root)
    if _current(local, uri, files):
        logging.info("%s %s: local copy %s is current (%d files)", what, uri, local, len(files))
        return local
    partial = f"{local}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start, total = time.perf_counter(), 0
    try:
        for rel, meta in sorted(files.items()):
            dst = os.path.join(partial, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with fs.path(fs.join(uri, rel)).open("rb") as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            got = os.path.getsize(dst)
            if got != meta["size"]:
                raise StagingError(f"{what} {uri}/{rel}: copied {got} bytes, the store lists "
                                   f"{meta['size']} (changed during the copy?)")
            total += got
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump({"source": uri, "files": files}, f, indent=1)
        old = f"{local}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(local):
            os.replace(local, old)
        os.replace(partial, local)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    logging.info("%s %s: staged %d files, %.1f MB in %.2f s (%.1f MB/s) to %s", what, uri,
                 len(files), total / 1e6, seconds, total / 1e6 / max(seconds, 1e-9), local)
    return local
