"""Declared claims under the reviewer's protocol: declare, select on ``valid``, confirm on ``test``.

A ``Declared`` claim fixes before any run: the metric and slice, the baseline, the candidates
for "A", the seed count, the paired test and its alpha, the splits and the budget (the grid's
common overrides).  The protocol is:

1. **Selection** (``ablate --grid=G``): every variant trains with ``eval.split = "valid"``; among
   the claim's ``candidates`` the one with the highest mean paired difference to the baseline on
   ``valid`` is selected (``select``).  Steps, weights and options are chosen here, never on test.
2. **Confirmation** (``ablate --grid=G --confirm``): the selected candidate's and the baseline's
   checkpoints are evaluated on ``test``, once (``vlp_jax.experiments.confirm``); the verdict is
   the paired test over seeds (``verdict.paired_verdict``) with a per-query bootstrap interval.

Only *admissible* runs count: stamped, intact (``stamps.check_run``) or declared ``reused`` by
the claim, and not exploratory (started after the claim's declaration commit).  The old
"gap > std_A + std_B" verdict is reported beside the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from vlp_jax.experiments import grids, stamps, verdict

SELECT_SPLIT, CONFIRM_SPLIT = "valid", "test"
VALID_DIR, TEST_DIR = "eval", "eval_test"  # run-folder subdirectories holding recall.json


@dataclasses.dataclass(frozen=True)
class Declared:
    """"Some candidate, selected on valid, beats ``baseline`` on test" (one-sided)."""

    claim_id: str
    text: str
    candidates: tuple[str, ...]
    baseline: str
    metric: str = "R@10"
    slice: str = "overall"
    seeds: int = 3
    test: str = "paired_t"
    alpha: float = 0.05
    budget: str = ""
    source: str = ""
    reused: tuple[str, ...] = ()  # "variant/seedN" runs admitted despite a stamp mismatch

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError(f"claim {self.claim_id}: no candidates")
        if self.baseline in self.candidates:
            raise ValueError(f"claim {self.claim_id}: the baseline is also a candidate")
        if self.seeds < verdict.min_seeds(self.test, self.alpha):
            raise ValueError(
                f"claim {self.claim_id}: {self.seeds} seeds cannot reach alpha={self.alpha} with "
                f"{self.test} (needs >= {verdict.min_seeds(self.test, self.alpha)})")


@dataclasses.dataclass(frozen=True)
class ProtocolGrid:
    """A grid whose claims follow the protocol. ``catalog``: generator keyword arguments of
    the built-in catalog every run trains on (``None`` = the config's own catalog); the harness
    generates it once and points ``data.catalog_dir`` at it. ``source_file``: where the claims
    are declared (their commit time is looked up there)."""

    grid: grids.Grid
    claims: tuple[Declared, ...]
    catalog: dict[str, Any] | None = None
    source_file: str = ""

    def __post_init__(self) -> None:
        names = {v.name for v in self.grid.variants}
        if self.grid.common.get("eval.split") != SELECT_SPLIT:
            raise ValueError(f"grid {self.grid.name}: common overrides must set "
                             f"eval.split={SELECT_SPLIT!r} (selection never looks at test)")
        for c in self.claims:
            missing = [v for v in (*c.candidates, c.baseline) if v not in names]
            if missing:
                raise ValueError(f"claim {c.claim_id}: unknown variants {missing}")


def label(variant: str, seed: int) -> str:
    return f"{variant}/seed{seed}"


def declaration(pg: ProtocolGrid, claim: Declared) -> dict[str, Any] | None:
    """When the claim was committed (first commit adding ``claim_id="<id>"``), or None."""
    return stamps.declaration_time(f'claim_id="{claim.claim_id}"', pg.source_file)


def claim_hash(claim: Declared) -> str:
    """SHA-256 of the claim's definition (all fields but ``reused``): stamped into each run at
    its start, so a claim edited after its runs began cannot count them."""
    fields = {k: v for k, v in dataclasses.asdict(claim).items() if k != "reused"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def admissible(run: dict[str, Any], claim: Declared, declared: dict[str, Any] | None
               ) -> tuple[bool, str]:
    """(counts for the claim?, status) of one run record (``report.collect_runs``)."""
    tag = label(run["variant"], run["seed"])
    if run.get("provenance"):
        if tag not in claim.reused:
            return False, "refused: " + "; ".join(run["provenance"])
        status = "reused"
    else:
        status = "ok"
    if stamps.is_exploratory(run.get("stamp"), declared):
        return False, "exploratory (started before the claim was declared)"
    if (run.get("stamp") or {}).get("claims", {}).get(claim.claim_id) != claim_hash(claim):
        return False, "exploratory (the claim was absent or different when the run started)"
    return True, status


def _by_seed(runs: Sequence[dict[str, Any]], variant: str, key: str, metric: str, slice_: str
             ) -> dict[int, dict[str, Any]]:
    """seed -> run record with results under ``key`` ("valid"/"test") for ``variant``."""
    out = {}
    for r in runs:
        res = r.get(key)
        if r["variant"] == variant and res is not None:
            rec = res["overall"] if slice_ == "overall" else res["per_slice"].get(slice_, {})
            if metric in rec:
                out[r["seed"]] = r
    return out


def _value(run: dict[str, Any], key: str, metric: str, slice_: str) -> float:
    res = run[key]
    return (res["overall"] if slice_ == "overall" else res["per_slice"][slice_])[metric]


def select(claim: Declared, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the largest mean paired valid difference to the baseline."""
    base = _by_seed(runs, claim.baseline, "valid", claim.metric, claim.slice)
    table = {}
    for cand in claim.candidates:
        a = _by_seed(runs, cand, "valid", claim.metric, claim.slice)
        seeds = sorted(set(a) & set(base))
        d = [_value(a[s], "valid", claim.metric, claim.slice)
             - _value(base[s], "valid", claim.metric, claim.slice) for s in seeds]
        table[cand] = {"seeds": seeds, "mean_delta": sum(d) / len(d) if d else math.nan}
    ready = {c: t for c, t in table.items() if len(t["seeds"]) >= claim.seeds}
    chosen = max(ready, key=lambda c: ready[c]["mean_delta"]) if len(ready) == len(table) else None
    return {"claim_id": claim.claim_id, "split": SELECT_SPLIT, "selected": chosen,
            "candidates": table}


def judge(pg: ProtocolGrid, claim: Declared, runs: Sequence[dict[str, Any]],
          selected: str | None, legacy: Any) -> dict[str, Any]:
    """Verdict of one declared claim on the test split (see the module docstring).

    ``legacy``: the old unpaired rule, ``classify(a_values, b_values) -> str``.
    """
    declared = declaration(pg, claim)
    row: dict[str, Any] = {**dataclasses.asdict(claim), "declared": declared,
                           "selected": selected, "split": CONFIRM_SPLIT, "runs": {}}
    if selected is None:
        return {**row, "verdict": "not selected yet (selection runs on valid unfinished)"}
    admitted: dict[str, dict[int, dict[str, Any]]] = {}
    for side in (selected, claim.baseline):
        admitted[side] = {}
        for seed, r in _by_seed(runs, side, "test", claim.metric, claim.slice).items():
            ok, status = admissible(r, claim, declared)
            row["runs"][label(side, seed)] = status
            if ok:
                admitted[side][seed] = r
    a, b = admitted[selected], admitted[claim.baseline]
    seeds = sorted(set(a) & set(b))
    av = [_value(a[s], "test", claim.metric, claim.slice) for s in seeds]
    bv = [_value(b[s], "test", claim.metric, claim.slice) for s in seeds]
    deltas = [x - y for x, y in zip(av, bv, strict=True)]
    paired = verdict.paired_verdict(deltas, claim.test, claim.alpha)
    row.update(seeds=seeds, a_values=av, b_values=bv, deltas=deltas, **paired,
               old_rule=legacy(av, bv) if seeds else "not run")
    if len(seeds) < claim.seeds:  # fewer seeds than declared never decide the claim
        row["verdict"] = (f"{verdict.UNTESTABLE}: {len(seeds)} of {claim.seeds} declared seeds "
                          f"admissible")
    try:
        q = verdict.pooled_query_deltas(
            [verdict.query_hits(a[s]["test"]["per_query"], claim.metric, claim.slice)
             for s in seeds],
            [verdict.query_hits(b[s]["test"]["per_query"], claim.metric, claim.slice)
             for s in seeds])
        row["query_ci95"] = verdict.bootstrap_ci(q)
        row["num_queries"] = int(q.size)
    except (KeyError, ValueError) as e:
        row["query_ci95"], row["ci_note"] = None, str(e)
    return row


def catalog_dir(spec: dict[str, Any], cache_dir: str = "") -> str:
    """Where the harness keeps the generated catalog of ``spec`` (one folder per spec)."""
    root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax")
    name = "protocol_" + "_".join(f"{k}-{v}" for k, v in sorted(spec.items())).replace(
        " ", "").replace(",", "-").replace("(", "").replace(")", "")
    return os.path.join(os.path.abspath(root), "catalogs", name)


def ensure_catalog(spec: dict[str, Any], cache_dir: str = "") -> str:
    """Generate the grid's catalog once (deterministic bytes) and return its folder."""
    from vlp_jax.data import catalog

    out = catalog_dir(spec, cache_dir)
    if not os.path.isfile(os.path.join(out, "catalog_info.json")):
        catalog.generate_catalog(out, **spec)
    return out
