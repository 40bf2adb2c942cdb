"""The query caches: embedding hits equal the encoder's rows, repeated texts are encoded once,
least recently used rows go first, the bounds hold, and cached hits serve only their own index
snapshot and only as many as were kept (fake encoder, no model)."""

import numpy as np
import pytest

from vlp_jax.serve.query_cache import QueryEmbeddingCache, ResultCache

DIM = 4


class Encoder:
    """A deterministic fake tower that records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.asarray([[len(t), sum(map(ord, t)) % 97, i, 1.0] for i, t in
                           enumerate(texts)], np.float32)

    @staticmethod
    def row(text, position):
        return np.asarray([len(text), sum(map(ord, text)) % 97, position, 1.0], np.float32)


def test_hits_return_the_first_rows_and_duplicates_are_encoded_once():
    lookups = []
    cache = QueryEmbeddingCache(8, DIM, on_lookup=lambda h, m: lookups.append((h, m)))
    enc = Encoder()
    first = cache.embed(["red dress", "hat", "red dress", "bag"], enc)
    assert enc.calls == [["red dress", "hat", "bag"]]  # distinct, first-seen order
    np.testing.assert_array_equal(first[0], Encoder.row("red dress", 0))
    np.testing.assert_array_equal(first[2], first[0])
    np.testing.assert_array_equal(first[3], Encoder.row("bag", 2))
    second = cache.embed(["bag", "shoe", "hat"], enc)
    assert enc.calls[1] == ["shoe"]  # only the unknown text reaches the encoder
    np.testing.assert_array_equal(second[0], first[3])  # the row stored by the first call
    np.testing.assert_array_equal(second[2], first[1])
    np.testing.assert_array_equal(second[1], Encoder.row("shoe", 0))
    assert lookups == [(1, 3), (2, 1)] and (cache.hits, cache.misses) == (3, 4)
    third = cache.embed(["hat", "bag"], enc)  # all hits: no encoder call
    assert len(enc.calls) == 2 and third.dtype == np.float32 and third.shape == (2, DIM)


def test_least_recently_used_rows_are_evicted_and_the_bound_holds():
    cache, enc = QueryEmbeddingCache(3, DIM), Encoder()
    cache.embed(["a", "b", "c"], enc)
    cache.embed(["a"], enc)  # "a" is now the most recently used; "b" the least
    cache.embed(["d"], enc)
    assert len(cache) == 3 and "b" not in cache and {"a", "c", "d"} <= {*cache._slot}
    got = cache.embed(["a", "c", "d", "b"], enc)
    assert enc.calls[-1] == ["b"]
    np.testing.assert_array_equal(got[0], Encoder.row("a", 0))
    np.testing.assert_array_equal(got[2], Encoder.row("d", 0))
    # The hits a, c, d were refreshed in that order, so "a" was the least recent when "b" came.
    assert len(cache) == 3 and "a" not in cache and "c" in cache


def test_more_new_texts_than_capacity_keeps_rows_and_keys_consistent():
    cache, enc = QueryEmbeddingCache(2, DIM), Encoder()
    texts = ["w", "xx", "yyy", "zzzz", "xx"]
    got = cache.embed(texts, enc)
    for i, t in enumerate(texts):  # every caller still gets its own text's row
        np.testing.assert_array_equal(got[i][:2], Encoder.row(t, 0)[:2])
    assert sorted(cache._slot) == ["yyy", "zzzz"]  # the newest `capacity` texts
    again = cache.embed(["yyy", "zzzz"], enc)
    np.testing.assert_array_equal(again, got[[2, 3]])
    assert len(enc.calls) == 1


def test_capacity_zero_is_a_pass_through_and_bad_input_is_refused():
    cache, enc = QueryEmbeddingCache(0, DIM), Encoder()
    cache.embed(["a", "a"], enc)
    cache.embed(["a"], enc)
    assert enc.calls == [["a", "a"], ["a"]] and len(cache) == 0 and cache.misses == 3
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        QueryEmbeddingCache(-1, DIM)
    with pytest.raises(ValueError, match="returned shape"):
        QueryEmbeddingCache(4, DIM + 1).embed(["a"], enc)


def test_result_cache_serves_prefixes_of_its_own_snapshot_only():
    cache = ResultCache(2)
    scores, labels = np.linspace(1, 0, 10, dtype=np.float32), np.arange(10, 20)
    cache.put("dress", 1, scores, labels)
    scores[:] = -1  # the cache holds a copy, not the batch's array
    got = cache.get("dress", 1, 4)
    np.testing.assert_array_equal(got[1], [10, 11, 12, 13])
    np.testing.assert_allclose(got[0], np.linspace(1, 0, 10)[:4])
    assert cache.get("dress", 2, 4) is None  # another index snapshot (after a swap)
    assert cache.get("dress", 1, 11) is None  # more hits than were kept
    cache.put("dress", 1, np.zeros(5, np.float32), np.arange(5))  # fewer hits: kept entry wins
    assert len(cache.get("dress", 1, 10)[1]) == 10
    cache.put("dress", 2, np.zeros(3, np.float32), np.arange(3))  # the new snapshot replaces
    assert cache.get("dress", 1, 1) is None and list(cache.get("dress", 2, 3)[1]) == [0, 1, 2]
    cache.put("hat", 2, np.zeros(3, np.float32), np.arange(3))
    cache.get("dress", 2, 1)  # "hat" is now the least recently used
    cache.put("bag", 2, np.zeros(3, np.float32), np.arange(3))
    assert len(cache) == 2 and cache.get("hat", 2, 1) is None
    assert (cache.hits, cache.misses) == (4, 4)
    off = ResultCache(0)
    off.put("dress", 1, scores, labels)
    assert off.get("dress", 1, 1) is None and len(off) == 0
