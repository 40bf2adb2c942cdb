"""The index step of the Beam embedding job: the index directory from the workers' chunk files.

The single-process job (``index.build_index_dir``) concatenates every embedding and every
parsed catalog line in memory before it builds.  Here the driver streams the chunk files the
Beam workers wrote, one at a time, in chunk order:

1. ``ivf`` only: the k-means training sample — the same rows ``ann.build_index`` would pick
   (``default_rng(0).choice(N, train_sample)``, in that order), gathered from the chunks, so the
   trained quantizer equals the single-process job's;
2. every chunk's embeddings are added to each index with their labels (row numbers), appended
   to ``embeddings.npy`` (a memory-mapped local file) and its item rows to ``items.jsonl``.

The driver holds one chunk, the sample and the faiss indexes themselves (an exact index holds
every vector: 4·d bytes per item); never the catalog.  Files are written to a local folder
(faiss writes local files) and published into the output — local or ``gs://``/``s3://`` —
``index_info.json`` last, so a reader sees the previous finished index or "not finished".

Chunk files are the single-process job's (``emb``, ``rows``, ``counts``) plus ``items``: the
kept rows' ``items.jsonl`` fields, computed by the worker that embedded them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlp_jax.data.build import beam_io
from vlp_jax.indexing import ann

CHUNK_FILE = "chunk_{chunk:06d}.npz"


def chunk_bytes(result: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> bytes:
    """One chunk file: ``item_embed.embed_metas``' result and the kept rows' item fields."""
    buf = io.BytesIO()
    np.savez(buf, emb=result["emb"], rows=result["rows"], counts=np.asarray(
        json.dumps({"skipped": result["skipped"], "fixed": result["fixed"]})),
        items=np.asarray(json.dumps(list(items), ensure_ascii=False)))
    return buf.getvalue()


def read_chunk(loc: str) -> dict[str, Any]:
    """A chunk file's arrays and counts; ``items`` is None for a file without them (written by
    the single-process job, whose chunk files are otherwise the same)."""
    with np.load(io.BytesIO(beam_io.read_bytes(loc))) as z:
        out = {"emb": z["emb"], "rows": z["rows"], **json.loads(str(z["counts"]))}
        out["items"] = json.loads(str(z["items"])) if "items" in z.files else None
    return out


def _empty_index(kind: str, dim: int, n: int, params: ann.AnnParams,
                 sample: np.ndarray | None) -> Any:
    """An index of ``kind`` with nothing added yet, built as ``ann.build_index`` builds it for
    ``n`` vectors (ivf: trained on ``sample``)."""
    faiss = ann._faiss()  # noqa: SLF001 - the one import point of the optional dependency
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params.hnsw_ef_construction
        inner.hnsw.efSearch = params.hnsw_ef_search
        return faiss.IndexIDMap2(inner)
    nlist = ann.ivf_nlist(n, params.ivf_nlist)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, np.float32))
    index.nprobe = min(params.ivf_nprobe, nlist)  # faiss's wrapper keeps `quantizer` alive
    return index


def _ivf_training_rows(chunk_paths: Sequence[str], kept: Sequence[int],
                       params: ann.AnnParams) -> np.ndarray:
    """The rows ``ann.build_index`` trains IVF on, in its order: every row when there are at
    most ``train_sample``, else ``default_rng(0).choice(N, train_sample)`` — read chunk by
    chunk, keeping only those rows."""
    n = int(sum(kept))
    if n <= params.train_sample:
        return np.concatenate([read_chunk(p)["emb"] for p, k in zip(chunk_paths, kept,
                                                                      strict=True) if k])
    want = np.random.default_rng(0).choice(n, params.train_sample, False)
    order = np.argsort(want)
    sorted_rows = want[order]
    picked: np.ndarray | None = None
    start = 0
    for path, count in zip(chunk_paths, kept, strict=True):
        lo, hi = np.searchsorted(sorted_rows, [start, start + count])
        if hi > lo:
            emb = read_chunk(path)["emb"]
            if picked is None:
                picked = np.empty((len(want), emb.shape[1]), np.float32)
            picked[order[lo:hi]] = emb[sorted_rows[lo:hi] - start]
        start += count
    assert picked is not None
    return picked


def build_from_chunks(chunk_paths: Sequence[str], kept: Sequence[int], dim: int, out_dir: str,
                      *, kinds: Sequence[str], params: ann.AnnParams,
                      info: dict[str, Any]) -> dict[str, Any]:
    """Write the index directory ``out_dir`` from the chunk files (their kept row counts in
    ``kept``); returns the ``index_info.json`` dict as written."""
    n = int(sum(kept))
    out_dir = beam_io.normalize(out_dir)
    remote = beam_io.is_remote(out_dir)
    if not remote:
        os.makedirs(out_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".beam-index-", dir=None if remote else out_dir)
    try:
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        train = _ivf_training_rows(chunk_paths, kept, params) if "ivf" in kinds else None
        indexes = {kind: _empty_index(kind, dim, n, params, train) for kind in kinds}
        del train
        seconds["ivf_train"] = time.perf_counter() - t0
        embeddings = np.lib.format.open_memmap(os.path.join(scratch, ann.EMBEDDINGS_FILE),
                                               mode="w+", dtype=np.float32, shape=(n, dim))
        start = 0
        with open(os.path.join(scratch, ann.ITEMS_FILE), "w", encoding="utf-8") as rows_out:
            for path, count in zip(chunk_paths, kept, strict=True):
                chunk = read_chunk(path)
                emb = np.ascontiguousarray(chunk["emb"], np.float32)
                if emb.shape[0] != count or len(chunk["items"] or ()) != count:
                    raise RuntimeError(f"{path}: {emb.shape[0]} embeddings, expected {count}")
                ids = np.arange(start, start + count, dtype=np.int64)
                for kind, index in indexes.items():
                    t = time.perf_counter()
                    index.add_with_ids(emb, ids)
                    seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t
                embeddings[start:start + count] = emb
                for r, row in enumerate(chunk["items"]):
                    rows_out.write(json.dumps({"row": start + r, "id": start + r, **row},
                                              ensure_ascii=False) + "\n")
                start += count
        embeddings.flush()
        del embeddings
        for kind, index in indexes.items():
            ann.write_index(index, os.path.join(scratch, ann.index_file(kind)))
        info = {**info, "format_version": ann.FORMAT_VERSION, "indexes": list(kinds),
                "files": _digests(scratch), "num_items": n, "embed_dim": int(dim),
                "tombstones": {},
                "build_seconds": {k: round(v, 3) for k, v in seconds.items()}}
        with open(os.path.join(scratch, ann.INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        _publish(scratch, out_dir)
        return info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _digests(folder: str) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of the data files, recorded in ``index_info.json`` so a
    server staging the index from a store can check its copy (as the index job records them)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        digest = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
        out[name] = {"size": os.path.getsize(os.path.join(folder, name)),
                     "sha256": digest.hexdigest()}
    return out


def _publish(scratch: str, out_dir: str) -> None:
    """Move the finished files into ``out_dir``, ``index_info.json`` removed first and written
    last; stale files of another kind of earlier build (tombstones) are removed."""
    info_at = beam_io.join(out_dir, ann.INFO_FILE)
    names = sorted(n for n in os.listdir(scratch) if n != ann.INFO_FILE)
    if beam_io.is_remote(out_dir):
        if beam_io.exists(info_at):
            beam_io.delete([info_at])
        for kind in ann.KINDS:
            stale = beam_io.join(out_dir, ann.tombstone_file(kind))
            if beam_io.exists(stale):
                beam_io.delete([stale])
        for name in names + [ann.INFO_FILE]:
            beam_io.upload(os.path.join(scratch, name), beam_io.join(out_dir, name))
        return
    if os.path.exists(info_at):
        os.remove(info_at)
    for kind in ann.KINDS:
        stale = os.path.join(out_dir, ann.tombstone_file(kind))
        if os.path.exists(stale):
            os.remove(stale)
    for name in names + [ann.INFO_FILE]:
        os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))
