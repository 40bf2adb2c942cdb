"""The ablation report: ``results.json``, ``RESULTS.md`` and a bar chart from finished runs.

Numbers come only from each run's own ``eval/recall.json`` (written by ``vlp_jax.eval.report``)
and the harness's ``ablate_run.json``, so the report can be rebuilt at any time
(``--report_only``) and always shows exactly the runs that finished.

Verdict rule for a claim "A beats B on metric M in slice S" (``classify``), over seeds:
``reproduced`` when mean(A) - mean(B) > std(A) + std(B) (sample std), ``not reproduced`` when
mean(B) - mean(A) > std(A) + std(B), otherwise ``inconclusive`` (the mean ± std spreads overlap),
and also ``inconclusive`` with fewer than 2 finished seeds on either side.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlp_jax.experiments import grids
from vlp_jax.runtime import atomic_io

METRICS = ("R@1", "R@10", "R@100")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
NOT_RUN = "not run"  # a side of the claim has no finished run yet
CHART = "recall_bars.png"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def classify(a: Sequence[float], b: Sequence[float]) -> str:
    """Verdict on "A beats B" from per-seed values (see the module docstring for the rule)."""
    if len(a) < 2 or len(b) < 2:
        return INCONCLUSIVE
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if ma - mb > sa + sb:
        return REPRODUCED
    if mb - ma > sa + sb:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def collect_runs(grid: grids.Grid, jobs: Sequence[Any]) -> list[dict[str, Any]]:
    """One record per finished job: variant, seed, config diff, recalls, wall time."""
    runs = []
    for job in jobs:
        recall = _read_json(os.path.join(job.run_dir, "eval", "recall.json"))
        if recall is None:
            continue
        meta = _read_json(os.path.join(job.run_dir, "ablate_run.json")) or {}
        attempts = meta.get("attempts", [])
        diff = {k: v for k, v in job.overrides.items()
                if k != "train.seed" and (k not in grid.common or grid.common[k] != v)}
        keep = [k for k in METRICS if k in recall["overall"]]
        runs.append({
            "variant": job.variant,
            "seed": job.seed,
            "config_diff": json.loads(json.dumps(diff, default=str)),
            "run_dir": job.run_dir,
            "step": recall.get("step"),
            "num_items": recall.get("num_items"),
            "num_queries": recall.get("num_queries", {}),
            "overall": {k: recall["overall"][k] for k in keep},
            "per_slice": {s: {k: r[k] for k in keep if k in r}
                          for s, r in recall.get("per_slice", {}).items()},
            "wall_time_s": round(sum(a["seconds"] for a in attempts), 2) if attempts else None,
            "attempts": len(attempts),
        })
    return runs


def _value(run: dict[str, Any], metric: str, slice_: str) -> float | None:
    rec = run["overall"] if slice_ == "overall" else run["per_slice"].get(slice_, {})
    return rec.get(metric)


def slices_of(runs: Sequence[dict[str, Any]]) -> list[str]:
    return ["overall", *sorted({s for r in runs for s in r["per_slice"]})]


def values(runs: Sequence[dict[str, Any]], variant: str, metric: str, slice_: str
           ) -> list[float]:
    """Per-seed values of one cell, ordered by seed."""
    out = [(r["seed"], _value(r, metric, slice_)) for r in runs if r["variant"] == variant]
    return [v for _, v in sorted(out) if v is not None]


def summarize(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """``{variant: {slice: {metric: {"mean", "std", "n", "values"}}}}`` over seeds."""
    out: dict[str, Any] = {}
    for v in variants:
        out[v] = {}
        for s in slices_of(runs):
            out[v][s] = {}
            for m in METRICS:
                vals = values(runs, v, m, s)
                mean, std = mean_std(vals)
                out[v][s][m] = {"mean": mean, "std": std, "n": len(vals), "values": vals}
    return out


def paired_deltas(runs: Sequence[dict[str, Any]], a: str, b: str, metric: str, slice_: str
                  ) -> list[float]:
    """A − B per seed finished on both sides. Supplementary to the verdict: runs with the same
    seed see the same data order and masks, so the seed-to-seed swing largely cancels."""
    def by_seed(v: str) -> dict[int, float]:
        return {r["seed"]: x for r in runs
                if r["variant"] == v and (x := _value(r, metric, slice_)) is not None}

    va, vb = by_seed(a), by_seed(b)
    return [va[s] - vb[s] for s in sorted(set(va) & set(vb))]


def judge_claims(grid: grids.Grid, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim of the grid with both sides' per-seed values, mean ± std and verdict."""
    out = []
    for c in grid.claims:
        a, b = values(runs, c.a, c.metric, c.slice), values(runs, c.b, c.metric, c.slice)
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        paired = paired_deltas(runs, c.a, c.b, c.metric, c.slice)
        out.append({**{k: getattr(c, k) for k in ("claim_id", "text", "a", "b", "metric",
                                                  "slice", "source")},
                    "a_values": a, "b_values": b, "a_mean": ma, "a_std": sa, "b_mean": mb,
                    "b_std": sb, "delta": ma - mb,
                    "verdict": classify(a, b) if a and b else NOT_RUN,
                    "paired_deltas": paired,
                    "paired_wins": f"{sum(d > 0 for d in paired)}/{len(paired)}"})
    return out


