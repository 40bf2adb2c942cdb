"""The paired verdict: "A beats B" decided from the same seeds on both sides, at a declared alpha.

Runs with the same seed share the data order, the masks and the parameter initialisation, so
most of the seed-to-seed swing is common to A and B and cancels in the per-seed difference
``d_s = A_s - B_s``.  The rule therefore tests the paired differences, one-sided, with a test
named up front:

* ``paired_t``: one-sided paired t-test, ``t = mean(d) / (sd(d) / sqrt(n))`` on ``n - 1``
  degrees of freedom.  Can reach significance from ``n = 2`` seeds.
* ``sign_flip``: exact one-sided sign-flip permutation test: ``p`` = share of the ``2^n`` sign
  assignments of ``|d|`` whose mean is >= the observed mean.  Its smallest possible ``p`` is
  ``2^-n``, so it can reach ``alpha`` only from ``ceil(log2(1/alpha))`` seeds (5 at 0.05).

Verdicts: ``reproduced`` (A > B at ``alpha``), ``reversed`` (B > A at ``alpha``, the same test
the other way), ``inconclusive`` (neither), ``untestable`` (fewer seeds than the test needs to
reach ``alpha``; the claim's budget cannot decide it).  "Not reproduced" is never used for an
inconclusive result.

Beside the test, a per-query bootstrap interval of the difference: each query's hit (recall at
K) is averaged over the seeds on each side, the per-query difference is resampled over queries,
and the percentile interval is reported.  It answers "how large is the gain on this query
population", which the seed test (how repeatable is it) does not.

The old rule (``mean(A) - mean(B) > std(A) + std(B)``, unpaired) is kept as a column so old and
new verdicts can be read side by side (``report.classify``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

REPRODUCED, REVERSED, INCONCLUSIVE, UNTESTABLE = ("reproduced", "reversed", "inconclusive",
                                                  "untestable")
TESTS = ("paired_t", "sign_flip")


def min_seeds(test: str, alpha: float) -> int:
    """Fewest paired seeds at which ``test`` can give ``p < alpha`` at all."""
    _check(test, alpha)
    if test == "sign_flip":
        return max(2, math.ceil(math.log2(1.0 / alpha) + 1e-12))
    return 2


def _check(test: str, alpha: float) -> None:
    if test not in TESTS:
        raise ValueError(f"unknown paired test {test!r}; known: {TESTS}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def paired_t_p(deltas: Sequence[float]) -> float:
    """One-sided p-value of "mean(d) > 0" (paired t-test); 1.0 or 0.0 when sd(d) = 0."""
    d = np.asarray(deltas, np.float64)
    if d.size < 2:
        raise ValueError(f"a paired t-test needs >= 2 differences, got {d.size}")
    sd = d.std(ddof=1)
    if sd == 0.0:
        return 0.0 if d.mean() > 0 else 1.0
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(stats.t.sf(t, d.size - 1))


def sign_flip_p(deltas: Sequence[float]) -> float:
    """Exact one-sided sign-flip p-value of "mean(d) > 0" (all 2^n sign patterns; n <= 20)."""
    d = np.asarray(deltas, np.float64)
    if not 1 <= d.size <= 20:
        raise ValueError(f"sign_flip needs 1..20 differences, got {d.size}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    means = (signs * np.abs(d)).mean(axis=1)
    return float(np.mean(means >= d.mean() - 1e-12))


def p_value(test: str, deltas: Sequence[float]) -> float:
    return paired_t_p(deltas) if test == "paired_t" else sign_flip_p(deltas)


def paired_verdict(deltas: Sequence[float], test: str = "paired_t", alpha: float = 0.05
                   ) -> dict[str, Any]:
    """Verdict on "A beats B" from per-seed differences ``A_s - B_s`` (see module docstring)."""
    _check(test, alpha)
    d = [float(x) for x in deltas]
    need = min_seeds(test, alpha)
    out: dict[str, Any] = {"test": test, "alpha": alpha, "n": len(d), "min_seeds": need,
                           "mean_delta": float(np.mean(d)) if d else math.nan,
                           "p_greater": math.nan, "p_less": math.nan}
    if len(d) < need:
        return {**out, "verdict": UNTESTABLE}
    out["p_greater"] = p_value(test, d)
    out["p_less"] = p_value(test, [-x for x in d])
    if out["p_greater"] < alpha:
        verdict = REPRODUCED
    elif out["p_less"] < alpha:
        verdict = REVERSED
    else:
        verdict = INCONCLUSIVE
    return {**out, "verdict": verdict}


def query_hits(per_query: Mapping[str, Sequence], metric: str, slice_: str = "overall"
               ) -> dict[str, float]:
    """``{query: hit}`` of one run's ``per_query`` record (``eval.retrieval.per_query_record``),
    restricted to ``slice_`` unless it is ``overall``."""
    if metric not in per_query:
        raise KeyError(f"per-query record has no {metric!r} (has {sorted(per_query)})")
    return {q: float(h) for q, s, h in zip(per_query["query"], per_query["slice"],
                                           per_query[metric], strict=True)
            if slice_ == "overall" or s == slice_}


def pooled_query_deltas(a_runs: Sequence[Mapping[str, float]],
                        b_runs: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Per-query difference of the seed-averaged hits, over the queries every run evaluated."""
    if not a_runs or not b_runs:
        raise ValueError("both sides need at least one run with per-query hits")
    common = set(a_runs[0])
    for r in (*a_runs, *b_runs):
        common &= set(r)
    if not common:
        raise ValueError("the runs share no evaluated query: different eval splits?")
    queries = sorted(common)
    a = np.mean([[r[q] for q in queries] for r in a_runs], axis=0)
    b = np.mean([[r[q] for q in queries] for r in b_runs], axis=0)
    return a - b


def bootstrap_ci(deltas: np.ndarray, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(deltas)`` resampling the entries (queries)."""
    d = np.asarray(deltas, np.float64)
    if d.size == 0:
        raise ValueError("no per-query differences to resample")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
