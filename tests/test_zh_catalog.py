"""Chinese end to end: the built-in ``zh`` catalog tokenises without [UNK] floods; a run learns."""

from __future__ import annotations

import json
import os
import unicodedata

import numpy as np

from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import from_config
from vlp_jax.eval import retrieval
from vlp_jax.train import loop as train


def _is_cjk(ch: str) -> bool:
    return "CJK UNIFIED IDEOGRAPH" in unicodedata.name(ch, "")


def chance_recall(relevant: list[np.ndarray], num_items: int, k: int) -> float:
    """Expected Recall@K (|rel ∩ top-K| / min(|rel|, K)) of a uniformly random ranking.

    Each relevant item lands in the top K with probability K/N, so the expected hit count is
    K |rel| / N; averaged over queries like the metric itself.
    """
    per_query = [k * len(r) / num_items / min(len(r), k) for r in relevant]
    return float(np.mean(per_query))


def test_chance_recall_matches_simulation():
    rng = np.random.default_rng(0)
    relevant = [np.array([0]), np.array([1, 2, 3]), np.arange(4, 60)]
    n, k = 100, 10
    sims = []
    for _ in range(2000):
        top = rng.permutation(n)[None, :k].repeat(len(relevant), 0)
        sims.append(retrieval.recall_at_k(top, relevant, [k]).mean())
    assert abs(np.mean(sims) - chance_recall(relevant, n, k)) < 0.015


def test_zh_catalog_tokenises_and_a_zh_run_learns(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.data.builtin_lang = "zh"
    # Text only: the Chinese text path is under test, and images would double the step cost.
    cfg.model.use_image = False
    cfg.loss.mpm_type = "none"
    cfg.train.num_steps = 30
    cfg.train.learning_rate = 2e-3
    cfg.train.log_every_steps = 1
    cfg.checkpoint.every_steps = 100
    cfg.eval.ks = (1, 10, 100)
    workdir = str(tmp_path / "zh_run")
    results = train.train_and_evaluate(cfg, workdir)

    # --- tokenisation of the held-out Chinese queries (never seen by the vocab trainer)
    handle = from_config.prepare_dataset(cfg.data)
    tok = tokenizer_lib.load_tokenizer(handle.tokenizer_dir)
    queries = retrieval.group_queries(handle.sources["test"]).queries
    assert len(queries) >= 20 and all(any(_is_cjk(c) for c in q) for q in queries)
    assert tokenizer_lib.unk_fraction(tok, queries) < 0.02
    for q in queries[:50]:
        ids = tok(q, add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        cjk = [p for p in pieces if any(_is_cjk(c) for c in p)]
        # Character split: every CJK piece is exactly one character ...
        assert all(len(p) == 1 for p in cjk), (q, pieces)
        # ... and together they spell every CJK character of the query, in order.
        assert "".join(cjk) == "".join(c for c in q if _is_cjk(c)), (q, pieces)

    # --- learning: loss falls, recall above chance
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    first = np.mean([rows[s]["loss"] for s in range(1, 6)])
    last = np.mean([rows[s]["loss"] for s in range(26, 31)])
    assert last < first - 0.2, (first, last)

    query_set = retrieval.group_queries(handle.sources[cfg.eval.split])
    query_set = query_set.subset(cfg.eval.max_queries)
    chance = chance_recall(query_set.relevant, results["num_items"], 100)
    recall = results["overall"]["R@100"]
    assert recall > chance + 0.2, (recall, chance)  # measured: 0.81 vs chance 0.33
