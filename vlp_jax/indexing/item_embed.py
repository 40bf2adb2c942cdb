"""Catalog items → embeddings with the dataset builder's rules: the shared core of the full
index build (``index.py``) and the incremental update (``update.py``).

Both jobs must keep exactly the items training would keep and embed them identically, so both
go through :func:`embed_metas`; an update that embedded differently from a rebuild would drift
from it a little more with every update.
"""

from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from vlp_jax.data import records
from vlp_jax.indexing import bundle as bundle_lib


def load_item(meta: records.ItemMeta, base_dir: str, size: int):
    """(image, fix notes, skip reason): the builder's decoder, so the same items are kept.

    Images are checked even for a text-only model: the builder skips unreadable ones, so the
    model never trained with such items and the index should not contain them either.
    """
    try:
        image, notes = records.load_item_image(base_dir, meta, size)
        return image, notes, None
    except records.BadRecord as e:
        return None, [], e.reason


def shown_image(meta: records.ItemMeta, base_dir: str, size: int) -> str:
    """The image path the item was embedded with (the first readable one, as the builder)."""
    if len(meta.image_paths) > 1:  # rare: re-find the fallback the decoder used
        for rel in meta.image_paths:
            try:
                records.load_image(os.path.join(base_dir, rel), size)
                return rel
            except records.BadRecord:
                continue
    return meta.image_paths[0]


def source_fingerprint(meta: records.ItemMeta, base_dir: str) -> str:
    """What an item's embedding depends on: title, image paths, and each image file's size and
    modification time (a stat, not a read, so fingerprinting 10^6 items costs seconds).

    An incremental update re-embeds an item exactly when this changes, so a replaced image file
    under the same name is noticed too.
    """
    h = hashlib.sha256(meta.title.encode("utf-8"))
    for rel in meta.image_paths:
        h.update(b"\0" + str(rel).encode("utf-8", "surrogatepass"))
        try:
            st = os.stat(os.path.join(base_dir, rel))
            h.update(f"\0{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()[:32]


def embed_metas(bundle: bundle_lib.Bundle, metas: list[records.ItemMeta], start: int,
                base_dir: str, batch_size: int, pool: ThreadPoolExecutor,
                bar: Any) -> dict[str, Any]:
    """Embed ``metas`` (candidate rows ``start..``); returns arrays + image-level counts.

    ``rows`` are the candidate positions that were kept (unreadable images are skipped and
    counted under the builder's reason names).
    """
    rows, embs = [], []
    skipped: collections.Counter = collections.Counter()
    fixed: collections.Counter = collections.Counter()
    for b0 in range(0, len(metas), batch_size):
        batch = metas[b0:b0 + batch_size]
        loaded = list(pool.map(lambda m: load_item(m, base_dir, bundle.image_size), batch))
        keep = [i for i, (_, _, reason) in enumerate(loaded) if reason is None]
        for _, notes, reason in loaded:
            fixed.update(notes)
            if reason is not None:
                skipped[reason] += 1
        if keep:
            images = np.stack([loaded[i][0] for i in keep]) if bundle.use_image else None
            embs.append(bundle.encode_item_arrays([batch[i].title for i in keep], images))
            rows.extend(start + b0 + i for i in keep)
        bar.update(len(batch))
    emb = np.concatenate(embs) if embs else np.zeros((0, bundle.embed_dim), np.float32)
    return {"emb": emb, "rows": np.asarray(rows, np.int64), "skipped": dict(skipped),
            "fixed": dict(fixed)}


def item_row(meta: records.ItemMeta, base_dir: str, image_size: int) -> dict[str, Any]:
    """The ``items.jsonl`` fields of a kept item (``row`` and ``id`` are added by the writer)."""
    return {"item_id": meta.item_id, "title": meta.title,
            "image": shown_image(meta, base_dir, image_size),
            "source": source_fingerprint(meta, base_dir)}


def worker_pool() -> ThreadPoolExecutor:
    """Image decoding threads (PIL releases the GIL while decoding)."""
    return ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
