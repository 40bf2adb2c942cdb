"""File access for the Beam jobs, through ``apache_beam.io.filesystems.FileSystems`` only.

Beam workers on a cluster share no disk with the driver or with each other, so every input,
output and temporary file of the Beam dataset build and the Beam embedding job is named by a
location every worker can open — a local path (local runners, or a shared mount), ``gs://`` or
``s3://`` — and opened through Beam's own filesystem layer.  That layer is configured by the
pipeline options (``--s3_endpoint_url``, ``--s3_access_key_id``, ``--s3_secret_access_key``,
``--s3_region_name``; on GCS the VM's or ``GOOGLE_APPLICATION_CREDENTIALS``' account), which
Beam hands to every worker; :func:`configure` applies the same options in the driver.

One exception to "through ``FileSystems``": Beam's S3 filesystem builds a new boto3 client —
0.3–0.9 s of loading service models on this machine — for *every* call, which for one image
read per item would dominate a build.  Single-object calls on ``s3://`` (open, create, exists,
size, rename) therefore go through one ``apache_beam.io.aws.s3io.S3IO`` per process, made from
the same pipeline options — the object ``FileSystems`` would have made, kept.

Writes never leave half a file under its final name:
- locally, data goes to ``<name>.tmp-<uuid>`` renamed over the target — a unique name per
  attempt, so a retried or duplicated task (the runner may run one twice at once) never
  collides with the other attempt's temporary file;
- on an object store, one upload that the store publishes only once complete (GCS and S3 never
  show a partial object); a second attempt replaces it with the same bytes.
"""

from __future__ import annotations

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


_S3IO: dict[int, Any] = {}


def _s3io() -> Any:
    """One ``S3IO`` (one boto3 client) per process and set of pipeline options."""
    _ensure_options()
    options = FileSystems._pipeline_options  # noqa: SLF001 - what Beam's S3 filesystem uses
    key = id(options)
    if key not in _S3IO:
        from apache_beam.io.aws import s3io

        _S3IO.clear()
        _S3IO[key] = s3io.S3IO(options=options)
    return _S3IO[key]


def _is_s3(loc: str) -> bool:
    return uri.scheme(loc) == "s3"


def normalize(loc: str) -> str:
    """Absolute local path or ``gs://``/``s3://`` URI (anything else refused, naming it)."""
    return uri.normalize(loc)


def join(base: str, *parts: str) -> str:
    return uri.join(base, *parts)


def is_remote(loc: str) -> bool:
    return uri.is_remote(loc)


def exists(loc: str) -> bool:
    if _is_s3(loc):
        return _s3io().exists(loc)
    _ensure_options()
    return FileSystems.exists(loc)


def size(loc: str) -> int:
    """Bytes in a file; FileNotFoundError naming it if it is not there."""
    if _is_s3(loc):
        if not _s3io().exists(loc):
            raise FileNotFoundError(f"{loc} does not exist")
        return int(_s3io().size(loc))
    _ensure_options()
    found = FileSystems.match([loc])[0].metadata_list
    if not found:
        raise FileNotFoundError(f"{loc} does not exist")
    return int(found[0].size_in_bytes)


def listing(pattern: str) -> list[Any]:
    """``FileMetadata`` (path, size_in_bytes, last_updated_in_seconds) of every file matching
    a glob (``*`` within a folder, ``**`` across folders), sorted by path; [] if none."""
    _ensure_options()
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception as err:  # Beam raises BeamIOError for "nothing matched" on some stores
        if "No files found" in str(err) or "match" in type(err).__name__.lower():
            return []
        raise
    return sorted(found, key=lambda m: m.path)


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern``, sorted."""
    return [m.path for m in listing(pattern)]


def open_read(loc: str) -> IO[bytes]:
    """A seekable binary reader (ranged reads on object stores)."""
    if _is_s3(loc):
        return _s3io().open(loc, "rb")
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
        writer = (_s3io().open(target, "wb") if _is_s3(target)
                  else FileSystems.create(target, compression_type=_RAW))
        with writer as f:
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
    if _is_s3(src) and _is_s3(dst):
        _s3io().rename(src, dst)
        return
    _ensure_options()
    FileSystems.rename([src], [dst])


def delete(locs: Sequence[str]) -> None:
    """Delete files (each must exist)."""
    _ensure_options()
    FileSystems.delete(list(locs))


def delete_tree(loc: str) -> None:
    """Delete a folder and everything under it; nothing if it is not there."""
    target = normalize(loc)
    if not is_remote(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    paths = glob(target.rstrip("/") + "/**")
    if paths:
        FileSystems.delete(paths)


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
