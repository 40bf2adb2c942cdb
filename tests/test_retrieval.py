"""Retrieval maths: a hand-computed example, chunked top-k vs brute force, slices, report files."""

import json
import os

import numpy as np
import pytest

from vlp_jax.eval import (
    chunked_topk,
    evaluate,
    group_queries,
    recall_at_k,
    summarize,
    write_report,
)
from vlp_jax.eval.retrieval import auto_group_size

# Hand-made catalogue (integer vectors: every score is exact in float32).
ITEMS = np.array([[3, 0], [2, 1], [0, 3], [1, 2], [-1, -1]], np.float32)
QUERIES = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
# Scores   A=[1,0]: 3, 2, 0, 1, -1   -> ranking 0, 1, 3, 2, 4
#          B=[0,1]: 0, 1, 3, 2, -1   -> ranking 2, 3, 1, 0, 4
#          C=[1,1]: 3, 3, 3, 3, -2   -> all tied: lower index first 0, 1, 2, 3, 4
PAIRS = [
    {"query": "A", "item_index": 1, "slice": "visual"},
    {"query": "B", "item_index": 2, "slice": "textual"},
    {"query": "C", "item_index": 3, "slice": "visual"},
    {"query": "A", "item_index": 2, "slice": "visual"},
    {"query": "C", "item_index": 4, "slice": "textual"},  # C keeps its first slice
    {"query": "C", "item_index": 3, "slice": "visual"},  # duplicate pair
    {"query": "C", "item_index": 2, "slice": "visual"},
]
# Recall@K = hits / min(|relevant|, K):
#   A rel {1,2}:   R@1 0/1, R@2 1/2, R@4 2/2
#   B rel {2}:     R@1 1/1, R@2 1/1, R@4 1/1
#   C rel {2,3,4}: R@1 0/1, R@2 0/2, R@4 2/3  (3 relevant items > K for K=1, 2)
EXPECTED = np.array([[0, 0.5, 1], [1, 1, 1], [0, 0, 2 / 3]])


def test_group_queries_order_slices_and_dedup():
    qs = group_queries(PAIRS)
    assert qs.queries == ["A", "B", "C"]
    assert qs.slices == ["visual", "textual", "visual"]
    assert [r.tolist() for r in qs.relevant] == [[1, 2], [2], [2, 3, 4]]
    assert len(qs) == 3
    sub = qs.subset(2)
    assert sub.queries == ["A", "B"] and sub.slices == ["visual", "textual"]
    assert [r.tolist() for r in sub.relevant] == [[1, 2], [2]]
    assert len(qs.subset(10)) == 3
    with pytest.raises(ValueError, match="max_queries must be >= 1"):
        qs.subset(0)
    # TFDS data sources hand back bytes; a missing slice means untagged.
    qs = group_queries([{"query": b"caf\xc3\xa9", "item_index": np.int64(7)}])
    assert qs.queries == ["café"] and qs.slices == [""] and qs.relevant[0].tolist() == [7]
    with pytest.raises(ValueError, match="pair #1 has no 'item_index'"):
        group_queries([{"query": "a", "item_index": 0}, {"query": "b"}])


def test_chunked_topk_hand_example_with_padding_and_ties():
    scores, idx = chunked_topk(QUERIES, ITEMS, 4, chunk_size=2, query_block=2)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    assert idx.tolist() == [[0, 1, 3, 2], [2, 3, 1, 0], [0, 1, 2, 3]]
    assert scores.tolist() == [[3, 2, 1, 0], [3, 2, 1, 0], [3, 3, 3, 3]]


def test_recall_and_evaluate_hand_example():
    qs = group_queries(PAIRS)
    _, idx = chunked_topk(QUERIES, ITEMS, 4)
    np.testing.assert_allclose(recall_at_k(idx, qs.relevant, (1, 2, 4)), EXPECTED)
    res = evaluate(QUERIES, ITEMS, qs, ks=(10, 1, 2, 4), chunk_size=2, query_block=2)
    assert res["ks"] == [1, 2, 4] and res["ks_omitted"] == [10] and res["num_items"] == 5
    np.testing.assert_allclose(
        [res["overall"][k] for k in ("R@1", "R@2", "R@4")], [1 / 3, 0.5, 8 / 9])
    np.testing.assert_allclose(list(res["per_slice"]["visual"].values()), [0, 0.25, 5 / 6])
    np.testing.assert_allclose(list(res["per_slice"]["textual"].values()), [1, 1, 1])
    assert res["num_queries"] == {"overall": 3, "textual": 1, "visual": 2}
    json.dumps(res)  # JSON-serialisable as returned


