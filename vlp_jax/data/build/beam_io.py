"""File access for the Beam jobs, through ``apache_beam.io.filesystems.FileSystems`` only.

Beam workers on a cluster share no disk with the driver or with each other, so every input,
output and temporary file of the Beam dataset build and the Beam embedding job is named by a
location every worker can open — a local path (local runners, or a shared mount), ``gs://`` or
``s3://`` — and opened through Beam's own filesystem layer.  That layer is configured by the
pipeline options (``--s3_endpoint_url``, ``--s3_access_key_id``, ``--s3_secret_access_key``,
``--s3_region_name``; on GCS the VM's or ``GOOGLE_APPLICATION_CREDENTIALS``' account), which
Beam hands to every worker; :func:`configure` applies the same options in the driver.

One refinement of "through ``FileSystems``": Beam's S3 and GCS filesystems build a new client
for *every* call — 0.3–0.9 s of loading boto3's service models on this machine — which for one
image read per item would dominate a build.  Single-object calls on ``s3://`` and ``gs://``
(open, create, exists, size, rename, delete) therefore go through one Beam ``S3IO`` / ``GcsIO``
per process, made from the same pipeline options — the object ``FileSystems`` would have made,
kept.  (They also rename and delete object by object, where ``FileSystems`` batches requests,
which the GCS emulator the tests use does not accept.)

Writes never leave half a file under its final name:
- locally, data goes to ``<name>.tmp-<uuid>`` renamed over the target — a unique name per
  attempt, so a retried or duplicated task (the runner may run one twice at once) never
  collides with the other attempt's temporary file;
- on an object store, one upload that the store publishes only once complete (GCS and S3 never
  show a partial object); a second attempt replaces it with the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import IO, Any

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from vlp_jax.runtime import uri

_RAW = CompressionTypes.UNCOMPRESSED
_COPY_CHUNK = 8 << 20


def configure(pipeline_args: Sequence[str]) -> PipelineOptions:
    """Apply the Beam pipeline options (S3 endpoint and keys, ...) to this process's
    ``FileSystems``, as Beam does in every worker; returns the options."""
    options = PipelineOptions(list(pipeline_args))
    FileSystems.set_options(options)
    return options


def _ensure_options() -> None:
    """Beam's S3 filesystem refuses to work without options; a driver-side call before any
    :func:`configure` gets empty ones (endpoint and keys then come from the environment, as
    boto3 reads them).  Workers already hold the pipeline's options, which are kept."""
    if getattr(FileSystems, "_pipeline_options", None) is None:
        FileSystems.set_options(PipelineOptions([]))


_CLIENTS: dict[tuple[str, int], Any] = {}


def _store_io(loc: str) -> Any:
    """Beam's ``S3IO`` / ``GcsIO`` for ``loc``'s scheme: one per process and set of pipeline
    options; None for a local path."""
    kind = uri.scheme(loc)
    if not kind:
        return None
    _ensure_options()
    options = FileSystems._pipeline_options  # noqa: SLF001 - what Beam's filesystems use
    key = (kind, id(options))
    if key not in _CLIENTS:
        if kind == "s3":
            from apache_beam.io.aws import s3io

            _CLIENTS[key] = s3io.S3IO(options=options)
        else:
            from apache_beam.io.gcp import gcsio

            _CLIENTS[key] = gcsio.GcsIO(pipeline_options=options)
    return _CLIENTS[key]


def normalize(loc: str) -> str:
    """Absolute local path or ``gs://``/``s3://`` URI (anything else refused, naming it)."""
    return uri.normalize(loc)


def join(base: str, *parts: str) -> str:
    return uri.join(base, *parts)


def is_remote(loc: str) -> bool:
    return uri.is_remote(loc)


def exists(loc: str) -> bool:
    store = _store_io(loc)
    if store is not None:
        return bool(store.exists(loc))
    return os.path.exists(normalize(loc))


def check_exists(loc: str, what: str) -> bool:
    """Whether ``loc`` exists, asked with the pipeline's own options (what every worker will
    use); a refused key, a missing bucket or an unreachable endpoint raises one
    ``StorageAccessError`` naming ``loc`` — in the driver, before any pipeline starts, instead
    of a stack trace from inside a worker."""
    try:
        return exists(loc)
    except Exception as err:  # noqa: BLE001 - boto3, google-cloud and Beam raise their own
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        options = ("--s3_endpoint_url, --s3_access_key_id, --s3_secret_access_key"
                   if uri.scheme(loc) == "s3" else "the workers' service account / "
                   "GOOGLE_APPLICATION_CREDENTIALS")
        raise uri.StorageAccessError(
            f"{what} {loc}: the object store refused or could not be reached ({first}); "
            f"the Beam workers use the same pipeline options ({options})") from err


