"""The build cache key: a hash of everything a dataset build reads.

Apart from ``builder`` so the single-process and the Beam build (``beam_build``) name their
output folder identically: a dataset built by either is the other's cache hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from vlp_jax.data import records
from vlp_jax.data import tokenizer as tokenizer_lib

BUILD_FORMAT = 1  # bump when records or build rules change: invalidates every cached build


def _hash_file(h: Any, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def catalog_fingerprint(catalog_dir: str, image_size: int, tokenizer: str, vocab_size: int) -> str:
    """Hash of everything the build reads: jsonl contents, image and tokenizer-file stats, settings.

    Images are keyed by size + mtime rather than content: hashing every image would cost as much
    as decoding it, and a changed image file gets a new mtime.
    """
    h = hashlib.sha256()
    settings = {"format": BUILD_FORMAT, "image_size": image_size,
                "tokenizer": os.path.abspath(tokenizer) if tokenizer else "",
                "vocab_size": vocab_size if not tokenizer else 0,  # + how the vocab is trained:
                "trainer": tokenizer_lib.WORDPIECE_TRAINER if not tokenizer else ""}
    h.update(json.dumps(settings, sort_keys=True).encode())
    image_refs: set[str] = set()
    for name in ("items",) + records.PAIR_SPLITS:
        path = os.path.join(catalog_dir, f"{name}.jsonl")
        h.update(f"\n{name}:".encode())
        if not os.path.isfile(path):
            h.update(b"missing")
            continue
        _hash_file(h, path)
        if name == "items":
            for _, obj in records.iter_json_lines(path, records.SplitStats()):
                refs = [obj.get("image")] + (obj.get("images") or [] if isinstance(
                    obj.get("images"), list) else [])
                image_refs.update(r for r in refs if isinstance(r, str))
    for ref in sorted(image_refs):
        h.update(f"\n{ref}={_stat_key(os.path.join(catalog_dir, ref))}".encode())
    if tokenizer and os.path.isdir(tokenizer):
        for name in sorted(os.listdir(tokenizer)):
            path = os.path.join(tokenizer, name)
            h.update(f"\ntok:{name}={_stat_key(path)}".encode())
    return h.hexdigest()[:20]