def _pm(mean: float, std: float, n: int) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _bars_png(summary: dict[str, Any], variants: Sequence[str], slices: Sequence[str],
              metric: str, title: str) -> bytes:
    """Horizontal grouped bars: one group per variant, one bar per slice, std error bars."""
    fig = Figure(figsize=(8, 0.55 * len(variants) * max(len(slices), 1) / 2 + 1.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / max(len(slices), 1)
    for j, s in enumerate(slices):
        ys = [i + (j - (len(slices) - 1) / 2) * height for i in range(len(variants))]
        cells = [summary[v][s][metric] for v in variants]
        ax.barh(ys, [0.0 if math.isnan(c["mean"]) else c["mean"] for c in cells], height,
                xerr=[0.0 if math.isnan(c["std"]) else c["std"] for c in cells], capsize=2,
                label=s)
    ax.set_yticks(range(len(variants)), labels=list(variants))
    ax.invert_yaxis()
    tops = [c["mean"] + c["std"] for v in variants for s in slices
            if not math.isnan((c := summary[v][s][metric])["mean"])]
    ax.set_xlim(0.0, min(1.0, max([0.1, *tops]) * 1.1))  # zoom in on low recalls, never past 1
    ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _markdown(grid: grids.Grid, runs: Sequence[dict[str, Any]], summary: dict[str, Any],
              claims: Sequence[dict[str, Any]], variants: Sequence[str], seeds: Sequence[int],
              command: str, devices: int, notes: str) -> str:
    slices = slices_of(runs)
    lines = [f"# Ablation: grid `{grid.name}`", "",
             f"Command: `{command}`", "",
             f"Budget: {grid.budget_note.rstrip('.')}. Seeds {list(seeds)} (train.seed: "
             f"parameter init, masking, data order); data and catalog identical for every "
             f"run; {devices} fake CPU devices per run. Finished runs: {len(runs)}.", "",
             "Recall@K = |relevant ∩ top-K| / min(|relevant|, K) per query, averaged over the "
             "test queries; candidates = every item of the catalog.", "",
             "## Claims", "",
             "Verdict: **reproduced** if mean(A) − mean(B) > std(A) + std(B); **not reproduced** "
             "if mean(B) − mean(A) > std(A) + std(B); **inconclusive** if the mean ± std spreads "
             "overlap (or < 2 seeds). std = sample std over seeds. \"A>B seeds\": in how many "
             "seeds A beat B run for run (same seed = same data order and masks); "
             "supplementary, not part of the verdict.", "",
             "| # | paper says | A | B | metric | A | B | Δ (A−B) | verdict | A>B seeds |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|"]
    for c in claims:
        lines.append(
            f"| {c['claim_id']} | {c['text']} | `{c['a']}` | `{c['b']}` | {c['metric']} "
            f"{c['slice']} | {_pm(c['a_mean'], c['a_std'], len(c['a_values']))} | "
            f"{_pm(c['b_mean'], c['b_std'], len(c['b_values']))} | "
            f"{'–' if math.isnan(c['delta']) else format(c['delta'], '+.3f')} | "
            f"**{c['verdict']}** | {c['paired_wins']} |")
    for metric in ("R@10", "R@1", "R@100"):
        lines += ["", f"## {metric} by slice (mean ± std over seeds)", "",
                  "| variant | seeds | " + " | ".join(slices) + " | wall/run (s) |",
                  "|---|---:|" + "---:|" * len(slices) + "---:|"]
        for v in variants:
            cells = [summary[v][s][metric] for s in slices]
            walls = [r["wall_time_s"] for r in runs if r["variant"] == v and r["wall_time_s"]]
            wall = f"{sum(walls) / len(walls):.0f}" if walls else "–"
            lines.append(f"| `{v}` | {cells[0]['n']} | "
                         + " | ".join(_pm(c["mean"], c["std"], c["n"]) for c in cells)
                         + f" | {wall} |")
    lines += ["", f"![{grid.name} grid, R@10 by slice]({CHART})", "",
              "## Variants", "", "Common overrides of the base config (every variant): "
              + ", ".join(f"`{k}={v}`" for k, v in grid.common.items()), "",
              "| variant | what | overrides |", "|---|---|---|"]
    for v in grid.variants:
        if v.name in variants:
            ov = ", ".join(f"`{k}={val}`" for k, val in v.overrides.items()) or "(none)"
            lines.append(f"| `{v.name}` | {v.description} | {ov} |")
    total = sum(r["wall_time_s"] or 0.0 for r in runs)
    lines += ["", f"Sum of run wall times: {total / 60:.1f} min over {len(runs)} runs.", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def metric_title(runs: Sequence[dict[str, Any]]) -> str:
    n = {r["num_items"] for r in runs if r.get("num_items")}
    return f"Recall@10 by query slice, {len(runs)} runs" + (
        f", {n.pop():,} candidates" if len(n) == 1 else "")


def write_report(workdir: str, grid: grids.Grid, jobs: Sequence[Any], command: str = "",
                 notes_path: str = "", devices: int = 8) -> list[str]:
    """Write ``results.json``, ``RESULTS.md`` and the chart into ``workdir``; returns paths."""
    os.makedirs(workdir, exist_ok=True)
    variants = list(dict.fromkeys(j.variant for j in jobs))
    seeds = sorted({j.seed for j in jobs})
    runs = collect_runs(grid, jobs)
    summary = summarize(runs, variants)
    claims = [c for c in judge_claims(grid, runs) if c["a"] in variants and c["b"] in variants]
    payload = {
        "grid": grid.name, "command": command, "budget": grid.budget_note, "devices": devices,
        "seeds": seeds, "common_overrides": json.loads(json.dumps(grid.common, default=str)),
        "variants": {v.name: {"description": v.description,
                              "overrides": json.loads(json.dumps(v.overrides, default=str))}
                     for v in grid.variants if v.name in variants},
        "runs": runs, "summary": summary, "claims": claims,
        "verdict_rule": "reproduced if mean(A)-mean(B) > std(A)+std(B); not reproduced if "
                        "mean(B)-mean(A) > std(A)+std(B); else inconclusive (or < 2 seeds)",
    }
    notes = ""
    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    paths = [os.path.join(workdir, n) for n in ("results.json", "RESULTS.md", CHART)]
    atomic_io.write_bytes(paths[0], (json.dumps(payload, indent=2, allow_nan=True) + "\n").encode())
    md = _markdown(grid, runs, summary, claims, variants, seeds, command, devices, notes)
    atomic_io.write_bytes(paths[1], md.encode())
    atomic_io.write_bytes(paths[2], _bars_png(summary, variants, slices_of(runs), "R@10",
                                        f"Ablation grid '{grid.name}': {metric_title(runs)}"))
    return paths
