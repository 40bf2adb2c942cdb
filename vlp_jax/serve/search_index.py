"""An index directory opened for search: the service's side of ``indexing/ann.py``'s format.

Loading applies the search-time parameters the index job stored beside the index (``efSearch``,
``nprobe``), so a service searches with what was measured, and turns HNSW tombstones into an
``IDSelector`` that drops removed items from every result.  Writing and updating directories is
the offline side's (``vlp_jax.indexing``); this module only reads them.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import numpy as np

from vlp_jax.indexing import ann
from vlp_jax.serve import item_table
from vlp_jax.serve.item_table import ItemRow


def _inner(index: Any) -> Any:
    """The index under an ``IndexIDMap2`` wrapper, downcast to its concrete type."""
    faiss = ann._faiss()  # noqa: SLF001 - ann.py imports the optional faiss
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    return index


def configure(index: Any, kind: str, params: ann.AnnParams) -> None:
    """Apply search-time parameters to a loaded index."""
    faiss = ann._faiss()  # noqa: SLF001 - ann.py imports the optional faiss
    if kind == "hnsw":
        _inner(index).hnsw.efSearch = params.hnsw_ef_search
    elif kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.ivf_nprobe, ivf.nlist)


def search(index: Any, queries: np.ndarray, k: int,
           params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float32 [q, k'], labels int64 [q, k'])`` with k' = min(k, ntotal); faiss pads
    with label -1 when it finds fewer."""
    k = max(1, min(int(k), index.ntotal))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if params is None:
        return index.search(q, k)
    return index.search(q, k, params=params)


class SearchIndex:
    """An index directory opened for search: faiss index + item metadata + images' base dir.

    The directory's symlinks are resolved once, first, so a directory swapped underneath (a
    ``current -> vN`` link flipped mid-load) can never yield files of two versions.
    """

    def __init__(self, directory: str, kind: str | None = None, mmap: bool = True):
        self.source = directory
        self.directory = os.path.realpath(directory)
        self.info = ann.read_info(self.directory)
        built = list(self.info.get("indexes", []))
        self.kind = kind or next((k for k in built if k != "flat"), "flat")
        if self.kind not in built:
            raise ValueError(f"index kind {self.kind!r} was not built in {directory} "
                             f"(built: {built})")
        self.version = int(self.info.get("version", 1))
        self.params = ann.AnnParams(**self.info.get("ann_params", {}))
        self.index = ann.read_index(os.path.join(self.directory, ann.index_file(self.kind)),
                                    mmap=mmap)
        configure(self.index, self.kind, self.params)
        self.base_dir = self.info["base_dir"]
        self.table = item_table.read(self.directory, ann.ITEMS_FILE)  # item_table.py: why flat
        self.ids = self.table.ids
        self.tombstones = ann.read_tombstones(self.directory, self.kind)
        if self.index.ntotal != len(self.table) + len(self.tombstones):
            raise ValueError(f"index has {self.index.ntotal} vectors but {ann.ITEMS_FILE} has "
                             f"{len(self.table)} rows (+{len(self.tombstones)} tombstones)")
        self.dim = int(self.index.d)
        self._search_params = None
        if len(self.tombstones):  # the selector objects must outlive every search
            faiss = ann._faiss()  # noqa: SLF001 - ann.py imports the optional faiss
            self._selector_batch = faiss.IDSelectorBatch(self.tombstones)
            self._selector = faiss.IDSelectorNot(self._selector_batch)
            self._search_params = faiss.SearchParametersHNSW(
                efSearch=self.params.hnsw_ef_search, sel=self._selector)

    def __len__(self) -> int:
        return len(self.table)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, labels)`` of the top ``min(k, len(self))``; label -1 = no result."""
        k = min(int(k), max(len(self), 1))
        return search(self.index, queries, k, self._search_params)

    def shown(self, label: int) -> tuple[str, str, str] | None:
        """``(item_id, title, image_url)`` of label ``label`` (None for -1 padding).  Answers
        cache what they build from it once per item and index (``serve.answer``)."""
        item = self.item(label)
        if item is None:
            return None
        return (item.item_id, item.title,
                f"/items/{urllib.parse.quote(str(item.item_id), safe='')}/image")

    def item(self, label: int) -> ItemRow | None:
        """The item with faiss label ``label`` (None for -1 padding)."""
        row = self.table.row_of_label(label)
        return None if row is None else self.table.item(row)

    def item_by_id(self, item_id: str) -> ItemRow | None:
        """The item with id ``item_id`` (None if the index has none)."""
        row = self.table.row_of_item(item_id)
        return None if row is None else self.table.item(row)
