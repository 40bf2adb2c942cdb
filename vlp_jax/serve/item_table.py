"""An index's item metadata in a few flat arrays instead of ~10^6 Python objects.

A search index needs, per item, its faiss label, id, title and image path, and two lookups:
label -> item (every answer) and item id -> item (the image route).  Held as one Python
object per row plus two dicts, a 100,000-item index is ~10^6 long-lived objects; building them
while the old index serves held up the serving threads during a swap (a 1 ms heartbeat thread
paused up to 112 ms, and 1-3 requests of 5,000 at 8 clients were shed per three swaps), every
worker process carried its own copy, and freeing them needed care (``swap._release``).

Here each text field is one UTF-8 buffer with row offsets, the labels are one ``int64`` array
(looked up directly when they are ``0..n-1``, as the index job writes them, else through a
sorted copy), and item ids are found through a sorted array of their hashes (candidates
checked against the text).  Parsing ``items.jsonl`` still goes row by row, but each row's
objects are dropped at once, so what stays behind is a handful of large buffers: cheap to
build, nothing for the garbage collector to walk, freed in one call each.
"""

from __future__ import annotations

import array
import os
from typing import NamedTuple

import numpy as np

from vlp_jax.indexing import ann

FIELDS = ("item_id", "title", "image")


class ItemRow(NamedTuple):
    item_id: str
    title: str
    image: str


class _Column:
    """Strings appended one by one into one UTF-8 buffer with end offsets."""

    def __init__(self):
        self.data = bytearray()
        self.ends = array.array("q")

    def append(self, text: str) -> None:
        self.data += text.encode("utf-8", "surrogatepass")
        self.ends.append(len(self.data))

    def freeze(self) -> tuple[bytes, array.array]:
        """The buffer and its end offsets (an ``array``: indexing one is ~4x faster than a
        NumPy scalar lookup, and answers built right after a swap look up thousands)."""
        return bytes(self.data), self.ends


class ItemTable:
    """Rows of an index directory's ``items.jsonl`` (``id`` = the faiss label, default the
    row number, as format-1 directories have it)."""

    def __init__(self, path: str):
        columns = {name: _Column() for name in FIELDS}
        ids = array.array("q")
        hashes = array.array("q")
        # Values that are not strings (a null title in a hand-edited file) are kept as they
        # are, as the answers have always shown them (``answer.py``).
        self._odd: dict[tuple[str, int], object] = {}
        for r, row in enumerate(ann.json_lines(path)):  # binary: see json_lines on the GIL
            ids.append(int(row.get("id", r)))
            for name in FIELDS:
                value = row[name]
                if not isinstance(value, str):
                    self._odd[name, r] = value
                    value = ""
                columns[name].append(value)
            item_id = row["item_id"]
            hashes.append(hash(item_id) if isinstance(item_id, str) else 0)
        self._data: dict[str, bytes] = {}
        self._ends: dict[str, array.array] = {}
        for name, column in columns.items():
            self._data[name], self._ends[name] = column.freeze()
        del columns
        self.ids = np.frombuffer(ids, np.int64).copy()
        n = len(self.ids)
        self._dense = bool(np.array_equal(self.ids, np.arange(n)))
        # Labels after incremental updates are 0..max with gaps (delisted items, new ids at
        # the end): a row-per-label array while that stays compact, else a sorted search.
        self._row_by_label: array.array | None = None
        self._label_order = self._sorted_labels = None
        top = int(self.ids.max()) + 1 if n else 0
        if not self._dense and 0 <= int(self.ids.min(initial=0)) and top <= 4 * n + 1024:
            rows = np.full(top, -1, np.int64)
            rows[self.ids] = np.arange(n)
            self._row_by_label = array.array("q", rows.tobytes())
        elif not self._dense:
            self._label_order = np.argsort(self.ids, kind="stable")
            self._sorted_labels = self.ids[self._label_order]
        item_hashes = np.frombuffer(hashes, np.int64)
        self._hash_order = np.argsort(item_hashes, kind="stable")
        self._sorted_hashes = item_hashes[self._hash_order]

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, name: str, row: int) -> str:
        if self._odd and (name, row) in self._odd:
            return self._odd[name, row]  # type: ignore[return-value]
        ends = self._ends[name]
        start = ends[row - 1] if row else 0
        return self._data[name][start:ends[row]].decode("utf-8", "surrogatepass")

    def item(self, row: int) -> ItemRow:
        text = self.text
        return ItemRow(text("item_id", row), text("title", row), text("image", row))

    def row_of_label(self, label: int) -> int | None:
        """The row of faiss label ``label`` (None for -1 padding or an unknown label)."""
        label = int(label)
        n = len(self.ids)
        if self._dense:
            return label if 0 <= label < n else None
        if self._row_by_label is not None:
            if not 0 <= label < len(self._row_by_label):
                return None
            row = self._row_by_label[label]
            return None if row < 0 else row
        # The last row with the label, as everywhere else (a label repeated in a broken file).
        at = int(np.searchsorted(self._sorted_labels, label, side="right")) - 1
        if at >= 0 and self._sorted_labels[at] == label:
            return int(self._label_order[at])
        return None

    def row_of_item(self, item_id: str) -> int | None:
        """The row of item ``item_id`` (the last one, should ``items.jsonl`` repeat an id)."""
        h = hash(item_id)
        lo = int(np.searchsorted(self._sorted_hashes, h, side="left"))
        hi = int(np.searchsorted(self._sorted_hashes, h, side="right"))
        for row in self._hash_order[lo:hi][::-1]:  # a stable sort: equal hashes in row order
            if self.text("item_id", int(row)) == item_id:
                return int(row)
        return None


def read(directory: str, file_name: str) -> ItemTable:
    return ItemTable(os.path.join(directory, file_name))
