"""The ablation report: ``results.json``, ``RESULTS.md`` and a bar chart from finished runs.

Numbers come only from each run's own ``eval/recall.json`` (written by ``vlp_jax.eval.report``)
and the harness's ``ablate_run.json``, so the report can be rebuilt at any time
(``--report_only``) and always shows exactly the runs that finished.

Old verdict rule for a claim "A beats B on metric M in slice S" (``classify``), over seeds:
``reproduced`` when mean(A) - mean(B) > std(A) + std(B) (sample std), ``not reproduced`` when
mean(B) - mean(A) > std(A) + std(B), otherwise ``inconclusive`` (the mean ± std spreads overlap),
and also ``inconclusive`` with fewer than 2 finished seeds on either side.  Unpaired, and its
false-positive rate does not fall with more seeds, so every claim row also carries the paired
verdict (``verdict.paired_verdict``: one-sided paired t-test at 0.05 over the seeds run on both
sides); grids of ``declared`` are judged by the protocol (``protocol.judge``) instead.

``results.json`` is stamped with the commit, machine and time that wrote it; each run record
carries its own stamp (``stamps``) and ``provenance`` (why it may not be the planned run).
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

from vlp_jax.experiments import grids, protocol, stamps, verdict
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


def _split_results(run_dir: str) -> dict[str, Any]:
    """``{"valid": ..., "test": ...}`` from ``eval/`` and ``eval_test/`` (by recorded split)."""
    out = {}
    for sub in (protocol.VALID_DIR, protocol.TEST_DIR):
        rec = _read_json(os.path.join(run_dir, sub, "recall.json"))
        if rec is not None:
            out[rec.get("split", "test")] = {k: rec.get(k, {}) for k in
                                             ("overall", "per_slice", "per_query")}
    return out


def collect_runs(grid: grids.Grid, jobs: Sequence[Any], hashes: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """One record per finished job: variant, seed, config diff, recalls, wall time, stamp.

    ``hashes`` (``{run_dir: config hash}``): check each stamp (``provenance`` lists problems)."""
    runs = []
    for job in jobs:
        recall = _read_json(os.path.join(job.run_dir, "eval", "recall.json"))
        if recall is None:
            continue
        meta = _read_json(os.path.join(job.run_dir, "ablate_run.json")) or {}
        stamp = meta.get("stamp")
        provenance = [] if hashes is None else stamps.check_run(
            stamp, job.run_dir, job.variant, job.seed, hashes.get(job.run_dir, ""),
            os.path.join(job.run_dir, "eval", "recall.json"))
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
            "stamp": stamp, "provenance": provenance,
            **_split_results(job.run_dir),
        })
    ids = stamps.duplicate_run_ids({protocol.label(r["variant"], r["seed"]): r["stamp"]
                                    for r in runs})
    for r in runs:
        if (tag := protocol.label(r["variant"], r["seed"])) in ids:
            r["provenance"].append(f"same run id as {', '.join(ids[tag])}")
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
        pv = verdict.paired_verdict(paired)
        out.append({**{k: getattr(c, k) for k in ("claim_id", "text", "a", "b", "metric",
                                                  "slice", "source")},
                    "a_values": a, "b_values": b, "a_mean": ma, "a_std": sa, "b_mean": mb,
                    "b_std": sb, "delta": ma - mb,
                    "verdict": classify(a, b) if a and b else NOT_RUN,
                    "paired_deltas": paired,
                    "paired_wins": f"{sum(d > 0 for d in paired)}/{len(paired)}",
                    "paired_verdict": pv["verdict"], "paired_p": pv["p_greater"]})
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
    split = grid.common.get("eval.split", "test")  # what each run's eval/recall.json holds
    lines = [f"# Ablation: grid `{grid.name}`", "",
             f"Command: `{command}`", "",
             f"Budget: {grid.budget_note.rstrip('.')}. Seeds {list(seeds)} (train.seed: "
             f"parameter init, masking, data order); data and catalog identical for every "
             f"run; {devices} fake CPU devices per run. Finished runs: {len(runs)}.", "",
             "Recall@K = |relevant ∩ top-K| / min(|relevant|, K) per query, averaged over the "
             f"{split} queries; candidates = every item of the catalog.", "",
             "## Claims", "",
             "Verdict: **reproduced** if mean(A) − mean(B) > std(A) + std(B); **not reproduced** "
             "if mean(B) − mean(A) > std(A) + std(B); **inconclusive** if the mean ± std spreads "
             "overlap (or < 2 seeds). std = sample std over seeds. \"A>B seeds\": in how many "
             "seeds A beat B run for run (same seed = same data order and masks). \"paired\": "
             "one-sided paired t-test over those seeds at alpha 0.05 (p in brackets); "
             "\"untestable\" below 2 paired seeds.", "",
             "| # | paper says | A | B | metric | A | B | Δ (A−B) | verdict | A>B seeds | "
             "paired (p) |",
             "|---|---|---|---|---|---:|---:|---:|---|---:|---|"]
    for c in claims:
        lines.append(
            f"| {c['claim_id']} | {c['text']} | `{c['a']}` | `{c['b']}` | {c['metric']} "
            f"{c['slice']} | {_pm(c['a_mean'], c['a_std'], len(c['a_values']))} | "
            f"{_pm(c['b_mean'], c['b_std'], len(c['b_values']))} | "
            f"{'–' if math.isnan(c['delta']) else format(c['delta'], '+.3f')} | "
            f"**{c['verdict']}** | {c['paired_wins']} | {c['paired_verdict']} "
            f"({c['paired_p']:.3f}) |")
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


def _without_per_query(run: dict[str, Any]) -> dict[str, Any]:
    """A run record for results.json: per-query hits stay in the run folders (300 rows each)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "per_query"}
                if k in ("valid", "test") else v) for k, v in run.items()}


