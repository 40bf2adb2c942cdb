"""Offline item embedding + faiss index: the catalog side of serving.

    python -m vlp_jax.indexing.index --bundle=RUN/export --items=CATALOG/items.jsonl --out=DIR \
        [--ann=hnsw|ivf|none] [--batch_size=256] [--hnsw_m=32 ...]

Streams the catalog through the item tower in batches (sharded over the local devices), with a
progress bar, and writes the index directory described in ``ann.py``.

* **Bad records** are skipped and counted with the dataset builder's rules and reason names
  (``records.parse_items`` for text-level problems, ``records.load_item_image`` for images), and
  the counts are logged and stored in ``index_info.json``; they never stop the job.
* **Resumable.**  Items are processed in fixed chunks of ``--chunk_size`` candidate records, each
  written atomically to ``DIR/chunks/`` with its own counts.  A rerun with the same bundle and
  items file skips finished chunks, so an interrupted job costs at most one chunk; a rerun with
  a different bundle or items file refuses to mix results unless ``--overwrite``.
* **Incremental.**  ``--update_from=OLD_INDEX`` embeds only the catalog's new and changed items
  and removes delisted ones, writing a new directory ``--out`` (``update.py``); the base index's
  ANN kind and parameters are kept (``--ann`` and the ANN flags apply to full builds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags

from vlp_jax.data import records
from vlp_jax.indexing import ann, index_files, item_embed, locations, provenance, update
from vlp_jax.indexing import bundle as bundle_lib
from vlp_jax.runtime import atomic_io, staging, storage

CHUNKS_DIR = "chunks"
JOB_FILE = "job.json"


def _file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _job_identity(bundle: bundle_lib.Bundle, items_path: str, base_dir: str,
                  chunk_size: int) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption."""
    return {
        "bundle": bundle.path,
        "bundle_created_at": bundle.manifest.get("created_at"),
        "bundle_step": bundle.step,
        "items": os.path.abspath(items_path),
        "items_sha256": _file_fingerprint(items_path),
        "base_dir": base_dir,
        "chunk_size": int(chunk_size),
    }


def _prepare_out(out_dir: str, identity: dict[str, Any], overwrite: bool) -> str:
    chunks = os.path.join(out_dir, CHUNKS_DIR)
    job_path = os.path.join(chunks, JOB_FILE)
    if os.path.isfile(job_path):
        with open(job_path) as f:
            previous = json.load(f)
        if previous != identity:
            if not overwrite:
                changed = sorted(k for k in identity if previous.get(k) != identity[k])
                raise ValueError(
                    f"{chunks} holds partial results of a different job (changed: {changed}); "
                    "pass --overwrite to discard them")
            shutil.rmtree(chunks)
    os.makedirs(chunks, exist_ok=True)
    if not os.path.isfile(job_path):
        with atomic_io.replacing(job_path) as tmp, open(tmp, "w") as f:
            json.dump(identity, f, indent=2, sort_keys=True)
    return chunks


def _chunk_path(chunks_dir: str, c: int) -> str:
    return os.path.join(chunks_dir, f"chunk_{c:06d}.npz")


def _save_chunk(path: str, chunk: dict[str, Any]) -> None:
    with atomic_io.replacing(path, ".tmp.npz") as tmp:
        np.savez(tmp, emb=chunk["emb"], rows=chunk["rows"], counts=np.asarray(
            json.dumps({"skipped": chunk["skipped"], "fixed": chunk["fixed"]})))


def _read_chunk(path: str) -> dict[str, Any]:
    with np.load(path) as z:
        counts = json.loads(str(z["counts"]))
        return {"emb": z["emb"], "rows": z["rows"], **counts}


