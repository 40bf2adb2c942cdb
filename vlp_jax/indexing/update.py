"""Incremental index update: new catalog lines in, delisted ids out, nothing else re-embedded.

    python -m vlp_jax.indexing.index --bundle=RUN/export --items=CATALOG/items.jsonl \
        --update_from=INDEX_V1 --out=INDEX_V2

The catalog file is the *whole* current catalog (what a full build would read).  Against the
serving index it splits into:

* **kept** items — same ``item_id`` and same source fingerprint (title, image paths, image file
  size and mtime): their embeddings and faiss labels are reused as they are;
* **added** and **changed** items — embedded now, under fresh labels (labels are never reused,
  so an HNSW tombstone can never hide a live item);
* **removed** items (delisted, changed, or now failing the builder's checks) — their labels
  leave the flat/IVF indexes and become tombstones in the HNSW graph, which is rebuilt from
  the stored embeddings once tombstones pass ``max_deleted_fraction`` of it.

The result is a new, complete index directory (``out`` must differ from the base: the base is
probably being served) whose rows are in catalog order, exactly like a full build's, so the
service swaps to it with ``POST /admin/reload?index=OUT``.  IVF keeps the base's trained
centroids; ``ann_trained_items`` in ``index_info.json`` says on how many items they were
trained, and a full build retrains them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import numpy as np

from vlp_jax.data import records
from vlp_jax.indexing import ann, index_files, item_embed, provenance
from vlp_jax.indexing import bundle as bundle_lib


def _load_base(directory: str, bundle: bundle_lib.Bundle) -> dict[str, Any]:
    info = ann.read_info(directory)
    legacy = int(info.get("format_version", 1)) < 2
    reason = provenance.mismatch(info, provenance.bundle_identity(bundle.manifest), directory)
    if reason is not None:
        raise ValueError(f"{reason}; mixing two models' embeddings in one index is meaningless: "
                         "run a full build")
    rows = ann.read_rows(directory)
    emb = np.load(os.path.join(directory, ann.EMBEDDINGS_FILE))
    if emb.shape[0] != len(rows):
        raise ValueError(f"{directory}: {emb.shape[0]} embeddings for {len(rows)} rows")
    indexes = {} if legacy else {
        kind: ann.read_index(os.path.join(directory, ann.index_file(kind)))
        for kind in info["indexes"]}
    tombstones = {kind: ann.read_tombstones(directory, kind) for kind in info["indexes"]}
    return {"info": info, "rows": rows, "emb": emb, "indexes": indexes,
            "tombstones": tombstones, "legacy": legacy}


def _unchanged(old: dict[str, Any], meta: records.ItemMeta, fingerprint: str) -> bool:
    if "source" in old:
        return old["source"] == fingerprint
    # Format-1 rows carry no fingerprint: same title and image path is the best evidence.
    return old["title"] == meta.title and old["image"] in meta.image_paths


def plan(rows: list[dict[str, Any]], metas: list[records.ItemMeta],
         base_dir: str) -> tuple[dict[int, int], list[int], dict[int, str]]:
    """``(kept: catalog position -> base row, to_embed: catalog positions, fingerprints)``."""
    by_id = {row["item_id"]: r for r, row in enumerate(rows)}
    kept, to_embed, prints = {}, [], {}
    for p, meta in enumerate(metas):
        prints[p] = item_embed.source_fingerprint(meta, base_dir)
        r = by_id.get(meta.item_id)
        if r is not None and _unchanged(rows[r], meta, prints[p]):
            kept[p] = r
        else:
            to_embed.append(p)
    return kept, to_embed, prints


def update_index_dir(bundle: bundle_lib.Bundle, items_path: str, base_index_dir: str,
                     out_dir: str, *, base_dir: str | None = None, batch_size: int = 256,
                     max_deleted_fraction: float = 0.2, progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir`` = the base index updated to the catalog ``items_path``; returns its
    ``index_info.json`` dict (``update`` holds what was kept, added, changed and removed)."""
    start = time.perf_counter()
    if os.path.realpath(out_dir) == os.path.realpath(base_index_dir):
        raise ValueError("--out must differ from --update_from: the base index may be serving; "
                         "write a new directory and swap to it")
    if not 0.0 <= max_deleted_fraction <= 1.0:
        raise ValueError(f"max_deleted_fraction must be in [0, 1], got {max_deleted_fraction}")
    if not os.path.isfile(items_path):
        raise ValueError(f"items file {items_path!r} does not exist")
    base = _load_base(base_index_dir, bundle)
    info0 = base["info"]
    base_dir = os.path.abspath(base_dir or os.path.dirname(os.path.abspath(items_path)))
    if os.path.abspath(info0["base_dir"]) != base_dir:
        raise ValueError(f"image base_dir changed ({info0['base_dir']} -> {base_dir}); stored "
                         "image paths would point elsewhere: run a full build")
    stats = records.SplitStats()
    metas, _ = records.parse_items(items_path, stats)
    kept, to_embed, prints = plan(base["rows"], metas, base_dir)
    from tqdm import tqdm  # ships with tensorflow-datasets

    with item_embed.worker_pool() as pool, tqdm(
            total=len(to_embed), unit="item", desc="embedding new items", disable=not progress,
            file=sys.stderr) as bar:
        res = item_embed.embed_metas(bundle, [metas[p] for p in to_embed], 0, base_dir,
                                     batch_size, pool, bar)
    stats.skipped.update(res["skipped"])
    stats.fixed.update(res["fixed"])
    embedded = {to_embed[int(i)]: j for j, i in enumerate(res["rows"])}
    next_id = int(info0.get("next_id", len(base["rows"])))
    new_positions = sorted(embedded)
    new_ids = np.arange(next_id, next_id + len(new_positions), dtype=np.int64)
    label_of_new = dict(zip(new_positions, new_ids, strict=True))
    final_pos = sorted(set(kept) | set(embedded))
    if not final_pos:
        raise ValueError(f"no usable item in {items_path}: skipped {dict(stats.skipped)}")
    old_ids = np.asarray([row["id"] for row in base["rows"]], np.int64)
    ids = np.asarray([old_ids[kept[p]] if p in kept else label_of_new[p] for p in final_pos],
                     np.int64)
    emb = np.stack([base["emb"][kept[p]] if p in kept else res["emb"][embedded[p]]
                    for p in final_pos]).astype(np.float32)
    new_emb = res["emb"][[embedded[p] for p in new_positions]] if new_positions else res["emb"]
    removed = np.setdiff1d(old_ids, ids)  # delisted, changed, or now failing the checks
    rows = [{"item_id": metas[p].item_id, "title": metas[p].title,
             "image": base["rows"][kept[p]]["image"] if p in kept
             else item_embed.shown_image(metas[p], base_dir, bundle.image_size),
             "source": prints[p]} for p in final_pos]

    params = ann.AnnParams(**info0.get("ann_params", {}))
    kinds = list(info0["indexes"])
    indexes, tombstones, rebuilt = {}, {}, []
    for kind in kinds:
        dead = np.union1d(base["tombstones"].get(kind, np.zeros(0, np.int64)), removed)
        index = base["indexes"].get(kind)
        total = (0 if index is None else index.ntotal) + len(new_ids)
        if index is None or (kind == "hnsw" and len(dead) > max_deleted_fraction * total):
            # Format-1 base (unlabelled) or too many HNSW tombstones: rebuild from the stored
            # embeddings; still no item is re-embedded.
            indexes[kind] = ann.build_index(emb, kind, params, ids=ids)
            rebuilt.append(kind)
            continue
        if kind == "hnsw":
            tombstones[kind] = dead
        else:
            gone = ann.remove_ids(index, kind, removed)
            if gone != len(removed):
                raise ValueError(f"{kind} index of {base_index_dir} lacks {len(removed) - gone} "
                                 "labels listed in its items.jsonl; run a full build")
        ann.add_vectors(index, new_emb, new_ids)
        indexes[kind] = index
    old_item_ids = {row["item_id"] for row in base["rows"]}
    changed = sum(1 for p in to_embed if metas[p].item_id in old_item_ids)
    summary = {"kept": len(kept), "added": len(to_embed) - changed, "changed": changed,
               "removed": int(len(removed)), "embedded": len(new_ids),
               "embed_failed": len(to_embed) - len(new_ids), "rebuilt": rebuilt}
    stats.kept = len(final_pos)
    counts = {**stats.as_dict(), "total_skipped": int(sum(stats.skipped.values()))}
    logging.info("index update: %s", summary)
    keep_keys = ("bundle", "bundle_step", "bundle_created_at", "bundle_fingerprint",
                 "ann_params", "base_dir")
    info = index_files.write_index_dir(out_dir, embeddings=emb, ids=ids, rows=rows,
                                       indexes=indexes, tombstones=tombstones, info={
        **{k: info0[k] for k in keep_keys if k in info0},
        "complete": True,
        "version": int(info0.get("version", 1)) + 1,
        "next_id": int(next_id + len(new_ids)),
        "ann_trained_items": (len(final_pos) if "ivf" in rebuilt
                              else info0.get("ann_trained_items", len(base["rows"]))),
        "items_path": os.path.abspath(items_path),
        "parent": {"directory": os.path.realpath(base_index_dir),
                   "version": int(info0.get("version", 1))},
        "update": summary,
        "counts": counts,
        "update_seconds": round(time.perf_counter() - start, 3),
    })
    return info