def size(loc: str) -> int:
    """Bytes in a file; FileNotFoundError naming it if it is not there."""
    store = _store_io(loc)
    if store is not None:
        if not store.exists(loc):
            raise FileNotFoundError(f"{loc} does not exist")
        return int(store.size(loc))
    _ensure_options()
    found = FileSystems.match([loc])[0].metadata_list
    if not found:
        raise FileNotFoundError(f"{loc} does not exist")
    return int(found[0].size_in_bytes)


def listing(pattern: str) -> list[Any]:
    """``FileMetadata`` (path, size_in_bytes, last_updated_in_seconds) of every file matching
    a glob (``*`` within a folder, ``**`` across folders), sorted by path; [] if none.  A
    refused key or an unreachable store raises (Beam's ``BeamIOError``), never reads as []."""
    _ensure_options()
    return sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path)


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern``, sorted."""
    return [m.path for m in listing(pattern)]


def open_read(loc: str) -> IO[bytes]:
    """A seekable binary reader (ranged reads on object stores)."""
    store = _store_io(loc)
    if store is not None:
        if uri.scheme(loc) == "gs" and not store.exists(loc):  # GcsIO opens lazily
            raise FileNotFoundError(f"Not found: {loc}")
        return store.open(loc, "rb")
    _ensure_options()
    return FileSystems.open(loc, compression_type=_RAW)


def read_bytes(loc: str) -> bytes:
    with open_read(loc) as f:
        return f.read()


def read_json(loc: str) -> Any:
    return json.loads(read_bytes(loc).decode("utf-8"))


@contextlib.contextmanager
def create(loc: str) -> Iterator[IO[bytes]]:
    """A binary writer whose data appears at ``loc`` whole, or not at all (module docstring)."""
    _ensure_options()
    target = normalize(loc)
    if is_remote(target):
        with _store_io(target).open(target, "wb") as f:
            yield f
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(loc: str, data: bytes) -> None:
    with create(loc) as f:
        f.write(data)


def write_json(loc: str, obj: Any) -> None:
    write_bytes(loc, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def upload(local_path: str, loc: str) -> None:
    """Copy a local file to ``loc`` (same all-or-nothing rule as :func:`create`)."""
    with open(local_path, "rb") as fin, create(loc) as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def download(loc: str, local_path: str) -> None:
    """Copy ``loc`` to a local file (made by the caller's temporary folder)."""
    with open_read(loc) as fin, open(local_path, "wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def upload_tree(local_dir: str, loc: str, last: Sequence[str] = ()) -> None:
    """Copy every file under ``local_dir`` to ``loc/<relative path>``; the names in ``last``
    (relative paths) are copied after all others — a reader that waits for them (a completion
    marker) never sees the folder half copied."""
    files = []
    for root, _, names in os.walk(local_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            files.append(rel)
    order = sorted(files, key=lambda rel: (rel in last, last.index(rel) if rel in last else 0,
                                           rel))
    for rel in order:
        upload(os.path.join(local_dir, *rel.split("/")), join(loc, *rel.split("/")))


def download_tree(loc: str, local_dir: str) -> str:
    """Copy every file under ``loc`` into ``local_dir`` (made if needed); returns it.

    Raises FileNotFoundError naming ``loc`` when nothing is there."""
    base = normalize(loc).rstrip("/") + "/"
    paths = glob(base + "**")
    if not paths:
        raise FileNotFoundError(f"{loc} holds no files")
    for path in paths:
        rel = path[len(base):]
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        download(path, dst)
    return local_dir


def rename(src: str, dst: str) -> None:
    """Move one file (a copy and a delete on object stores, which have no rename)."""
    store = _store_io(src)
    if store is not None and uri.scheme(src) == uri.scheme(dst):
        store.rename(src, dst)
        return
    _ensure_options()
    FileSystems.rename([src], [dst])


def delete(locs: Sequence[str]) -> None:
    """Delete files (each must exist on a local disk; a missing object is no error)."""
    remote = [loc for loc in locs if is_remote(loc)]
    for loc in locs:
        if not is_remote(loc):
            os.remove(normalize(loc))
    if remote:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda loc: _store_io(loc).delete(loc), remote))


def delete_tree(loc: str) -> None:
    """Delete a folder and everything under it; nothing if it is not there."""
    target = normalize(loc)
    if not is_remote(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    delete(glob(target.rstrip("/") + "/**"))


def temp_name(base: str, prefix: str) -> str:
    """A fresh location ``base/<prefix><uuid>`` (unique per call, hence per attempt)."""
    return join(base, f"{prefix}{uuid.uuid4().hex}")


@contextlib.contextmanager
def local_copy(loc: str, suffix: str = "") -> Iterator[str]:
    """A local path holding ``loc``'s bytes for a reader that takes only local files (memory-
    mapped numpy arrays); ``loc`` itself when it is local.  Deleted on exit."""
    if not is_remote(loc):
        yield normalize(loc)
        return
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="vlp-beam-")
    os.close(fd)
    try:
        download(loc, tmp)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
