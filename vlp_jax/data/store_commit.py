"""A dataset build on object storage (gs://, s3://): published whole, read through a verified
local copy.

Why not read the store directly: ArrayRecord's reader cannot open s3:// at all (TFDS still
reports the split sizes from ``dataset_info.json``, so the failure shows only at the first
record, or as an empty split), and on gs:// every random record is one ranged GET
(docs/pods_data.md has the measurements).  Why not build in place: a store has no rename, so
TFDS's "write ``incomplete.*``, rename when done" does not make a build appear at once, and
several pod hosts building at the same time would interleave their files.

Layout of one build in the store (``<data_dir>/vlp_catalog/<config>/1.0.0``)::

    _COMPLETE.json     commit marker, written last: which attempt holds the build, and the
                       size of every file in it
    attempt-<id>/      one builder's upload: dataset_info.json, shards, tokenizer/, report

Protocol:

- a builder builds on local disk, uploads into its own fresh ``attempt-<id>/``, checks that the
  store lists every file with its size, then creates the marker *only if absent*
  (``fs.create_exclusive``: GCS ``ifGenerationMatch=0``, S3 ``If-None-Match: *``).  Exactly one
  of several racing builders wins; the others delete their attempt and use the winner's.  Files
  of two builders are never mixed, and a crashed builder leaves no lock behind, only an
  unreferenced attempt folder.
- no marker = no build: an interrupted upload is invisible to readers.
- a reader checks the store's listing of the attempt against the marker (a missing or
  truncated object raises ``shard_check.DatasetCorruptError`` naming its URI), then stages the
  attempt folder to local disk (``runtime.staging``: sizes verified, reused while the store
  still lists the same versions).  The caller then checks record counts on the local copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

from absl import logging

from vlp_jax.data import shard_check
from vlp_jax.runtime import fs, staging

MARKER = "_COMPLETE.json"
ATTEMPT_PREFIX = "attempt-"


def default_staging_dir() -> str:
    """Where local copies of object-store data go when ``data.staging_dir`` is empty."""
    return os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax", "staged")


@contextlib.contextmanager
def host_lock(folder: str, name: str) -> Iterator[None]:
    """Serialise processes of one host on ``name`` (builds, staging into one local cache)."""
    os.makedirs(folder, exist_ok=True)
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    with open(os.path.join(folder, f".lock-{digest}"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_files(local_dir: str) -> dict[str, int]:
    """``relative/name → size`` of every file under a local folder."""
    out = {}
    for root, _, names in os.walk(local_dir):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, local_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def upload_tree(local_dir: str, dest: str, *, last: tuple[str, ...] = ()) -> dict[str, int]:
    """Copy every file under ``local_dir`` to the store location ``dest``; the ``last``
    names (relative) go up only after all others, so their presence means the rest is there.

    One batched, concurrent ``put`` (fsspec): uploading file by file costs a round trip each
    through one event loop, whatever the thread count.  Each object appears only once its
    upload is complete (GCS and S3 never show a partial object)."""
    import fsspec

    files = local_files(local_dir)
    if not files:
        raise ValueError(f"{local_dir} holds no files to upload to {dest}")
    target = fs.normalize(dest)
    filesystem, root = fsspec.core.url_to_fs(target)

    def put(names: list[str]) -> None:
        if names:
            filesystem.put([os.path.join(local_dir, *rel.split("/")) for rel in names],
                           [f"{root}/{rel}" for rel in names])

    put(sorted(rel for rel in files if rel not in last))
    put([rel for rel in last if rel in files])
    return files


def read_marker(location: str) -> dict | None:
    """The commit marker of the build at ``location``, or None when there is no build."""
    try:
        marker = fs.read_json(fs.join(location, MARKER))
    except FileNotFoundError:
        return None
    if not isinstance(marker, dict) or not str(marker.get("attempt", "")).startswith(
            ATTEMPT_PREFIX) or not isinstance(marker.get("files"), dict):
        raise shard_check.DatasetCorruptError(location, fs.join(location, MARKER),
                                              "is not a commit marker this code wrote")
    return marker


def publish(local_dir: str, location: str, staging_dir: str) -> str:
    """Upload a finished local build to ``location`` and commit it; return the attempt URI of
    the build that holds ``location`` now (ours, or a racing builder's that committed first).

    Our local folder becomes the staged copy of our attempt (moved, not copied), so the host
    that built does not download its own build again."""
    attempt = f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    attempt_uri = fs.join(location, attempt)
    start = time.perf_counter()
    files = upload_tree(local_dir, attempt_uri)
    listed = staging.listing(attempt_uri)
    short = {rel: (size, listed.get(rel, {}).get("size")) for rel, size in files.items()
             if listed.get(rel, {}).get("size") != size}
    if short:
        raise OSError(f"upload of the dataset build to {attempt_uri} is incomplete "
                      f"(file: local size, listed size): {short}")
    marker = {"attempt": attempt, "files": files, "host": socket.gethostname(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    won = fs.create_exclusive(fs.join(location, MARKER), json.dumps(marker, indent=1).encode())
    if not won:
        logging.info("another builder committed %s first; deleting our upload %s", location,
                     attempt_uri)
        fs.rmtree(attempt_uri)
        return fs.join(location, read_marker(location)["attempt"])
    logging.info("dataset build uploaded to %s in %.1f s (%d files, %.1f MB)", attempt_uri,
                 time.perf_counter() - start, len(files), sum(files.values()) / 1e6)
    _adopt(local_dir, attempt_uri, listed, staging_dir)
    return attempt_uri


def _adopt(local_dir: str, attempt_uri: str, listed: dict, staging_dir: str) -> None:
    """Make the local build the staged copy of ``attempt_uri`` (the manifest ``staging`` reads)."""
    target = staging.cache_dir_for(attempt_uri, staging_dir)
    with open(os.path.join(local_dir, staging.MANIFEST), "w") as f:
        json.dump({"source": fs.normalize(attempt_uri), "files": listed}, f, indent=1)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(local_dir, target)


def verify_listing(location: str, marker: dict) -> str:
    """Check that the store still holds every file of the committed build with the size the
    builder wrote; return the attempt URI.  Raises ``DatasetCorruptError`` naming the object."""
    attempt_uri = fs.join(location, marker["attempt"])
    listed = staging.listing(attempt_uri)
    for rel, size in sorted(marker["files"].items()):
        uri = fs.join(attempt_uri, rel)
        if rel not in listed:
            raise shard_check.DatasetCorruptError(location, uri, "is missing")
        if listed[rel]["size"] != size:
            raise shard_check.DatasetCorruptError(
                location, uri, f"holds {listed[rel]['size']} bytes, the build wrote {size} "
                "(truncated or replaced)")
    return attempt_uri


def stage_build(location: str, staging_dir: str) -> tuple[str, str] | None:
    """``(local copy, attempt URI)`` of the committed build at ``location``; None if there is
    no committed build.  The copy is verified against the marker and reused while current."""
    marker = read_marker(location)
    if marker is None:
        return None
    attempt_uri = verify_listing(location, marker)
    with host_lock(staging_dir, attempt_uri):
        local = staging.stage(attempt_uri, staging_dir, what="dataset build")
    return local, attempt_uri


def delete_build(location: str) -> None:
    """Delete a build in the store: the marker first, so no reader finds a half-deleted one."""
    fs.remove(fs.join(location, MARKER))
    fs.rmtree(location)
