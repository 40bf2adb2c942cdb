"""The build cache key: a hash of everything a dataset build reads.

Apart from ``tfds_builder`` so the single-process and the Beam build (``beam_pipeline``) name their
output folder identically: a dataset built by either is the other's cache hit.

On an object store (gs://, s3://) a file's "stat" is its size and version tag (ETag or GCS
generation) from one listing of the catalog folder, not one request per image: a re-uploaded
image gets a new tag, as a rewritten local file gets a new mtime.  Local catalogs hash exactly as
before, so existing caches stay valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any

from vlp_jax.data import records
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.runtime import fs, staging

BUILD_FORMAT = 1  # bump when records or build rules change: invalidates every cached build


def _hash_file(h: Any, path: str) -> None:
    with fs.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stat_keys(folder: str, names: list[str]) -> dict[str, str]:
    """``name → stat key`` of files under ``folder`` (relative names), local or remote."""
    if not fs.is_remote(folder):
        return {name: _stat_key(os.path.join(folder, name)) for name in names}
    listed = staging.listing(folder)  # one listing instead of a request per file
    out = {}
    for name in names:
        meta = listed.get(posixpath.normpath(name))
        out[name] = f"{meta['size']}:{meta['version']}" if meta else "missing"
    return out


def catalog_fingerprint(catalog_dir: str, image_size: int, tokenizer: str, vocab_size: int) -> str:
    """Hash of everything the build reads: jsonl contents, image and tokenizer-file stats, settings.

    Images are keyed by size + mtime rather than content: hashing every image would cost as much
    as decoding it, and a changed image file gets a new mtime.
    """
    h = hashlib.sha256()
    settings = {"format": BUILD_FORMAT, "image_size": image_size,
                "tokenizer": fs.normalize(tokenizer) if tokenizer else "",
                "vocab_size": vocab_size if not tokenizer else 0,  # + how the vocab is trained:
                "trainer": tokenizer_lib.WORDPIECE_TRAINER if not tokenizer else ""}
    h.update(json.dumps(settings, sort_keys=True).encode())
    image_refs: set[str] = set()
    for name in ("items",) + records.PAIR_SPLITS:
        path = fs.join(catalog_dir, f"{name}.jsonl")
        h.update(f"\n{name}:".encode())
        if not fs.exists(path):
            h.update(b"missing")
            continue
        _hash_file(h, path)
        if name == "items":
            for _, obj in records.iter_json_lines(path, records.SplitStats()):
                refs = [obj.get("image")] + (obj.get("images") or [] if isinstance(
                    obj.get("images"), list) else [])
                image_refs.update(r for r in refs if isinstance(r, str))
    keys = _stat_keys(fs.normalize(catalog_dir), sorted(image_refs))
    for ref in sorted(image_refs):
        h.update(f"\n{ref}={keys[ref]}".encode())
    if tokenizer and fs.isdir(tokenizer):
        names = fs.listdir(tokenizer)
        keys = _stat_keys(fs.normalize(tokenizer), names)
        for name in names:
            h.update(f"\ntok:{name}={keys[name]}".encode())
    return h.hexdigest()[:20]
