"""Query embeddings kept for repeated queries: a bounded LRU in front of the query tower.

Search traffic repeats itself: head queries recur all day, and a query-result or
query-embedding cache is the first thing a search engine's serving stack puts in front of its
expensive stages (Baeza-Yates et al., "The impact of caching on search engines", SIGIR 2007,
found about half of a web engine's queries to be repeats).  In the load test's request mix
(``benchmarks/serve_load.py``) 40 % of the good requests repeat an earlier query.

Caching the *embedding* rather than the answer keeps the cache simple and always valid:

- the query tower is a pure function of the text for a given bundle, and a reload can never
  change the bundle (``swap.py`` refuses an index built from another one), so an entry stays
  right across index swaps and incremental updates; there is nothing to invalidate;
- the answer still comes from the serving index at the request's ``k``.

A hit skips tokenizing, padding and the tower; a batch whose queries all hit makes no tower
call.  Queries repeated *within* a batch are encoded once.

Exactness: the tower's float32 output for one text already differs in the last bits between
batch sizes (XLA chooses kernels per padded shape), so a cached embedding is one the service
could have computed for that request anyway.

Bounded: ``capacity`` rows in one preallocated array (its pages are touched only as rows
fill, so memory grows to ``capacity * dim * 4`` bytes and stays there) and an ``OrderedDict``
from text to row, least recently used first.  Only the batch worker thread calls
:meth:`QueryEmbeddingCache.embed`, so there is no lock.
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
