"""Repeated queries answered from memory: their embeddings, and their hits in the serving index.

Search traffic repeats itself: head queries recur all day, and a query-result or
query-embedding cache is the first thing a search engine's serving stack puts in front of its
expensive stages (Baeza-Yates et al., "The impact of caching on search engines", SIGIR 2007,
found a large share of a web engine's query volume to repeat earlier queries).  In the load
test's request mix (``benchmarks/serve_load.py``) 40 % of the good requests repeat an earlier
query.

Two least-recently-used tables, both keyed by the query text:

- :class:`QueryEmbeddingCache`: the query tower is a pure function of the text for a given
  bundle, and a reload can never change the bundle (``swap.py`` refuses an index built from
  another one), so an embedding stays right across index swaps and incremental updates.  A hit
  skips tokenizing, padding and the tower; a batch whose queries all hit makes no tower call;
  a text repeated *within* a batch is encoded once.
- :class:`ResultCache`: a text's top ``K`` hits (scores, labels) in one index snapshot, tagged
  with the snapshot's generation (``swap.Loaded``), so an entry is never used for another
  index — after a swap the stale entry is replaced by the first search on the new one.  Any
  request with ``k <= K`` is answered from it: faiss returns each row best first and the top
  ``k`` of a top-``K`` search are its first ``k`` (``service.py`` relies on the same fact to
  search a batch at its largest ``k``), so the answer is the one a search would give.  Only
  the answer's JSON is built per request.

Exactness: the tower's float32 output for one text already differs in the last bits between
batch sizes (XLA chooses kernels per padded shape), so a cached embedding is one the service
could have computed for that request anyway.

Bounded: the embeddings are ``capacity`` rows in one preallocated array (its pages are
touched only as rows fill, so memory grows to ``capacity * dim * 4`` bytes and stays there) and
an ``OrderedDict`` from text to row, least recently used first; results are at most
``capacity`` entries of ``K`` float32 scores + int64 labels (1.2 KB at ``K = 100``).  Only the
batch worker thread uses either, so there is no lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np


class QueryEmbeddingCache:
    """``embed(queries, encode)`` = ``encode(queries)``, reusing rows of earlier calls."""

    def __init__(self, capacity: int, dim: int,
                 on_lookup: Callable[[int, int], None] | None = None):
        if capacity < 0:
            raise ValueError(f"query cache capacity must be >= 0 (0 = off), got {capacity}")
        if dim < 1:
            raise ValueError(f"embedding size must be >= 1, got {dim}")
        self.capacity, self.dim = int(capacity), int(dim)
        # (hits, misses) per call, for metrics: a miss is a text the encoder computed, a hit
        # a query answered with a row it did not compute for it (cached, or a repeat within
        # the call).
        self.on_lookup = on_lookup
        self._rows = np.zeros((self.capacity, self.dim), np.float32)
        self._slot: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, query: object) -> bool:
        return query in self._slot

    def embed(self, queries: Sequence[str],
              encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """float32 ``[len(queries), dim]``: cached rows for known texts, ``encode`` (called
        at most once, on the distinct unknown texts in first-seen order) for the rest."""
        if not self.capacity:
            out = np.asarray(encode(list(queries)), np.float32)
            self._count(0, len(queries))
            return out
        slot = self._slot
        hit_at: list[int] = []
        hit_rows: list[int] = []
        missing: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            row = slot.get(query)
            if row is None:
                missing.setdefault(query, []).append(i)
            else:
                slot.move_to_end(query)
                hit_at.append(i)
                hit_rows.append(row)
        out = np.empty((len(queries), self.dim), np.float32)
        if hit_at:
            out[hit_at] = self._rows[hit_rows]
        if missing:
            texts = list(missing)
            fresh = np.asarray(encode(texts), np.float32)
            if fresh.shape != (len(texts), self.dim):
                raise ValueError(f"the query encoder returned shape {fresh.shape} for "
                                 f"{len(texts)} queries; expected ({len(texts)}, {self.dim})")
            for j, text in enumerate(texts):
                out[missing[text]] = fresh[j]
            self._insert(texts, fresh)
        self._count(len(queries) - len(missing), len(missing))
        return out

    def _insert(self, texts: list[str], fresh: np.ndarray) -> None:
        """Store the newest ``capacity`` of ``texts``, evicting the least recently used."""
        start = max(0, len(texts) - self.capacity)
        for j in range(start, len(texts)):
            if len(self._slot) < self.capacity:
                row = len(self._slot)
            else:
                _, row = self._slot.popitem(last=False)
            self._slot[texts[j]] = row
            self._rows[row] = fresh[j]

    def _count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        if self.on_lookup is not None:
            self.on_lookup(hits, misses)


class ResultCache:
    """A query text's top hits in one index snapshot (module docstring), least recently used
    dropped first; ``capacity`` 0 = off."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"result cache capacity must be >= 0 (0 = off), got {capacity}")
        self.capacity = int(capacity)
        self._entries: collections.OrderedDict[str, tuple[int, np.ndarray, np.ndarray]] = (
            collections.OrderedDict())
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: str, generation: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scores, labels)`` of the top ``k`` of ``query`` in snapshot ``generation``, or
        None (not cached, cached for another snapshot, or for fewer than ``k`` hits)."""
        entry = self._entries.get(query) if self.capacity else None
        if entry is None or entry[0] != generation or len(entry[2]) < k:
            self.misses += 1
            return None
        self._entries.move_to_end(query)
        self.hits += 1
        return entry[1][:k], entry[2][:k]

    def put(self, query: str, generation: int, scores: np.ndarray, labels: np.ndarray) -> None:
        """Keep a search's row (copied: a batch's result arrays are not held on to), unless
        an entry of the same snapshot already holds more hits."""
        if not self.capacity:
            return
        old = self._entries.get(query)
        if old is not None and old[0] == generation and len(old[2]) >= len(labels):
            return
        self._entries[query] = (generation, np.array(scores, np.float32),
                                np.array(labels, np.int64))
        self._entries.move_to_end(query)
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
