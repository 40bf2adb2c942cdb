"""Where a compiled step's time goes: per-op times from a ``jax.profiler`` trace, by model part.

Why this exists (issue #8): the only way we found what limits the train step on CPU was to
join the profiler's per-op durations with the compiled HLO — each op's ``op_name`` metadata
says which layer and which pass (forward under ``jvp(...)``, backward under
``transpose(jvp(...))``) it belongs to, and its fused computation says whether it contains a
matmul and how many FLOPs that matmul does.  ``benchmarks/step_profile.py`` runs this on the
base config's train step; this module is the parsing and attribution, kept free of Flax and of
any profiler plugin (the trace is read from the Perfetto JSON that ``jax.profiler.trace(...,
create_perfetto_trace=True)`` writes).

On XLA:CPU the per-op events only exist with ``--xla_cpu_enable_xprof_traceme=true``.  Ops run
concurrently (XLA's thunk executor overlaps independent ops), so op times add up to more than
the wall time; the table reports both.  Tracing also slows ops, by an amount that varies from
run to run (base config, batch 256: 1.4–2.7 s of summed op time for a 1.1–1.2 s step over four
runs), so compare shares between runs, not absolute op times.

Matmuls XLA:CPU leaves to Eigen (plain ``dot`` ops, here the weight gradients) are their own
category because they run asynchronously: their event only covers the dispatch, so their time
shows up as near zero and their cost as slower neighbours.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import re

CATEGORIES = (
    "matmul", "matmul (Eigen)", "attention core", "layernorm", "bias + GELU", "MLM heads",
    "MPM head", "residual, embeddings, pooling", "losses", "optimizer + update guard", "other",
)

_INSTRUCTION = re.compile(
    r"^\s+(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\S+) (?P<opcode>[\w\-]+)\((?P<operands>.*?)\)"
    r"(?P<attrs>.*)$", re.M)
_COMPUTATION = re.compile(r"^%(?P<name>[\w.\-]+) [^\n]*\{\n(?P<body>.*?)^\}", re.M | re.S)
_DIMS = re.compile(r"^\w+\[(?P<dims>[\d,]*)\]")
_RUNTIME_EVENTS = ("Threadpool", "Thunk", "$", "Pjit", "Common", "Slinky", "end: ", "Parse",
                   "Python", "Allocate", "Handle", "Wait", "Await")


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One top-level instruction of the compiled module."""

    name: str
    opcode: str
    shape: str
    op_name: str  # the JAX op path from the metadata ("" when absent)
    matmul_flops: float  # FLOPs of the dot(s) it computes, 0 for no dot


def _dims(shape: str) -> list[int]:
    m = _DIMS.match(shape)
    return [int(d) for d in m.group("dims").split(",") if d] if m else []


def _dot_flops(line: re.Match, shapes: dict[str, str]) -> float:
    """2 * output elements * contracted size of one ``dot`` instruction."""
    lhs = line.group("operands").split(",")[0].strip().lstrip("%")
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line.group("attrs"))
    lhs_dims = _dims(shapes.get(lhs, ""))
    if not contracting or not lhs_dims:
        return 0.0
    k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * math.prod(_dims(line.group("shape"))) * k


def parse_hlo(hlo_text: str) -> dict[str, HloOp]:
    """The instructions the runtime executes (not those inside fusions), by name, each with the
    matmul FLOPs of the dot it is or of the fused computation it calls."""
    shapes = {m.group("name"): m.group("shape") for m in _INSTRUCTION.finditer(hlo_text)}
    computations = {m.group("name"): m.group("body") for m in _COMPUTATION.finditer(hlo_text)}
    fused = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", hlo_text))
    inside_fusions = {m.group("name") for c in fused if c in computations
                      for m in _INSTRUCTION.finditer(computations[c])}

    def flops_of(body: str) -> float:
        return sum(_dot_flops(m, shapes) for m in _INSTRUCTION.finditer(body)
                   if m.group("opcode") == "dot")

    ops = {}
    for m in _INSTRUCTION.finditer(hlo_text):
        if m.group("name") in inside_fusions:
            continue
        attrs = m.group("attrs")
        called = re.search(r"calls=%([\w.\-]+)", attrs)
        if m.group("opcode") == "dot":
            flops = _dot_flops(m, shapes)
        elif called and called.group(1) in computations:
            flops = flops_of(computations[called.group(1)])
        else:
            flops = 0.0
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        ops[m.group("name")] = HloOp(m.group("name"), m.group("opcode"), m.group("shape"),
                                     op_name.group(1) if op_name else "", flops)
    return ops