def embed_catalog(
    bundle: bundle_lib.Bundle,
    items_path: str,
    out_dir: str,
    *,
    base_dir: str | None = None,
    batch_size: int = 256,
    chunk_size: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
    max_chunks: int | None = None,
) -> dict[str, Any]:
    """Embed every good item of ``items_path``; returns embeddings, rows and counts.

    ``max_chunks`` stops after that many *newly computed* chunks (used to simulate an
    interruption); the result then has ``"complete": False``.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if not os.path.isfile(items_path):
        raise ValueError(f"items file {items_path!r} does not exist")
    base_dir = os.path.abspath(base_dir or os.path.dirname(os.path.abspath(items_path)))
    stats = records.SplitStats()
    metas, _ = records.parse_items(items_path, stats)
    identity = _job_identity(bundle, items_path, base_dir, chunk_size)
    chunks_dir = _prepare_out(out_dir, identity, overwrite)
    num_chunks = -(-len(metas) // chunk_size)
    from tqdm import tqdm  # ships with tensorflow-datasets

    computed = reused = 0
    parts = []
    with item_embed.worker_pool() as pool, tqdm(
        total=len(metas), unit="item", desc="embedding items", disable=not progress,
        file=sys.stderr,
    ) as bar:
        for c in range(num_chunks):
            path = _chunk_path(chunks_dir, c)
            if os.path.isfile(path):
                parts.append(_read_chunk(path))
                reused += 1
                bar.update(min(chunk_size, len(metas) - c * chunk_size))
                continue
            if max_chunks is not None and computed >= max_chunks:
                break
            start = c * chunk_size
            chunk = item_embed.embed_metas(bundle, metas[start:start + chunk_size], start,
                                           base_dir, batch_size, pool, bar)
            _save_chunk(path, chunk)
            parts.append(chunk)
            computed += 1
    complete = len(parts) == num_chunks
    for part in parts:
        stats.skipped.update(part["skipped"])
        stats.fixed.update(part["fixed"])
    rows = np.concatenate([p["rows"] for p in parts]) if parts else np.zeros(0, np.int64)
    emb = (np.concatenate([p["emb"] for p in parts]) if parts
           else np.zeros((0, bundle.embed_dim), np.float32))
    stats.kept = int(rows.size)
    return {"embeddings": emb, "rows": rows, "metas": metas, "stats": stats,
            "base_dir": base_dir, "complete": complete, "chunks_computed": computed,
            "chunks_reused": reused, "num_chunks": num_chunks}


def build_index_dir(
    bundle: bundle_lib.Bundle,
    items_path: str,
    out_dir: str,
    *,
    ann_kind: str = "hnsw",
    ann_params: ann.AnnParams | None = None,
    keep_chunks: bool = False,
    **embed_kwargs: Any,
) -> dict[str, Any]:
    """Embed the catalog and write the index directory; returns the ``index_info.json`` dict
    (``{"complete": False, ...}`` without an index if the embedding stopped early)."""
    if ann_kind not in ("none", "hnsw", "ivf"):
        raise ValueError(f"ann must be 'none', 'hnsw' or 'ivf', got {ann_kind!r}")
    ann_params = ann_params or ann.AnnParams()
    ann_params.validate()
    start = time.perf_counter()
    index_files.begin(out_dir)  # the directory is "finished" again only when rewritten
    res = embed_catalog(bundle, items_path, out_dir, **embed_kwargs)
    stats = res["stats"]
    counts = {**stats.as_dict(), "total_skipped": int(sum(stats.skipped.values()))}
    if not res["complete"]:
        return {"complete": False, "counts": counts, "chunks_computed": res["chunks_computed"],
                "chunks_reused": res["chunks_reused"], "num_chunks": res["num_chunks"]}
    if stats.skipped:
        logging.warning("index: %d of %d item lines skipped: %s", counts["total_skipped"],
                        stats.lines, counts["skipped"])
    if not res["rows"].size:
        raise ValueError(f"no usable item in {items_path}: skipped {counts['skipped']}")
    embed_seconds = time.perf_counter() - start
    emb, metas = res["embeddings"], res["metas"]
    rows = [item_embed.item_row(metas[int(r)], res["base_dir"], bundle.image_size)
            for r in res["rows"]]
    ids = np.arange(len(rows), dtype=np.int64)  # a fresh build labels rows 0..N-1
    kinds = ["flat"] + ([] if ann_kind == "none" else [ann_kind])
    indexes, build_seconds = index_files.build_indexes(emb, ids, kinds, ann_params)
    info = index_files.write_index_dir(out_dir, embeddings=emb, ids=ids, rows=rows,
                                       indexes=indexes, tombstones={}, info={
        "complete": True,
        "version": 1,
        "next_id": len(rows),
        "ann_params": dict(vars(ann_params)),
        "ann_trained_items": len(rows),
        "base_dir": res["base_dir"],
        "items_path": os.path.abspath(items_path),
        "bundle": bundle.path,
        "bundle_step": bundle.step,
        "bundle_created_at": bundle.manifest.get("created_at"),
        "bundle_fingerprint": provenance.bundle_fingerprint(bundle.manifest),
        "counts": counts,
        "chunks_computed": res["chunks_computed"],
        "chunks_reused": res["chunks_reused"],
        "embed_seconds": round(embed_seconds, 3),
        "build_seconds": build_seconds,
        "items_per_sec": round(emb.shape[0] / embed_seconds, 1) if embed_seconds > 0 else None,
    })
    if not keep_chunks:
        shutil.rmtree(os.path.join(out_dir, CHUNKS_DIR), ignore_errors=True)
    return info


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("bundle", None, "Serving bundle directory (RUN/export).")
    flags.DEFINE_string("items", None, "items.jsonl in the data format.")
    flags.DEFINE_string("out", None, "Output index directory.")
    flags.DEFINE_string("base_dir", "", "Directory image paths are relative to "
                        "(default: the items file's directory).")
    flags.DEFINE_enum("ann", "hnsw", ["none", "hnsw", "ivf"], "Approximate index besides flat.")
    flags.DEFINE_integer("batch_size", 256, "Items per encoder call (split over local devices).")
    flags.DEFINE_integer("chunk_size", 8192, "Items per resumable chunk.")
    flags.DEFINE_integer("num_devices", 0, "Local devices to use (0 = all).")
    defaults = ann.AnnParams()
    flags.DEFINE_integer("hnsw_m", defaults.hnsw_m, "HNSW graph degree M.")
    flags.DEFINE_integer("hnsw_ef_construction", defaults.hnsw_ef_construction,
                         "HNSW efConstruction.")
    flags.DEFINE_integer("hnsw_ef_search", defaults.hnsw_ef_search, "HNSW efSearch.")
    flags.DEFINE_integer("ivf_nlist", defaults.ivf_nlist, "IVF cells (0 = 4*sqrt(N)).")
    flags.DEFINE_integer("ivf_nprobe", defaults.ivf_nprobe, "IVF cells probed per query.")
    flags.DEFINE_bool("overwrite", False, "Discard partial results of a different job.")
    flags.DEFINE_bool("keep_chunks", False, "Keep DIR/chunks/ after success.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_string("update_from", "", "Existing index directory to update incrementally "
                        "(only new/changed items are embedded); --out must be a new directory.")
    flags.DEFINE_float("max_deleted_fraction", 0.2, "With --update_from: rebuild the HNSW graph "
                       "(from stored embeddings) once removed items exceed this fraction of it.")
    flags.DEFINE_string("cache_dir", "", "Local folder for a gs:// or s3:// --bundle / "
                        "--update_from (staged) and --out (built here, then published); "
                        f"default ${locations.CACHE_ENV} or ~/.cache/vlp_jax/serve.")
    flags.mark_flags_as_required(["bundle", "items", "out"])


def _main(argv: list[str]) -> None:
    """Run the job; a full disk ends it with one ``error:`` line and exit status 6."""
    try:
        _run(argv)
    except Exception as err:
        if not storage.is_disk_full(err):
            raise
        out = os.path.abspath(FLAGS.out)
        chunks = os.path.join(out, CHUNKS_DIR)
        kept = (f"; finished chunks stay in {chunks} and the rerun continues from them"
                if os.path.isdir(chunks) else "")
        print(f"error: could not write the index to {out}: {storage.reason(err)}; "
              f"{storage.describe_free(out)} on its filesystem. The directory has no "
              f"{ann.INFO_FILE}, so nothing loads it{kept}. Free space, then rerun the same "
              "command.", file=sys.stderr, flush=True)
        sys.exit(storage.DISK_FULL_EXIT)


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vlp_jax.runtime import devices as runtime

    runtime.quiet_library_logs()
    for name in ("items", "base_dir"):
        if locations.is_remote(getattr(FLAGS, name)):
            raise app.UsageError(f"--{name} must be a local path (the catalog and its images are "
                                 "read locally; copy them to this host, or use the Beam job)")
    cache = FLAGS.cache_dir or locations.default_cache_dir()
    out = FLAGS.out
    if locations.is_remote(out):  # built locally (resumable there), published when finished
        FLAGS.out = staging.cache_dir_for(out, cache) + ".build"
    _build(locations.stage_bundle(FLAGS.bundle, cache),
           FLAGS.update_from and locations.stage_index(FLAGS.update_from, cache))
    if FLAGS.out != out:
        locations.publish_dir(FLAGS.out, out, last=ann.INFO_FILE, skip=(CHUNKS_DIR,))
        print(f"published to {out}")


def _build(bundle_dir: str, update_from: str) -> None:
    bundle = bundle_lib.load_bundle(bundle_dir, towers=("item",),
                                    num_devices=FLAGS.num_devices or None,
                                    buckets=(FLAGS.batch_size,))
    if update_from:
        info = update.update_index_dir(
            bundle, FLAGS.items, update_from, FLAGS.out, base_dir=FLAGS.base_dir or None,
            batch_size=bundle.buckets[-1], max_deleted_fraction=FLAGS.max_deleted_fraction,
            progress=FLAGS.progress)
        print(json.dumps({k: info[k] for k in ("num_items", "version", "update", "counts",
                                               "update_seconds")}, indent=2))
        return
    params = ann.AnnParams(
        hnsw_m=FLAGS.hnsw_m, hnsw_ef_construction=FLAGS.hnsw_ef_construction,
        hnsw_ef_search=FLAGS.hnsw_ef_search, ivf_nlist=FLAGS.ivf_nlist,
        ivf_nprobe=FLAGS.ivf_nprobe,
    )
    info = build_index_dir(
        bundle, FLAGS.items, FLAGS.out, ann_kind=FLAGS.ann, ann_params=params,
        keep_chunks=FLAGS.keep_chunks, base_dir=FLAGS.base_dir or None,
        batch_size=bundle.buckets[-1], chunk_size=FLAGS.chunk_size, overwrite=FLAGS.overwrite,
        progress=FLAGS.progress,
    )
    print(json.dumps({k: info[k] for k in ("num_items", "counts", "build_seconds",
                                           "embed_seconds", "items_per_sec")}, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
