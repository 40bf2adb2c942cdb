"""Collectives of a compiled (optimised, SPMD-partitioned) HLO module, counted as they run.

Why not ``text.count("all-gather")``: the TPU compiler splits one asynchronous collective into
fragments fused with the compute it overlaps ("async collective fusion"), so one all-gather of
the batch's id rows appears ~100 times in the text, every fragment tagged with the same
``chain_id``; and a collective inside a ``while`` body (GradCache's micro-batch loop) runs once
per iteration.  Here each logical collective is counted once per execution: fragments are
merged by ``chain_id``, and counts are multiplied by the ``known_trip_count`` of every loop
around them.  Bytes are those of the collective's result on one device (an all-gather's
gathered array, an all-reduce's reduced operands), per execution.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) (" + "|".join(KINDS) + r")(-start)?\(")
_CALLS = re.compile(r"\b(?:body|calls|to_apply|condition|true_computation|false_computation|"
                    r"called_computations|branch_computations|async_computation)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Collective:
    """One logical collective of the program."""

    kind: str
    shape: str  # result shape, as printed in the HLO (layouts included)
    bytes: int  # per device, per execution
    op_name: str  # JAX's name stack: where in the program it comes from
    executions: int  # per call of the program (loop trip counts multiplied)

    @property
    def bytes_per_call(self) -> int:
        return self.bytes * self.executions


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple sums its elements)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _result_bytes(kind: str, shape: str, is_start: bool) -> int:
    """An ``all-gather-start`` / ``collective-permute-start`` returns (operand, result, ...):
    count the result only; an all-reduce's result is all of its (reduced) operands."""
    if is_start and kind in ("all-gather", "collective-permute"):
        arrays = _SHAPE.findall(shape)
        if len(arrays) >= 2:
            return shape_bytes("{}[{}]".format(*arrays[1]))
    return shape_bytes(shape)


def _computation_multipliers(text: str) -> dict[str, int]:
    """How many times each computation runs per call of ENTRY (loop bodies × trip count)."""
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, current = None, None
    for line in text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None or " = " not in line:
            continue
        trip = _TRIP.search(line)
        body = re.search(r"\bbody=%?([\w.\-]+)", line) if " while(" in line else None
        for target in _CALLS.findall(line):
            for name in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
                times = int(trip.group(1)) if body and trip and name == body.group(1) else 1
                calls[current].append((name, times))
    mult: dict[str, int] = collections.defaultdict(int)
    if entry is None:
        return mult

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64:
            return
        mult[name] += times
        for callee, k in calls.get(name, ()):
            visit(callee, times * k, depth + 1)

    visit(entry, 1)
    return mult


def collectives(text: str) -> list[Collective]:
    """Every logical collective of a compiled module's text (``Compiled.as_text()``)."""
    mult = _computation_multipliers(text)
    seen: dict[tuple, Collective] = {}
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            current = m.group(1) if m else current
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, kind, start = m.groups()
        chain = re.search(r'chain_id="(\d+)"', line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        key = (kind, chain.group(1)) if chain else (current, name)
        if key in seen:
            continue
        seen[key] = Collective(kind=kind, shape=shape,
                               bytes=_result_bytes(kind, shape, bool(start)),
                               op_name=op_name.group(1) if op_name else "",
                               executions=max(mult.get(current, 1), 1))
    return list(seen.values())


def summarise(found: list[Collective]) -> dict[str, dict[str, int]]:
    """``{kind: {"count": executions per call, "bytes": bytes per call}}`` for every kind."""
    out = {k: {"count": 0, "bytes": 0} for k in KINDS}
    for c in found:
        out[c.kind]["count"] += c.executions
        out[c.kind]["bytes"] += c.bytes_per_call
    return out