def brute_force_topk(q, items, k):
    scores = q @ items.T
    order = np.stack([np.lexsort((np.arange(len(items)), -row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize(
    "n,k,chunk,block,group",
    [(103, 10, 16, 8, 0), (103, 20, 16, 64, 0), (37, 37, 8, 5, 0),
     # Two-stage path with real groups: ties between groups, a group straddling the end of
     # the catalogue, fewer groups than k, a chunk that is not a multiple of the group.
     (103, 10, 16, 8, 4), (103, 20, 30, 16, 7), (37, 30, 8, 5, 3), (200, 5, 64, 24, 16)],
)
def test_chunked_topk_equals_brute_force_with_ties(n, k, chunk, block, group):
    rng = np.random.default_rng(n + k)
    # Small integers: exact float32 scores and many ties, so the tie order is really tested.
    q = rng.integers(-2, 3, size=(23, 4)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    scores, idx = chunked_topk(q, items, k, chunk_size=chunk, query_block=block,
                               group_size=group)
    want_s, want_i = brute_force_topk(q, items, k)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_array_equal(scores, want_s)


@pytest.mark.parametrize("group", [0, 8])
def test_chunked_topk_random_float_scores(group):
    rng = np.random.default_rng(5)
    q, items = rng.normal(size=(17, 8)), rng.normal(size=(250, 8))
    scores, idx = chunked_topk(q, items, 7, chunk_size=64, query_block=4, group_size=group)
    want_s, want_i = brute_force_topk(q.astype(np.float32), items.astype(np.float32), 7)
    np.testing.assert_array_equal(idx, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5)


def test_auto_group_size():
    assert auto_group_size(1_000_000, 100) == 22  # sqrt(1e6 / 2000)
    assert auto_group_size(1_000_000, 1000) == 7
    assert auto_group_size(300, 100) == 1
    assert auto_group_size(10**9, 1) == 64


def test_chunked_topk_errors():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_items=5\]"):
        chunked_topk(QUERIES, ITEMS, 6)
    with pytest.raises(ValueError, match="query_emb dim 3 != item_emb dim 2"):
        chunked_topk(np.zeros((2, 3)), ITEMS, 1)
    with pytest.raises(ValueError, match="group_size >= 0, got 2048, 512, -1"):
        chunked_topk(QUERIES, ITEMS, 1, group_size=-1)
    with pytest.raises(ValueError, match="item_emb contains NaN"):
        chunked_topk(QUERIES, np.full((4, 2), np.nan), 1)
    s, i = chunked_topk(np.zeros((0, 2)), ITEMS, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def test_recall_at_k_errors():
    idx = np.array([[0, 1]])
    with pytest.raises(ValueError, match=r"ks \[3\] outside"):
        recall_at_k(idx, [np.array([0])], (1, 3))
    with pytest.raises(ValueError, match="no relevant items"):
        recall_at_k(idx, [np.array([], np.int64)], (1,))
    with pytest.raises(ValueError, match="1 relevant sets for 2 rows"):
        recall_at_k(np.zeros((2, 2), int), [np.array([0])], (1,))


def test_evaluate_errors():
    qs = group_queries(PAIRS)
    with pytest.raises(ValueError, match="every K"):
        evaluate(QUERIES, ITEMS, qs, ks=(6, 100))
    with pytest.raises(ValueError, match="query_emb has 2 rows but the query set has 3"):
        evaluate(QUERIES[:2], ITEMS, qs)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        evaluate(QUERIES, ITEMS[:4], qs, ks=(1,))


def test_summarize_slices():
    per_query = np.array([[0.0, 1.0], [1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])
    res = summarize(per_query, ["a", "", "b", "a"], (1, 5))
    assert res["overall"] == {"R@1": 0.375, "R@5": 0.625}
    assert res["per_slice"] == {
        "a": {"R@1": 0.0, "R@5": 0.5},
        "b": {"R@1": 0.5, "R@5": 0.5},
        "untagged": {"R@1": 1.0, "R@5": 1.0},
    }
    assert res["num_queries"] == {"overall": 4, "a": 2, "b": 1, "untagged": 1}
    # No tags at all: only the overall numbers.
    res = summarize(per_query, ["", "", "", ""], (1, 5))
    assert res["per_slice"] == {} and res["num_queries"] == {"overall": 4}
    with pytest.raises(ValueError, match="got 3 slices for 4 queries"):
        summarize(per_query, ["a", "b", "c"], (1, 5))


def test_write_report_files(tmp_path):
    res = evaluate(QUERIES, ITEMS, group_queries(PAIRS), ks=(1, 2, 4, 10))
    out = tmp_path / "eval"
    write_report(res, str(out), title="Tiny eval", extra={"step": 42})
    assert sorted(os.listdir(out)) == ["recall.json", "recall_at_k.png", "report.md"]
    data = json.loads((out / "recall.json").read_text())
    assert data["title"] == "Tiny eval" and data["extra"] == {"step": 42}
    assert data["overall"]["R@2"] == 0.5
    assert data["per_slice"]["visual"]["R@4"] == pytest.approx(5 / 6)
    md = (out / "report.md").read_text()
    assert "| slice | queries | R@1 | R@2 | R@4 |" in md
    assert "| overall | 3 | 0.3333 | 0.5000 | 0.8889 |" in md
    assert "| visual | 2 | 0.0000 | 0.2500 | 0.8333 |" in md
    assert "| textual | 1 | 1.0000 | 1.0000 | 1.0000 |" in md
    assert "min(|relevant|, K)" in md and "- step: 42" in md and "[10]" in md
    png = (out / "recall_at_k.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    # Rewriting replaces the files in place and leaves no temporary files behind.
    write_report(res, str(out))
    assert sorted(os.listdir(out)) == ["recall.json", "recall_at_k.png", "report.md"]
    assert "extra" not in json.loads((out / "recall.json").read_text())
    with pytest.raises(ValueError, match="'overall'"):
        write_report({}, str(out))
