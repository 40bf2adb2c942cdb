"""Write an evaluation's results: recall.json, report.md and a Recall@K plot.

Every file is written to a temporary file in the same folder and then moved into place with
os.replace, so a reader (or a run killed mid-write) never sees a half-written report.
The plot uses matplotlib's object-oriented Agg canvas, not pyplot, so it needs no display and
changes no global matplotlib state.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from vlp_jax.eval.retrieval import RECALL_DEFINITION
from vlp_jax.runtime import atomic_io, fs


def _ks(results: dict[str, Any]) -> list[int]:
    if "ks" in results:
        return [int(k) for k in results["ks"]]
    return sorted(int(m.group(1)) for key in results["overall"]
                  if (m := re.fullmatch(r"R@(\d+)", key)))


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    return [("overall", results["overall"]), *results.get("per_slice", {}).items()]


def format_row(name: str, count: Any, recalls: dict[str, float], ks: list[int]) -> str:
    """One markdown table row; public so tests and callers can look for the exact text."""
    cells = [f"{recalls[f'R@{k}']:.4f}" for k in ks]
    return "| " + " | ".join([name, str(count), *cells]) + " |"


def _markdown(results: dict[str, Any], title: str, extra: dict | None) -> str:
    ks = _ks(results)
    counts = results.get("num_queries", {})
    lines = [f"# {title}", "", RECALL_DEFINITION, ""]
    if "num_items" in results:
        lines.append(f"- items (candidates): {results['num_items']}")
    lines.append(f"- queries: {counts.get('overall', '?')}")
    if results.get("ks_omitted"):
        lines.append(f"- K omitted (larger than the catalogue): {results['ks_omitted']}")
    lines += ["", "| slice | queries | " + " | ".join(f"R@{k}" for k in ks) + " |",
              "|---|---:|" + "---:|" * len(ks)]
    lines += [format_row(name, counts.get(name, "?"), rec, ks) for name, rec in _rows(results)]
    if extra:
        lines += ["", "## Run", ""]
        lines += [f"- {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _plot_png(results: dict[str, Any], title: str) -> bytes:
    ks = _ks(results)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rec in _rows(results):
        ax.plot(ks, [rec[f"R@{k}"] for k in ks], marker="o", label=name,
                linewidth=2.5 if name == "overall" else 1.5)
    ax.set_xscale("log")
    ax.set_xticks(ks, labels=[str(k) for k in ks])  # label the cut-offs, not powers of ten
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    results: dict[str, Any],
    out_dir: str,
    title: str = "Text-to-product retrieval: Recall@K",
    extra: dict | None = None,
) -> None:
    """Write ``recall.json``, ``report.md`` and ``recall_at_k.png`` into ``out_dir``.

    ``results`` is what ``vlp_jax.eval.retrieval.evaluate`` returns (at least ``overall`` with
    ``R@K`` keys; ``per_slice``, ``num_queries``, ``ks``, ``num_items`` are used when present).
    ``extra`` (e.g. step, config name, checkpoint) is stored under ``"extra"`` in the JSON and
    listed in the markdown.
    """
    if "overall" not in results or not _ks(results):
        raise ValueError("results must contain an 'overall' dict with 'R@K' entries")
    fs.makedirs(out_dir)
    payload = {"title": title, **results}
    if extra is not None:
        payload["extra"] = extra
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    atomic_io.write_bytes(fs.join(out_dir, "recall.json"), text.encode())
    md = _markdown(results, title, extra)
    atomic_io.write_bytes(fs.join(out_dir, "report.md"), md.encode())
    png = _plot_png(results, title)
    atomic_io.write_bytes(fs.join(out_dir, "recall_at_k.png"), png)
