"""Retrieval evaluation maths on embeddings: exact chunked top-k, Recall@K, per-slice summaries.

Model-independent on purpose: the trainer embeds the queries and *every* catalogue item, and
everything here only sees arrays, so it can be tested against brute force on tiny inputs.

Recall@K (the definition written into every report):
    per query, |relevant ∩ top-K| / min(|relevant|, K), averaged over queries.
Dividing by min(|relevant|, K) instead of |relevant| keeps R@K reachable (= 1.0) for a query
with more relevant items than K.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RECALL_DEFINITION = (
    "Recall@K = |relevant ∩ top-K| / min(|relevant|, K) per query, averaged over queries; "
    "candidates = every item of the catalogue (exact inner-product search)."
)
UNTAGGED = "untagged"


@dataclasses.dataclass
class QuerySet:
    """Distinct queries of a split, in order of first appearance.

    ``relevant[i]`` holds the sorted, de-duplicated ``item_index`` values paired with
    ``queries[i]``; ``slices[i]`` is the slice tag of the query's first pair ("" = untagged).
    """

    queries: list[str]
    slices: list[str]
    relevant: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.queries)

    def subset(self, max_queries: int) -> QuerySet:
        """The first ``max_queries`` queries (in order of first appearance): a cheaper eval."""
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        n = min(max_queries, len(self.queries))
        return QuerySet(self.queries[:n], self.slices[:n], self.relevant[:n])


def _text(value: Any) -> str:
    """TFDS data sources return text features as bytes; pairs from JSON give str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def group_queries(pairs: Iterable[dict]) -> QuerySet:
    """Group (query, item_index, slice) pairs into distinct queries with their relevant sets.

    Each pair needs ``query`` and ``item_index``; ``slice`` is optional ("" when missing).
    A query whose pairs disagree on the slice keeps the first one seen.
    """
    order: dict[str, int] = {}
    slices: list[str] = []
    items: list[list[int]] = []
    for n, pair in enumerate(pairs):
        for key in ("query", "item_index"):
            if key not in pair:
                raise ValueError(f"pair #{n} has no {key!r} key: {pair!r}")
        query = _text(pair["query"])
        if query not in order:
            order[query] = len(order)
            slices.append(_text(pair.get("slice", "")))
            items.append([])
        items[order[query]].append(int(pair["item_index"]))
    relevant = [np.unique(np.asarray(x, np.int64)) for x in items]
    return QuerySet(queries=list(order), slices=slices, relevant=relevant)


@functools.partial(jax.jit, static_argnames=("k",))
def _block_topk(queries: jax.Array, chunks: jax.Array, num_items: jax.Array, k: int):
    """Running exact top-k of one query block over all item chunks (one lax.scan).

    ``chunks`` is [C, chunk, d] (the last chunk zero-padded; padded columns score -inf).  Running
    results come first in each merge and lax.top_k is stable, so ties keep the lower item index.
    """
    chunk = chunks.shape[1]
    qb = queries.shape[0]

    def step(carry, xs):
        run_s, run_i = carry
        c, items = xs
        scores = jnp.dot(queries, items.T, precision=jax.lax.Precision.HIGHEST)
        col = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        scores = jnp.where(col[None, :] < num_items, scores, -jnp.inf)
        cs, ci = jax.lax.top_k(scores, k)
        all_s = jnp.concatenate([run_s, cs], axis=1)
        all_i = jnp.concatenate([run_i, ci + c * chunk], axis=1)
        top_s, where = jax.lax.top_k(all_s, k)
        return (top_s, jnp.take_along_axis(all_i, where, axis=1)), None

    init = (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), -1, jnp.int32))
    steps = (jnp.arange(chunks.shape[0], dtype=jnp.int32), chunks)
    (scores, indices), _ = jax.lax.scan(step, init, steps)
    return scores, indices


