"""faiss indexes over item embeddings and the index directory format: build, update in place,
save, load.  Searching a loaded directory is the service's (``serve/search_index.py``); the
format and its readers live here, below ``serve``, because the incremental update reads a
finished directory as much as the service does.

Inner product is the training similarity (cosine, as the towers L2-normalise), so every index uses
``METRIC_INNER_PRODUCT``.  ``flat`` (``IndexFlatIP``) is exact and the reference for recall;
``hnsw`` (``IndexHNSWFlat``) and ``ivf`` (``IndexIVFFlat``) are the approximate options, with
their parameters stored beside the index so a service searches with what was measured.

**Labels.**  Every vector carries a stable int64 label (the item's ``id`` in ``items.jsonl``):
``flat`` and ``hnsw`` are wrapped in ``IndexIDMap2``, ``ivf`` stores labels natively.  Stable
labels are what make incremental updates cheap: delisting an item removes one label, a new item
adds one, nothing else is touched or re-embedded.  A fresh build labels rows ``0..N-1``.

**HNSW deletions are tombstones.**  faiss cannot delete nodes from an HNSW graph, so a removed
``hnsw`` label stays in the graph (still traversed, keeping it connected) and an ``IDSelector``
drops it from every result.  ``update.py`` rebuilds the graph from the stored embeddings (no
re-embedding) once tombstones pass a fraction of it.

An index directory (written by ``vlp_jax.indexing.index``; format 2)::

    embeddings.npy        float32 [N, d] item embeddings (row r = line r of items.jsonl)
    items.jsonl           one line per row: {"row", "id", "item_id", "title", "image", "source"}
    index_flat.faiss      exact index
    index_<ann>.faiss     optional approximate index (hnsw or ivf)
    tombstones_hnsw.npy   optional: labels removed from the HNSW graph
    index_info.json       written last: format/version, counts, parameters, base_dir, timings

Format 1 directories (no ``id``, unwrapped indexes) are still read, with label = row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from vlp_jax.runtime import atomic_io

KINDS = ("flat", "hnsw", "ivf")
INFO_FILE = "index_info.json"
ITEMS_FILE = "items.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
FORMAT_VERSION = 2


def _faiss():
    try:
        import faiss
    except ImportError as e:  # faiss-cpu is the optional "serve" extra
        raise ImportError("faiss is needed for indexes: pip install 'vlp_jax[serve]' "
                          "(faiss-cpu)") from e
    return faiss


@dataclasses.dataclass(frozen=True)
class AnnParams:
    """Approximate-index parameters (the defaults suit 10^5–10^6 items of d = 32–256)."""

    hnsw_m: int = 32  # graph degree: more = better recall, more memory, slower build
    hnsw_ef_construction: int = 80  # build-time beam width
    hnsw_ef_search: int = 128  # search-time beam width (>= k for a good top-k)
    ivf_nlist: int = 0  # IVF cells; 0 = 4 * sqrt(N), capped so each cell has >= 39 points
    ivf_nprobe: int = 16  # cells visited per query
    train_sample: int = 100_000  # IVF k-means training points (random subset)

    def validate(self) -> None:
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe",
                     "train_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist < 0:
            raise ValueError(f"ivf_nlist must be >= 0 (0 = automatic), got {self.ivf_nlist}")


def ivf_nlist(n: int, requested: int = 0) -> int:
    """Number of IVF cells for ``n`` vectors: requested (or 4*sqrt(n)), at most n // 39."""
    nlist = requested or int(round(4 * math.sqrt(n)))
    return max(1, min(nlist, n // 39))


def _as_ids(ids: Any, n: int) -> np.ndarray:
    out = np.ascontiguousarray(ids, dtype=np.int64)
    if out.shape != (n,):
        raise ValueError(f"need one int64 id per vector ({n}), got shape {out.shape}")
    return out


def build_index(vectors: np.ndarray, kind: str, params: AnnParams | None = None,
                seed: int = 0, ids: np.ndarray | None = None) -> Any:
    """A faiss inner-product index of ``kind`` over float32 ``vectors`` [N, d], labelled
    ``ids`` (default ``0..N-1``)."""
    faiss = _faiss()
    params = params or AnnParams()
    params.validate()
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, d] array, got shape {x.shape}")
    n, d = x.shape
    labels = _as_ids(np.arange(n) if ids is None else ids, n)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = params.hnsw_ef_construction
        inner.hnsw.efSearch = params.hnsw_ef_search
        index = faiss.IndexIDMap2(inner)
    else:
        nlist = ivf_nlist(n, params.ivf_nlist)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= params.train_sample else x[rng.choice(n, params.train_sample, False)]
        index.train(sample)
        index.nprobe = min(params.ivf_nprobe, nlist)  # faiss's wrapper keeps `quantizer` alive
    index.add_with_ids(x, labels)
    return index


def add_vectors(index: Any, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add labelled vectors to an index built by :func:`build_index` (any kind)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.shape[0]:
        index.add_with_ids(x, _as_ids(ids, x.shape[0]))


def remove_ids(index: Any, kind: str, ids: np.ndarray) -> int:
    """Remove labels from a ``flat`` or ``ivf`` index; returns how many were present.

    ``hnsw`` graphs cannot lose nodes: record its removed labels as tombstones instead.
    """
    if kind == "hnsw":
        raise ValueError("faiss HNSW graphs cannot remove nodes; record tombstones instead")
    labels = np.ascontiguousarray(ids, dtype=np.int64)
    return int(index.remove_ids(labels)) if labels.size else 0


def write_index(index: Any, path: str) -> None:
    """Write a faiss index atomically (temporary file, then rename)."""
    with atomic_io.replacing(path) as tmp:
        _faiss().write_index(index, tmp)


def read_index(path: str, mmap: bool = False) -> Any:
    """A faiss index written by :func:`write_index`; ``mmap`` maps flat vectors and HNSW graphs
    read-only from the file instead of copying them into the heap (``IO_FLAG_MMAP_IFC``), so
    several server processes share one copy in the page cache.  A mapped index must not be
    modified, and the writer replaces files by rename (a new inode), never in place."""
    faiss = _faiss()
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)


def index_file(kind: str) -> str:
    return f"index_{kind}.faiss"


def tombstone_file(kind: str) -> str:
    return f"tombstones_{kind}.npy"


def read_info(directory: str) -> dict[str, Any]:
    """``index_info.json`` of a finished index directory (ValueError otherwise)."""
    info_path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(info_path):
        raise ValueError(f"{directory!r} is not a finished index directory (no {INFO_FILE}; "
                         "run python -m vlp_jax.indexing.index)")
    try:
        with open(info_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path} is not valid JSON: {e}") from e


def json_lines(path: str) -> Iterator[dict[str, Any]]:
    """The JSON documents of a JSON-lines file, one per line.

    Read in binary with a 16 MiB buffer, not line by line in text mode: text-mode iteration
    reads 8 KiB at a time and releases the GIL around each read, and every such hand-over
    resets CPython's switch-interval clock, so another thread waiting for the GIL (a server's
    event loop while an index loads beside the serving one) was kept out for up to ~100 ms
    at a time (a 1 ms heartbeat thread's longest pause while 100,000 rows were parsed: 71-158
    ms in text mode, 6.4 ms this way)."""
    with open(path, "rb", buffering=16 << 20) as f:
        for line in f:
            yield json.loads(line)


def read_rows(directory: str) -> list[dict[str, Any]]:
    """``items.jsonl`` rows, with ``id`` filled in (= row) for format-1 directories."""
    rows = []
    for r, row in enumerate(json_lines(os.path.join(directory, ITEMS_FILE))):
        row.setdefault("id", r)
        rows.append(row)
    return rows


def read_tombstones(directory: str, kind: str) -> np.ndarray:
    path = os.path.join(directory, tombstone_file(kind))
    return np.load(path).astype(np.int64) if os.path.isfile(path) else np.zeros(0, np.int64)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(result, seconds)`` of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