def categorize(op: HloOp) -> tuple[str, str]:
    """``(category, pass)`` of one op; pass is "forward", "backward" or "update"."""
    path = op.op_name
    if "transpose(jvp(" in path:
        phase = "backward"
    elif "jvp(" in path:
        phase = "forward"
    else:
        phase = "update"
    if "mlm" in path:
        return "MLM heads", phase
    if "mpm" in path:
        return "MPM head", phase
    if op.matmul_flops:
        # The score and value einsums ("bqhd,bkhd->bhqk") are attention; projections are not.
        if "/attn/" in path and "->" in path:
            return "attention core", phase
        return ("matmul (Eigen)" if op.opcode == "dot" else "matmul"), phase
    if re.search(r"/attn/(?!out/)", path):
        return "attention core", phase
    if "norm/" in path:
        return "layernorm", phase
    if "/mlp/" in path or "/attn/out/" in path:
        return "bias + GELU", phase
    if "VLPModel" in path:
        return "residual, embeddings, pooling", phase
    if phase == "update":
        return "optimizer + update guard", phase
    if "jvp(" in path:
        return "losses", phase
    return "other", phase


def op_durations(perfetto_trace: str) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and event count per op name in a (gzipped) Perfetto JSON trace."""
    opener = gzip.open if perfetto_trace.endswith(".gz") else open
    with opener(perfetto_trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not str(e.get("name", "")).startswith(_RUNTIME_EVENTS):
            total[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    return total, count


def summarize(durations_us: collections.Counter, counts: collections.Counter,
              ops: dict[str, HloOp], steps: int, wall_seconds_per_step: float,
              top: int = 20) -> dict:
    """Per-category and top-op table (ms and GFLOP per step) of ``steps`` traced steps;
    ``durations_us`` and ``counts`` as :func:`op_durations` returns them."""
    by_cat: dict[str, dict[str, float]] = {
        c: {"ms": 0.0, "forward_ms": 0.0, "backward_ms": 0.0, "gflop": 0.0} for c in CATEGORIES
    }
    rows = []
    unmatched = 0.0
    for name, us in durations_us.items():
        op = ops.get(name)
        ms = us / 1e3 / steps
        if op is None:
            unmatched += ms
            continue
        cat, phase = categorize(op)
        gflop = op.matmul_flops / 1e9 * counts[name] / steps
        entry = by_cat[cat]
        entry["ms"] += ms
        entry[f"{phase}_ms"] = entry.get(f"{phase}_ms", 0.0) + ms
        entry["gflop"] += gflop
        rows.append({"op": name, "category": cat, "pass": phase, "ms": ms, "gflop": gflop,
                     "shape": op.shape, "op_name": op.op_name})
    total = sum(c["ms"] for c in by_cat.values())
    for entry in by_cat.values():
        entry["share"] = entry["ms"] / total if total else 0.0
        entry["gflops_per_s"] = entry["gflop"] / (entry["ms"] / 1e3) if entry["ms"] else 0.0
    rows.sort(key=lambda r: -r["ms"])
    return {"wall_ms_per_step": wall_seconds_per_step * 1e3, "op_ms_per_step": total,
            "unattributed_ms_per_step": unmatched, "categories": by_cat, "top_ops": rows[:top]}


def format_summary(summary: dict) -> str:
    """The summary as a fixed-width table (categories, then the top ops)."""
    out = [f"wall {summary['wall_ms_per_step']:.0f} ms/step; op time "
           f"{summary['op_ms_per_step']:.0f} ms/step (ops overlap); unattributed "
           f"{summary['unattributed_ms_per_step']:.1f} ms",
           f"{'category':>30} {'ms/step':>8} {'share':>6} {'fwd':>7} {'bwd':>7} {'GFLOP':>7} "
           f"{'GFLOP/s':>8}"]
    cats = sorted(summary["categories"].items(), key=lambda kv: -kv[1]["ms"])
    for name, cat in cats:
        if cat["ms"] <= 0:
            continue
        out.append(f"{name:>30} {cat['ms']:>8.1f} {cat['share'] * 100:>5.1f}% "
                   f"{cat.get('forward_ms', 0.0):>7.1f} {cat.get('backward_ms', 0.0):>7.1f} "
                   f"{cat['gflop']:>7.2f} {cat['gflops_per_s']:>8.1f}")
    out.append("")
    out.append(f"{'ms/step':>8} {'GFLOP':>6} {'category':>29} {'pass':>8}  op (shape) layer")
    for r in summary["top_ops"]:
        layer = "/".join(r["op_name"].split("/")[-4:])
        out.append(f"{r['ms']:>8.2f} {r['gflop']:>6.2f} {r['category']:>29} {r['pass']:>8}  "
                   f"{r['op']} ({r['shape'].split('{')[0]}) {layer}")
    return "\n".join(out)