def _fmt_list(xs: Sequence[float]) -> str:
    return ", ".join(f"{x:+.3f}" for x in xs) or "–"


def declared_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The protocol claims' section of RESULTS.md (``protocol.judge`` rows)."""
    lines = ["## Declared claims (protocol: selected on valid, confirmed on test once)", "",
             "Verdict: paired test over the declared seeds, one-sided, at the declared alpha "
             "(**reproduced** / **reversed** / **inconclusive**; **untestable** when fewer "
             "admissible seeds than declared or than the test needs). CI: 95 % bootstrap "
             "interval of the per-query difference (hits averaged over seeds, queries "
             "resampled). Old rule: mean gap > std(A) + std(B), unpaired.", "",
             "| claim | declared | selected (valid) | vs | metric | Δ per seed (test) | "
             "test, p | verdict | CI95 per query | old rule |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decl = r["declared"]["iso"] + " " + r["declared"]["commit"][:9] if r["declared"] else (
            "not committed")
        ci = r.get("query_ci95")
        lines.append(
            f"| {r['claim_id']} | {decl} | `{r['selected']}` | `{r['baseline']}` | "
            f"{r['metric']} {r['slice']} | {_fmt_list(r.get('deltas', []))} | "
            f"{r['test']} α={r['alpha']} (≥ {verdict.min_seeds(r['test'], r['alpha'])} "
            f"seeds), p={r.get('p_greater', math.nan):.3f} | "
            f"**{r['verdict']}** | "
            f"{f'[{ci[0]:+.3f}, {ci[1]:+.3f}]' if ci else '–'} | {r.get('old_rule', '–')} |")
    lines += ["", "Runs per claim: " + "; ".join(
        f"{r['claim_id']}: " + ", ".join(f"{k} {v}" for k, v in r["runs"].items())
        for r in rows if r.get("runs")) if any(r.get("runs") for r in rows) else "", ""]
    return lines


def metric_title(runs: Sequence[dict[str, Any]]) -> str:
    n = {r["num_items"] for r in runs if r.get("num_items")}
    return f"Recall@10 by query slice, {len(runs)} runs" + (
        f", {n.pop():,} candidates" if len(n) == 1 else "")


def write_report(workdir: str, grid: grids.Grid, jobs: Sequence[Any], command: str = "",
                 notes_path: str = "", devices: int = 8, hashes: dict[str, str] | None = None,
                 protocol_grid: protocol.ProtocolGrid | None = None) -> list[str]:
    """Write ``results.json``, ``RESULTS.md`` and the chart into ``workdir``; returns paths."""
    os.makedirs(workdir, exist_ok=True)
    variants = list(dict.fromkeys(j.variant for j in jobs))
    seeds = sorted({j.seed for j in jobs})
    runs = collect_runs(grid, jobs, hashes)
    declared_rows = []
    for c in protocol_grid.claims if protocol_grid else ():
        sel = protocol.select(c, runs)
        declared_rows.append({**protocol.judge(protocol_grid, c, runs, sel["selected"],
                                               classify), "selection": sel})
    summary = summarize(runs, variants)
    claims = [c for c in judge_claims(grid, runs) if c["a"] in variants and c["b"] in variants]
    payload = {
        "grid": grid.name, "command": command, "budget": grid.budget_note, "devices": devices,
        "eval_split": grid.common.get("eval.split", "test"),
        "seeds": seeds, "common_overrides": json.loads(json.dumps(grid.common, default=str)),
        "variants": {v.name: {"description": v.description,
                              "overrides": json.loads(json.dumps(v.overrides, default=str))}
                     for v in grid.variants if v.name in variants},
        "runs": [_without_per_query(r) for r in runs], "summary": summary, "claims": claims,
        "declared_claims": declared_rows,
        "stamp": {**stamps.git_commit(), "machine": stamps.machine(),
                  "written_at": stamps.now()},
        "verdict_rule": "reproduced if mean(A)-mean(B) > std(A)+std(B); not reproduced if "
                        "mean(B)-mean(A) > std(A)+std(B); else inconclusive (or < 2 seeds)",
    }
    notes = ""
    if notes_path and os.path.isfile(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    paths = [os.path.join(workdir, n) for n in ("results.json", "RESULTS.md", CHART)]
    atomic_io.write_bytes(paths[0], (json.dumps(payload, indent=2, allow_nan=True) + "\n").encode())
    if declared_rows:
        notes = "\n".join(declared_markdown(declared_rows)) + "\n" + notes
    md = _markdown(grid, runs, summary, claims, variants, seeds, command, devices, notes)
    atomic_io.write_bytes(paths[1], md.encode())
    atomic_io.write_bytes(paths[2], _bars_png(summary, variants, slices_of(runs), "R@10",
                                        f"Ablation grid '{grid.name}': {metric_title(runs)}"))
    return paths
