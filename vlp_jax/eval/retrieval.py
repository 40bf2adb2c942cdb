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
import math
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


def auto_group_size(num_items: int, k: int) -> int:
    """Items per group of the two-stage top-k: balances stage 1 (a top-k over ``N / g`` group
    maxima per query) against stage 2 (re-scoring ``k * g`` candidate items per query), whose
    costs per query are roughly ``N / g`` and ``20 * k * g`` top-k-element equivalents (a
    candidate costs a 512-byte gather + dot); clipped to [1, 64]."""
    return int(min(64, max(1, round(math.sqrt(num_items / (20.0 * k))))))


@functools.partial(jax.jit, static_argnames=("k", "group"))
def _block_topk(queries: jax.Array, chunks: jax.Array, bias: jax.Array, num_items: jax.Array,
                k: int, group: int):
    """Exact top-k of one query block over every item, in two stages.

    Items are cut into groups of ``group`` consecutive indices.  Stage 1 scans the chunks
    (``chunks`` [C, chunk, d], rows permuted so that ``scores.reshape(q, group, chunk // group)
    .max(1)`` is the max of each group — a cheap vectorised reduce; ``bias`` [C, chunk] is
    -inf on zero-padding rows) and keeps only the per-group maxima [q, G].  Stage 2 re-scores
    the items of the ``k`` best groups and takes their top-k.

    Why exact: every item of the true top-k lies in a group whose maximum is at least the k-th
    best score, and fewer than k groups can have a larger maximum; with ties, lax.top_k is
    stable (lower group index first) and groups hold consecutive items, so the groups of the
    lower-index tied items are the ones kept.  Candidates are re-scored in ascending item order,
    so the final stable top-k also breaks ties towards the lower item index.  (The two stages
    sum the same float32 products in different orders; scores within ~1e-7 of the k-th one
    may be ordered differently, as between any two float implementations.)
    """
    num_chunks, chunk, dim = chunks.shape
    qb = queries.shape[0]
    per_chunk = chunk // group
    num_groups = num_chunks * per_chunk
    hi = jax.lax.Precision.HIGHEST

    def stage1(gmax, xs):
        c, items, pad = xs
        scores = jnp.dot(queries, items.T, precision=hi) + pad[None, :]
        best = jnp.max(scores.reshape(qb, group, per_chunk), axis=1)
        return jax.lax.dynamic_update_slice_in_dim(gmax, best, c * per_chunk, axis=1), None

    gmax = jnp.full((qb, num_groups), -jnp.inf, jnp.float32)
    steps = (jnp.arange(num_chunks, dtype=jnp.int32), chunks, bias)
    gmax, _ = jax.lax.scan(stage1, gmax, steps)
    kg = min(k, num_groups)
    groups = jnp.sort(jax.lax.top_k(gmax, kg)[1], axis=1)  # [qb, kg], ascending item order

    flat = chunks.reshape(num_chunks * chunk, dim)
    member = jnp.arange(group, dtype=jnp.int32)

    def stage2(args):
        q, g = args  # [sb, d], [sb, kg]
        item = g[..., None] * group + member  # [sb, kg, group] original item indices
        c, m = g // per_chunk, g % per_chunk  # chunk, position within its permuted rows
        rows = c[..., None] * chunk + member * per_chunk + m[..., None]
        # multiply + sum, not einsum: a fused loop beats XLA CPU's small batched matvecs
        scores = jnp.sum(q[:, None, None, :] * flat[rows], axis=-1)
        scores = jnp.where(item < num_items, scores, -jnp.inf).reshape(q.shape[0], -1)
        top, where = jax.lax.top_k(scores, k)
        return top, jnp.take_along_axis(item.reshape(q.shape[0], -1), where, axis=1)

    sub = 8 if qb % 8 == 0 else 1
    top, idx = jax.lax.map(stage2, (queries.reshape(qb // sub, sub, dim),
                                    groups.reshape(qb // sub, sub, kg)))
    return top.reshape(qb, k), idx.reshape(qb, k)


@functools.partial(jax.jit, donate_argnums=0)
def _write_chunks(buf: jax.Array, piece: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buf, piece, start, axis=0)


def _device_chunks(items: np.ndarray, chunk: int, group: int) -> tuple[jax.Array, jax.Array]:
    """The items as a device array of [C, chunk, d] zero-padded chunks whose row
    ``j * (chunk // group) + m`` holds item ``m * group + j`` of the chunk, and the matching
    [C, chunk] bias (-inf on padding rows).

    Built in ~32 MB pieces written into one donated device buffer, so the only full-size copy
    beside the caller's array is the device one (``jnp.asarray`` of a whole permuted host copy
    would peak at three).
    """
    n, d = items.shape
    num_chunks = -(-n // chunk)
    per_chunk = chunk // group

    def permute(x: np.ndarray) -> np.ndarray:
        c = x.shape[0] // chunk
        return x.reshape(c, per_chunk, group, *x.shape[1:]).swapaxes(1, 2).reshape(
            c, chunk, *x.shape[1:])

    step = max(1, (32 * 2**20) // (chunk * d * 4))  # chunks per host -> device piece
    buf = jnp.zeros((num_chunks, chunk, d), jnp.float32)
    for c0 in range(0, num_chunks, step):
        c1 = min(num_chunks, c0 + step)
        piece = np.zeros(((c1 - c0) * chunk, d), np.float32)
        part = items[c0 * chunk : c1 * chunk]
        piece[: len(part)] = part
        buf = _write_chunks(buf, jax.device_put(permute(piece)), np.int32(c0))
    bias = np.where(np.arange(num_chunks * chunk) < n, 0.0, -np.inf).astype(np.float32)
    return buf, jax.device_put(permute(bias))


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
    chunk_size: int = 2048,
    query_block: int = 512,
    group_size: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query over every item, never materialising Q x N.

    Two stages per block of ``query_block`` queries (see ``_block_topk``): a scan over item
    chunks of ``chunk_size`` keeps only the maximum score of each group of ``group_size``
    consecutive items (0 = ``auto_group_size``), then the items of the k best groups are
    re-scored and the top-k taken.  A full top-k over every score — the cost that used to
    dominate — is replaced by one over N / group_size maxima plus one over k·group_size
    candidates per query, so the item-query matmul is most of the work.

    Memory: one device copy of the items (permuted into chunks, written piecewise),
    query_block x chunk scores, query_block x N / group_size group maxima, and 8 x k x
    group_size gathered candidate vectors — independent of the number of queries.  Shapes are
    static (last chunk and last query block zero-padded, padding scored -inf), so it compiles
    once per (query_block, chunk, d, k, group_size).  The defaults keep the query_block x chunk
    score tile (4 MB) in cache for the group-max pass that follows the matmul; a 32 MB tile
    (1024 x 8192) costs ~35% more CPU time.

    Ties are broken towards the lower item index.  ``k`` must be in [1, N] (ValueError
    otherwise); the chunk is enlarged to at least ``k`` and rounded up to a multiple of the
    group size.

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
    if chunk_size < 1 or query_block < 1 or group_size < 0:
        raise ValueError(f"chunk_size and query_block must be >= 1 and group_size >= 0, got "
                         f"{chunk_size}, {query_block}, {group_size}")
    k = int(k)
    if q.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    group = int(group_size) or auto_group_size(n, k)
    chunk = -(-max(min(chunk_size, n), k) // group) * group
    chunks, bias = _device_chunks(items, chunk, group)
    qb = min(query_block, q.shape[0])
    out_s = np.empty((q.shape[0], k), np.float32)
    out_i = np.empty((q.shape[0], k), np.int64)
    num_items = jnp.int32(n)
    for start in range(0, q.shape[0], qb):
        block = q[start : start + qb]
        rows = block.shape[0]
        if rows < qb:
            block = np.concatenate([block, np.zeros((qb - rows, d), np.float32)])
        s, i = _block_topk(jnp.asarray(block), chunks, bias, num_items, k, group)
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
    chunk_size: int = 2048,
    query_block: int = 512,
) -> dict[str, Any]:
    """Recall@K of queries against the whole catalogue, overall and per slice.

    Cut-offs with K > num_items are **omitted** (R@K would be trivially 1.0) and listed under
    ``ks_omitted``.  The result is ``summarize(...)`` plus ``ks``, ``ks_omitted``,
    ``num_items``, ``definition`` and ``per_query`` (``per_query_record``), JSON-serialisable.
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
                  definition=RECALL_DEFINITION,
                  per_query=per_query_record(query_set, per_query, used))
    return result


def per_query_record(query_set: QuerySet, per_query: np.ndarray, ks: Sequence[int]
                     ) -> dict[str, list]:
    """Per-query recalls as JSON columns (``query``, ``slice``, ``R@K``...): the unit a paired
    bootstrap over queries resamples (``vlp_jax.experiments.verdict``); rows align across runs
    by query text."""
    out: dict[str, list] = {"query": list(query_set.queries), "slice": list(query_set.slices)}
    for j, k in enumerate(ks):
        out[f"R@{k}"] = [round(float(x), 6) for x in per_query[:, j]]
    return out
