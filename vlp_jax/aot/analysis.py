"""Compile a lowered program for its topology and turn what XLA reports into per-device
figures: memory against the chip's HBM, collectives, and XLA's raw cost figures (FLOPs, bytes
accessed, the cost model's ``optimal_seconds``).  The step-time estimate built from them is
``aot.estimate``'s, the only one.
"""

from __future__ import annotations

import re
import time
from typing import Any

from vlp_jax.aot import chips, hlo
from vlp_jax.aot.programs import Lowered

# Where a collective comes from, by kind and JAX name stack (first match wins): the ones the
# design asks for (losses/qic, parallel/memory_bank, data-parallel gradients) and the
# ones the SPMD partitioner adds around them.
_ORIGINS = (
    ("all-gather", r"shard_map/all_gather",
     "design: CDNS / bank all_gather in shard_map (embeddings, key rows)"),
    ("all-reduce", r"shard_map/(pmax|psum|pmean)",
     "design: loss mean / distributed log-sum-exp in shard_map"),
    ("reduce-scatter", r"shard_map/(reduce_scatter|psum_scatter)",
     "design: transpose of the CDNS all_gather (embedding gradients back to their device)"),
    ("collective-permute", r"shard_map/ppermute", "design: ring CDNS (negatives.ring)"),
    ("all-reduce", r"transpose\(", "data parallel: gradient all-reduce"),
    ("", r"dot_general", "partitioner: a batch-wide matmul outside shard_map (MPM_R's batch "
                         "candidates) gathers its sharded operand"),
    ("", r"reduce_(sum|max|min)|mean",
     "partitioner: a reduction over the sharded batch (a loss or metric mean)"),
)


def origin(op_name: str, shape: str = "", kind: str = "all-reduce") -> str:
    """A one-line reason for a collective, from its kind and JAX name stack — except for XLA's
    combined all-reduces, which carry one merged op's name (or none): their operands tell."""
    matrices = len(re.findall(r"\[\d+,\d+[,\d]*\]", shape))
    if kind == "all-reduce" and shape.startswith("(") and matrices >= 2:
        return ("data parallel: gradients of the replicated params, in one all-reduce XLA "
                "combined (with whatever other all-reduces it merged)")
    if not op_name:
        return ("unnamed: an all-reduce XLA combined, or an all-gather the TPU compiler "
                "runs as an all-reduce of the zero-padded result (tiny per-device shards)"
                if kind == "all-reduce" else "partitioner: resharding (no JAX op behind it)")
    for kinds, pattern, why in _ORIGINS:
        if (not kinds or kind == kinds) and re.search(pattern, op_name):
            return why
    return "partitioner: resharding between ops with different shardings"


def _hbm_error(message: str) -> dict[str, Any] | None:
    """XLA's out-of-memory message → required / available bytes, when it says them."""
    m = re.search(r"([\d.]+)([GMK])i?B? of ([\d.]+)([GMK])i?B? hbm", message)
    units = {"G": 1024**3, "M": 1024**2, "K": 1024}
    if m:
        return {"required_bytes": float(m.group(1)) * units[m.group(2)],
                "available_bytes": float(m.group(3)) * units[m.group(4)]}
    m = re.search(r"\(([\d.]+)([GMK])\) exceeds available HBM \(([\d.]+)([GMK])\)", message)
    if m:
        return {"required_bytes": float(m.group(1)) * units[m.group(2)],
                "available_bytes": float(m.group(3)) * units[m.group(4)]}
    return None


def compile_program(program: Lowered, chip: chips.Chip, hlo_path: str = "") -> dict[str, Any]:
    """Compile ``program`` and report it; an out-of-memory compile is a result, not a crash
    (``fits: False`` with XLA's message)."""
    start = time.perf_counter()
    out: dict[str, Any] = {"program": program.name, "rows": program.rows,
                           "devices": program.num_devices}
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError / XlaRuntimeError
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        out.update(fits=False, compile_seconds=time.perf_counter() - start,
                   error=message.strip().splitlines()[0][:400])
        out.update(_hbm_error(message) or {})
        return out
    out["compile_seconds"] = time.perf_counter() - start
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    out.update(memory(compiled, chip))
    found = hlo.collectives(text)
    out["collectives"] = hlo.summarise(found)
    out["collective_list"] = [
        {"kind": c.kind, "shape": re.sub(r"\{[^}]*\}", "", c.shape)[:120], "bytes": c.bytes,
         "executions": c.executions, "origin": origin(c.op_name, c.shape, c.kind),
         "op_name": c.op_name[:160]}
        for c in sorted(found, key=lambda c: -c.bytes_per_call)]
    out.update(timing(compiled.cost_analysis(), out["collectives"]))
    return out


def memory(compiled: Any, chip: chips.Chip) -> dict[str, Any]:
    """Per-device bytes: arguments (state + batch), outputs not aliased to a donated argument,
    temporaries, generated code; their sum against the chip's HBM."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "code_bytes": m.generated_code_size_in_bytes, "total_bytes": total,
            "hbm_bytes": chip.hbm_bytes, "fits": total <= chip.hbm_bytes}


def timing(cost: dict[str, float], collectives: dict[str, dict[str, int]]) -> dict[str, Any]:
    """XLA's raw figures per device and call: FLOPs (recomputation included), bytes accessed,
    collective result bytes and the cost model's ``optimal_seconds``.  No step time here: the
    one estimator is ``aot.estimate`` (it needs the model's FLOPs, which the config gives)."""
    return {"flops_per_device": float(cost.get("flops", 0.0)),
            "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
            "collective_bytes_per_device": sum(v["bytes"] for v in collectives.values()),
            "optimal_seconds": float(cost.get("optimal_seconds", -1.0))}
