"""faiss indexes over item embeddings: build, save, load, search.

Inner product is the training similarity (cosine, as the towers L2-normalise), so every index uses
``METRIC_INNER_PRODUCT``.  ``flat`` (``IndexFlatIP``) is exact and the reference for recall;
``hnsw`` (``IndexHNSWFlat``) and ``ivf`` (``IndexIVFFlat``) are the approximate options, with
their parameters stored beside the index so a service searches with what was measured.

An index directory written by ``vlp_jax.serve.index`` holds::

    embeddings.npy   float32 [N, d] item embeddings (row r = faiss id r)
    items.jsonl      one line per row: {"row", "item_id", "title", "image"}
    index_flat.faiss exact index
    index_<ann>.faiss  optional approximate index (hnsw or ivf)
    index_info.json  written last: counts, parameters, base_dir of the images, timings
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

KINDS = ("flat", "hnsw", "ivf")
INFO_FILE = "index_info.json"
ITEMS_FILE = "items.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"


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


def build_index(vectors: np.ndarray, kind: str, params: AnnParams | None = None,
                seed: int = 0) -> Any:
    """A faiss inner-product index of ``kind`` over float32 ``vectors`` [N, d]."""
    faiss = _faiss()
    params = params or AnnParams()
    params.validate()
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, d] array, got shape {x.shape}")
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.hnsw_ef_construction
        index.hnsw.efSearch = params.hnsw_ef_search
    else:
        nlist = ivf_nlist(n, params.ivf_nlist)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= params.train_sample else x[rng.choice(n, params.train_sample, False)]
        index.train(sample)
        index.nprobe = min(params.ivf_nprobe, nlist)  # faiss's wrapper keeps `quantizer` alive
    index.add(x)
    return index


def configure(index: Any, kind: str, params: AnnParams) -> None:
    """Apply search-time parameters to a loaded index."""
    faiss = _faiss()
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = params.hnsw_ef_search
    elif kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.ivf_nprobe, ivf.nlist)


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [q, k'], rows int64 [q, k'])`` with k' = min(k, ntotal)."""
    k = min(int(k), index.ntotal)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, rows = index.search(q, k)
    return scores, rows


def write_index(index: Any, path: str) -> None:
    faiss = _faiss()
    tmp = path + ".tmp"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def index_file(kind: str) -> str:
    return f"index_{kind}.faiss"


@dataclasses.dataclass
class ItemRow:
    item_id: str
    title: str
    image: str


class SearchIndex:
    """An index directory opened for search: faiss index + item metadata + images' base dir."""

    def __init__(self, directory: str, kind: str | None = None):
        self.directory = os.path.abspath(directory)
        info_path = os.path.join(self.directory, INFO_FILE)
        if not os.path.isfile(info_path):
            raise ValueError(f"{directory!r} is not a finished index directory (no {INFO_FILE}; "
                             "run python -m vlp_jax.serve.index)")
        with open(info_path) as f:
            self.info = json.load(f)
        built = list(self.info["indexes"])
        self.kind = kind or next((k for k in built if k != "flat"), "flat")
        if self.kind not in built:
            raise ValueError(f"index kind {self.kind!r} was not built in {directory} "
                             f"(built: {built})")
        self.params = AnnParams(**self.info.get("ann_params", {}))
        self.index = _faiss().read_index(os.path.join(self.directory, index_file(self.kind)))
        configure(self.index, self.kind, self.params)
        self.base_dir = self.info["base_dir"]
        self.items: list[ItemRow] = []
        with open(os.path.join(self.directory, ITEMS_FILE), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.items.append(ItemRow(row["item_id"], row["title"], row["image"]))
        self.row_of = {item.item_id: r for r, item in enumerate(self.items)}
        if self.index.ntotal != len(self.items):
            raise ValueError(f"index has {self.index.ntotal} vectors but {ITEMS_FILE} has "
                             f"{len(self.items)} rows")
        self.dim = int(self.index.d)

    def __len__(self) -> int:
        return len(self.items)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search(self.index, queries, k)


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """``(result, seconds)`` of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
