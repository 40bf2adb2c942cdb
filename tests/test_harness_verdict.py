"""The paired verdict (``experiments.verdict``) against hand-computed numbers, and the
per-query output of the evaluation that its bootstrap resamples."""

import math

import numpy as np
import pytest

from vlp_jax.eval import retrieval
from vlp_jax.experiments import verdict


def test_paired_t_hand_computed():
    # The 800-step bank claim's paired differences (issue 37): mean 0.028667, sd 0.0090185,
    # t = 0.028667 / (0.0090185 / sqrt 3) = 5.5056 on 2 df.  With 2 df the t tail has the closed
    # form P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2 = 0.015722.
    d = [0.038, 0.020, 0.028]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert t == pytest.approx(5.5056, abs=1e-4)
    p = (1 - t / math.sqrt(t * t + 2)) / 2
    assert p == pytest.approx(0.015722, abs=1e-6)
    out = verdict.paired_verdict(d, "paired_t", 0.05)
    assert out["p_greater"] == pytest.approx(p, rel=1e-9)
    assert out["verdict"] == verdict.REPRODUCED and out["min_seeds"] == 2
    assert out["mean_delta"] == pytest.approx(mean)
    # The same differences at alpha 0.01 do not clear the bar; negated they are "reversed".
    assert verdict.paired_verdict(d, "paired_t", 0.01)["verdict"] == verdict.INCONCLUSIVE
    assert verdict.paired_verdict([-x for x in d])["verdict"] == verdict.REVERSED


def test_sign_flip_hand_computed_and_its_seed_floor():
    # All 8 sign patterns of |d| = (1, 2, 3): sums 6, 4, 2, 0, 0, -2, -4, -6; observed sum 6
    # is reached by 1 of 8 -> p = 0.125; observed (1, -2, 3) = 2 is met by 6, 4, 2 -> 3/8.
    assert verdict.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(1 / 8)
    assert verdict.sign_flip_p([1.0, -2.0, 3.0]) == pytest.approx(3 / 8)
    # Smallest reachable p is 2^-n: at alpha 0.05 it needs 5 seeds (2^-5 = 0.031).
    assert verdict.min_seeds("sign_flip", 0.05) == 5
    assert verdict.min_seeds("sign_flip", 0.10) == 4
    three = verdict.paired_verdict([0.038, 0.020, 0.028], "sign_flip", 0.05)
    assert three["verdict"] == verdict.UNTESTABLE and math.isnan(three["p_greater"])
    five = verdict.paired_verdict([0.01, 0.02, 0.03, 0.04, 0.05], "sign_flip", 0.05)
    assert five["p_greater"] == pytest.approx(1 / 32) and five["verdict"] == verdict.REPRODUCED


def test_inconclusive_untestable_and_bad_arguments():
    assert verdict.paired_verdict([0.02, -0.01, 0.01])["verdict"] == verdict.INCONCLUSIVE
    assert verdict.paired_verdict([0.05])["verdict"] == verdict.UNTESTABLE
    assert verdict.paired_verdict([0.01, 0.01])["verdict"] == verdict.REPRODUCED  # sd = 0
    with pytest.raises(ValueError, match="unknown paired test 'wilcoxon'"):
        verdict.paired_verdict([0.1, 0.2], "wilcoxon")
    with pytest.raises(ValueError, match="alpha must be in"):
        verdict.paired_verdict([0.1, 0.2], alpha=1.5)


def test_pooled_query_deltas_and_bootstrap():
    # Two seeds per side; query "c" was not evaluated by one run and drops out.
    a = [{"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0}]
    b = [{"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1.0, "b": 0.0}]
    d = verdict.pooled_query_deltas(a, b)
    np.testing.assert_allclose(d, [0.5, 0.5])  # a: (1+1)/2 - (0+1)/2; b: (0+1)/2 - 0
    assert verdict.bootstrap_ci(d) == (0.5, 0.5)
    rng = np.random.default_rng(1)
    x = rng.normal(0.1, 1.0, 400)
    lo, hi = verdict.bootstrap_ci(x, resamples=4000)
    se = x.std(ddof=1) / math.sqrt(x.size)  # the normal-theory interval, for comparison
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.15 * se * 1.96)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.15 * se * 1.96)
    with pytest.raises(ValueError, match="share no evaluated query"):
        verdict.pooled_query_deltas([{"a": 1.0}], [{"b": 1.0}])


def test_evaluate_writes_per_query_hits():
    items = np.eye(4, dtype=np.float32)
    queries = np.array([[1, 0, 0, 0], [0, 0.9, 1, 0], [0, 0.5, 0, 1]], np.float32)
    qs = retrieval.QuerySet(["q0", "q1", "q2"], ["visual", "textual", "visual"],
                            [np.array([0]), np.array([1]), np.array([0, 3])])
    res = retrieval.evaluate(queries, items, qs, ks=(1, 2))
    pq = res["per_query"]
    assert pq["query"] == ["q0", "q1", "q2"] and pq["slice"] == ["visual", "textual", "visual"]
    assert pq["R@1"] == [1.0, 0.0, 1.0] and pq["R@2"] == [1.0, 1.0, 0.5]
    assert np.mean(pq["R@1"]) == pytest.approx(res["overall"]["R@1"])
    assert verdict.query_hits(pq, "R@2", "visual") == {"q0": 1.0, "q2": 0.5}
    with pytest.raises(KeyError, match="no 'R@10'"):
        verdict.query_hits(pq, "R@10")