def _check_embeddings(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [count, dim] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def chunked_topk(
    query_emb: np.ndarray,
    item_emb: np.ndarray,
    k: int,
    chunk_size: int = 8192,
    query_block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over every item, never materialising Q x N.

    Items are split into chunks of ``chunk_size`` (the last one zero-padded, its padding scored
    -inf) so every scan step has the same shape and the function compiles once per
    (query_block, chunk, d, k).  Queries are processed ``query_block`` at a time (the last block
    zero-padded); peak memory is about query_block x chunk scores plus the items.

    Ties are broken towards the lower item index.  ``k`` must be in [1, N] (ValueError
    otherwise); when ``k > chunk_size`` the chunk is enlarged to ``k``.

    Returns:
      scores [Q, k] float32 (descending) and indices [Q, k] int64.
    """
    q = _check_embeddings("query_emb", query_emb)
    items = _check_embeddings("item_emb", item_emb)
    if q.shape[1] != items.shape[1]:
        raise ValueError(
            f"query_emb dim {q.shape[1]} != item_emb dim {items.shape[1]}"
        )
    n, d = items.shape
    if not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, num_items={n}], got {k!r}")
    if chunk_size < 1 or query_block < 1:
        raise ValueError(f"chunk_size and query_block must be >= 1, got {chunk_size}, "
                         f"{query_block}")
    k = int(k)
    if q.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    chunk = max(min(chunk_size, n), k)
    num_chunks = -(-n // chunk)
    padded = np.zeros((num_chunks * chunk, d), np.float32)
    padded[:n] = items
    chunks = jnp.asarray(padded.reshape(num_chunks, chunk, d))
    del padded
    qb = min(query_block, q.shape[0])
    out_s = np.empty((q.shape[0], k), np.float32)
    out_i = np.empty((q.shape[0], k), np.int64)
    num_items = jnp.int32(n)
    for start in range(0, q.shape[0], qb):
        block = q[start : start + qb]
        rows = block.shape[0]
        if rows < qb:
            block = np.concatenate([block, np.zeros((qb - rows, d), np.float32)])
        s, i = _block_topk(jnp.asarray(block), chunks, num_items, k)
        out_s[start : start + rows] = np.asarray(s)[:rows]
        out_i[start : start + rows] = np.asarray(i)[:rows]
    return out_s, out_i


def recall_at_k(
    topk_indices: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int]
) -> np.ndarray:
    """Per-query Recall@K = |relevant ∩ top-K| / min(|relevant|, K), shape [Q, len(ks)]."""
    topk = np.asarray(topk_indices)
    if topk.ndim != 2:
        raise ValueError(f"topk_indices must be [Q, Kmax], got shape {topk.shape}")
    if len(relevant) != topk.shape[0]:
        raise ValueError(
            f"got {len(relevant)} relevant sets for {topk.shape[0]} rows of topk_indices"
        )
    ks = [int(x) for x in ks]
    bad = [x for x in ks if not 1 <= x <= topk.shape[1]]
    if bad:
        raise ValueError(f"ks {bad} outside [1, Kmax={topk.shape[1]}] of topk_indices")
    out = np.zeros((topk.shape[0], len(ks)), np.float64)
    kidx = np.asarray(ks) - 1
    for row, rel in enumerate(relevant):
        rel = np.unique(np.asarray(rel, np.int64))
        if rel.size == 0:
            raise ValueError(f"query #{row} has no relevant items")
        hits = np.cumsum(np.isin(topk[row], rel))
        out[row] = hits[kidx] / np.minimum(rel.size, ks)
    return out


def _mean_by_k(values: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    means = values.mean(axis=0) if len(values) else np.full(len(ks), np.nan)
    return {f"R@{k}": float(m) for k, m in zip(ks, means, strict=True)}


def summarize(
    per_query: np.ndarray, slices: Sequence[str], ks: Sequence[int]
) -> dict[str, Any]:
    """Average per-query recalls overall and per slice.

    Slices are listed in sorted order.  Untagged queries (slice "") appear as the slice
    ``"untagged"`` only when some queries are tagged; when none is, ``per_slice`` is empty.
    Returns ``{"overall": {"R@K": ...}, "per_slice": {slice: {...}},
    "num_queries": {"overall": Q, slice: count, ...}}``.
    """
    per_query = np.asarray(per_query, np.float64)
    if per_query.ndim != 2 or per_query.shape[1] != len(ks):
        raise ValueError(f"per_query must be [Q, {len(ks)}], got shape {per_query.shape}")
    if len(slices) != per_query.shape[0]:
        raise ValueError(f"got {len(slices)} slices for {per_query.shape[0]} queries")
    names = np.asarray([s or UNTAGGED for s in slices], dtype=object)
    tagged = any(slices)
    result: dict[str, Any] = {
        "overall": _mean_by_k(per_query, ks),
        "per_slice": {},
        "num_queries": {"overall": int(per_query.shape[0])},
    }
    if tagged:
        for name in sorted(set(names.tolist())):
            sel = names == name
            result["per_slice"][name] = _mean_by_k(per_query[sel], ks)
            result["num_queries"][name] = int(sel.sum())
    return result


def evaluate(
    query_emb: np.ndarray,
    item_emb: np.ndarray,
    query_set: QuerySet,
    ks: Sequence[int] = (1, 10, 100, 1000),
    chunk_size: int = 8192,
    query_block: int = 1024,
) -> dict[str, Any]:
    """Recall@K of queries against the whole catalogue, overall and per slice.

    Cut-offs with K > num_items are **omitted** (R@K would be trivially 1.0) and listed under
    ``ks_omitted``.  The result is ``summarize(...)`` plus ``ks``, ``ks_omitted``,
    ``num_items`` and ``definition`` (JSON-serialisable).
    """
    n_items = np.shape(item_emb)[0] if np.ndim(item_emb) == 2 else 0
    if len(query_set) == 0:
        raise ValueError("the query set is empty: nothing to evaluate")
    if np.shape(query_emb)[0] != len(query_set):
        raise ValueError(
            f"query_emb has {np.shape(query_emb)[0]} rows but the query set has "
            f"{len(query_set)} queries"
        )
    for row, rel in enumerate(query_set.relevant):
        if rel.size and (rel.min() < 0 or rel.max() >= n_items):
            raise ValueError(
                f"query #{row} ({query_set.queries[row]!r}) has relevant item_index outside "
                f"[0, {n_items})"
            )
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive ints, got {ks}")
    used = [k for k in ks if k <= n_items]
    omitted = [k for k in ks if k > n_items]
    if not used:
        raise ValueError(f"every K in {ks} exceeds the number of items ({n_items})")
    _, indices = chunked_topk(query_emb, item_emb, used[-1], chunk_size, query_block)
    per_query = recall_at_k(indices, query_set.relevant, used)
    result = summarize(per_query, query_set.slices, used)
    result.update(ks=used, ks_omitted=omitted, num_items=int(n_items),
                  definition=RECALL_DEFINITION)
    return result
