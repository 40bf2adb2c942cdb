"""Writing an index directory (format in ``ann.py``): every file atomically, ``index_info.json``
last, so a reader (a service reloading the directory) sees either the previous finished index or
"not finished" — never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlp_jax.indexing import ann, locations
from vlp_jax.runtime import atomic_io


def _atomic_npy(path: str, array: np.ndarray) -> None:
    with atomic_io.replacing(path, ".tmp.npy") as tmp:
        np.save(tmp, array)


def _atomic_text(path: str, lines: Sequence[str]) -> None:
    with atomic_io.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def begin(out_dir: str) -> None:
    """Mark ``out_dir`` unfinished (remove its info file) before any other file changes."""
    os.makedirs(out_dir, exist_ok=True)
    info_path = os.path.join(out_dir, ann.INFO_FILE)
    if os.path.exists(info_path):
        os.remove(info_path)


def write_index_dir(out_dir: str, *, embeddings: np.ndarray, ids: np.ndarray,
                    rows: Sequence[Mapping[str, Any]], indexes: Mapping[str, Any],
                    tombstones: Mapping[str, np.ndarray], info: dict[str, Any]) -> dict[str, Any]:
    """Write a complete index directory; returns the info dict as written.

    ``rows[r]`` describes ``embeddings[r]`` (label ``ids[r]``); ``indexes`` maps each built kind
    to its faiss index (``"flat"`` first); ``tombstones`` the HNSW labels removed but still in
    the graph.
    """
    n = len(rows)
    if embeddings.shape[0] != n or ids.shape != (n,):
        raise ValueError(f"{n} rows but {embeddings.shape[0]} embeddings and {ids.shape} ids")
    if len(np.unique(ids)) != n:
        raise ValueError("item ids (faiss labels) must be unique")
    begin(out_dir)
    _atomic_npy(os.path.join(out_dir, ann.EMBEDDINGS_FILE),
                np.ascontiguousarray(embeddings, np.float32))
    _atomic_text(os.path.join(out_dir, ann.ITEMS_FILE), [
        json.dumps({"row": r, "id": int(label),
                    **{k: v for k, v in row.items() if k not in ("row", "id")}},
                   ensure_ascii=False) + "\n"
        for r, (label, row) in enumerate(zip(ids, rows, strict=True))])
    for kind, index in indexes.items():
        ann.write_index(index, os.path.join(out_dir, ann.index_file(kind)))
    for kind in ann.KINDS:  # stale tombstones of an earlier build must not filter this one
        path = os.path.join(out_dir, ann.tombstone_file(kind))
        dead = tombstones.get(kind)
        if dead is not None and len(dead):
            _atomic_npy(path, np.asarray(sorted(dead), np.int64))
        elif os.path.exists(path):
            os.remove(path)
    written = [ann.EMBEDDINGS_FILE, ann.ITEMS_FILE, *(ann.index_file(k) for k in indexes),
               *(ann.tombstone_file(k) for k, v in tombstones.items() if len(v))]
    info = {**info, "format_version": ann.FORMAT_VERSION, "indexes": list(indexes),
            "files": locations.digests(out_dir, written),  # checked when staged from a store
            "num_items": n, "embed_dim": int(embeddings.shape[1]),
            "tombstones": {k: int(len(v)) for k, v in tombstones.items() if len(v)}}
    with atomic_io.replacing(os.path.join(out_dir, ann.INFO_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


def build_indexes(embeddings: np.ndarray, ids: np.ndarray, kinds: Sequence[str],
                  params: ann.AnnParams) -> tuple[dict[str, Any], dict[str, float]]:
    """Every kind's faiss index over ``embeddings`` labelled ``ids``, and build seconds."""
    indexes, seconds = {}, {}
    for kind in kinds:
        indexes[kind], took = ann.timed(ann.build_index, embeddings, kind, params, ids=ids)
        seconds[kind] = round(took, 3)
    return indexes, seconds
