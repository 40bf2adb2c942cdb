"""A damaged TFDS build (a shard file missing or truncated) is named before training starts.

Why: array_record files are opened lazily, so a truncated or deleted shard used to surface as
``RuntimeError: ArrayRecord file should be at least 64KB big`` from inside a Grain worker at
the first batch, naming neither the file nor the fix.  A finished build folder is only ever
created by an atomic rename (``data.build.tfds_builder``), so damage means something outside
the build touched it: a disk error, a partial copy or sync, a hand edit.

``check_build`` opens every shard listed in the build's ``dataset_info.json``, compares its
record count with the count TFDS recorded and reads its last record; a failure raises
``DatasetCorruptError`` naming the file and the way out (``--rebuild_data``, which deletes the
build and makes it again from the catalog).  Cost: one footer and one record per shard
(milliseconds for the built-in catalogs).

A build on object storage is checked on its local copy (``store_commit``); ``location`` and
``files_at`` make the messages name the store's URIs, not the copy's paths.
"""

from __future__ import annotations

import os

from vlp_jax.runtime import fs

DATASET_DAMAGED_EXIT = 7
INFO_FILE = "dataset_info.json"


class DatasetCorruptError(RuntimeError):
    """A shard of a finished build is missing or unreadable; the message says how to rebuild."""

    def __init__(self, dataset_dir: str, path: str, problem: str):
        self.dataset_dir, self.path, self.problem = dataset_dir, path, problem
        super().__init__(
            f"dataset build {dataset_dir} is damaged: {path} {problem}. Rebuild it: rerun the "
            "same command with --rebuild_data (deletes this build folder and builds it again "
            "from the catalog), or delete the folder yourself.")


def shard_files(dataset_dir: str) -> list[tuple[str, int]]:
    """``(path, expected record count)`` of every shard ``dataset_info.json`` lists."""
    info = fs.read_json(fs.join(dataset_dir, INFO_FILE))
    name, file_format = info["name"], info.get("fileFormat", "array_record")
    out = []
    for split in info.get("splits", []):
        lengths = [int(n) for n in split.get("shardLengths", [])]
        template = split.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
        for i, length in enumerate(lengths):
            filename = (template.replace("{DATASET}", name).replace("{SPLIT}", split["name"])
                        .replace("{FILEFORMAT}", file_format)
                        .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"))
            out.append((fs.join(dataset_dir, filename), length))
    return out


def _problem(path: str, expected: int) -> str | None:
    """What is wrong with one shard, or None."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    try:
        reader = ArrayRecordReader(path)
        try:
            count = reader.num_records()
            if count != expected:
                return (f"holds {count} records, {expected} expected "
                        f"(truncated? {size} bytes)")
            if count:
                reader.read([count - 1])
        finally:
            reader.close()
    except Exception as err:  # noqa: BLE001 - any read failure is damage; name it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"is unreadable ({type(err).__name__}: {first[:200]}; {size} bytes)"
    return None


def check_build(dataset_dir: str, *, location: str = "", files_at: str = "") -> None:
    """Raise ``DatasetCorruptError`` for the first missing, truncated or unreadable shard.

    ``dataset_dir`` is a local folder; ``location`` names the build in messages and
    ``files_at`` is where its files really are (both default to ``dataset_dir``)."""
    if fs.is_remote(dataset_dir):  # ArrayRecord cannot open s3:// and reads gs:// per record
        raise ValueError(f"check_build reads a local copy, not {dataset_dir}: stage it first "
                         "(store_commit.stage_build)")
    location = location or dataset_dir
    files_at = files_at or dataset_dir

    def named(path: str) -> str:
        return fs.join(files_at, os.path.relpath(path, dataset_dir).replace(os.sep, "/"))

    try:
        files = shard_files(dataset_dir)
    except (OSError, ValueError, KeyError) as err:
        raise DatasetCorruptError(location, fs.join(files_at, INFO_FILE),
                                  f"is missing or unreadable ({err})") from err
    for path, expected in files:
        problem = _problem(path, expected)
        if problem:
            raise DatasetCorruptError(location, named(path), problem)
