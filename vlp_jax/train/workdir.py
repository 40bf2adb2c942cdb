"""Where a run lives: a local folder or a gs:// prefix, checked before any work starts.

A typo in a bucket name or a missing credential must cost a second, not a dataset build and a
compile, so the location is normalised and listed first (``fs.check_access``).  An ``s3://``
workdir is refused with the reason: Orbax 0.12 writes a checkpoint into a temporary directory and
renames it, S3 has no rename, and Orbax refuses s3:// paths outright; patching Orbax's private
functions is not an option.  Everything else of a run may still be on S3 (the catalog, the
dataset cache, exports, indexes); docs/pods.md says which backend each path supports.
"""

from __future__ import annotations

import ml_collections

from vlp_jax.runtime import fs


def resolve(workdir: str, config: ml_collections.ConfigDict | None = None) -> str:
    """The canonical workdir (absolute path or URI); raises ``fs.StorageAccessError`` naming it
    (or the object-store data location of ``config.data``) if it cannot be used."""
    loc = fs.normalize(workdir)
    if fs.scheme(loc) == "s3":
        raise fs.StorageAccessError(
            f"--workdir={loc}: checkpoints cannot be written to s3:// (Orbax writes a checkpoint "
            "by renaming a temporary directory, which S3 does not have, and refuses s3:// "
            "paths). Use a gs:// workdir or a local/shared filesystem for the run; the catalog, "
            "data.cache_dir, exports and indexes may stay on s3://.")
    loc = fs.check_access(loc, "--workdir")
    if config is not None:
        for key in ("catalog_dir", "cache_dir"):  # the data locations, also before any work
            where = config.data[key]
            if where and fs.is_remote(where):
                fs.check_access(where, f"data.{key}")
    return loc
