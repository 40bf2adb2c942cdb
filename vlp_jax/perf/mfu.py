"""MFU on a measured matmul peak, and its ceiling: the train step's matmuls alone.

MFU here is (XLA cost-analysis FLOPs of one compiled step) / (step time) / (matmul peak measured
on this machine in the same run, :func:`measure_matmul_peak`).  A measured peak, not a datasheet
number, makes the figure comparable across CPUs, GPUs and TPUs.

MFU counts the step's FLOPs, which are almost all matmul FLOPs (XLA's cost analysis of the base
step: 113.9 GFLOP at batch 256, of which 113.6 are in its 254 dot_generals).  Softmax, LayerNorm,
GELU, residuals, losses and the optimizer add time and next to no FLOPs.  So if every one of those
ops were free, the step would take as long as its matmuls alone, and its MFU would be

    ceiling = step FLOPs / (time of the step's dots, run with nothing else) / matmul peak.

This module collects every ``dot_general`` the step executes, forward and backward (from its
jaxpr, after autodiff; custom VJPs, nested jits and ``shard_map`` included, scans counted once
per iteration) with their shapes and dimension numbers, and builds one program that runs exactly
those dots on random operands, all independent, so XLA may run them as concurrently as it likes.
Its time is the best the compiler's matmul kernels do on the step's shapes on this machine; no
rewrite of the non-matmul ops can beat it.  ``benchmarks/mfu_ceiling.py`` prints it next to the
measured step, per dot shape, and that is how issue #8's targets were checked against the machine.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

from vlp_jax.parallel import mesh as mesh_lib

# Primitives whose sub-jaxprs run a data-dependent number of times: their dots have no fixed count.
_UNCOUNTABLE = ("while", "cond")


@dataclasses.dataclass(frozen=True)
class DotSpec:
    """One ``dot_general`` as the step runs it (``count`` times, e.g. inside a scan)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_dtype: str
    rhs_dtype: str
    dimension_numbers: Any  # ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))
    preferred_element_type: str | None = None
    count: int = 1

    @property
    def flops(self) -> int:
        """2 x (output elements) x (contracted size) = 2 x |lhs| x |rhs free dims|, per run."""
        (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
        rhs_free = [d for i, d in enumerate(self.rhs_shape)
                    if i not in rhs_contract and i not in rhs_batch]
        return 2 * math.prod(self.lhs_shape) * math.prod(rhs_free)

    def key(self) -> tuple:
        """Identity of the matmul kernel: same shapes, dtypes and dimension numbers."""
        return (self.lhs_shape, self.rhs_shape, self.lhs_dtype, self.rhs_dtype,
                str(self.dimension_numbers), self.preferred_element_type)


def _sub_jaxprs(params: dict) -> Iterable[jax_core.Jaxpr]:
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def collect_dots(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr, repeat: int = 1) -> list[DotSpec]:
    """Every dot_general of ``jaxpr`` and its sub-jaxprs.

    Shapes are as traced: global for a step jitted over a sharded mesh (GSPMD), per shard
    inside ``shard_map``; a ceiling is therefore measured on one device.  Raises ValueError for
    dots under a ``while`` or ``cond`` (their execution count is not static), so a ceiling is
    never silently computed from a guess.
    """
    if isinstance(jaxpr, jax_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    dots: list[DotSpec] = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            pet = eqn.params.get("preferred_element_type")
            dots.append(DotSpec(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype),
                                str(rhs.dtype), eqn.params["dimension_numbers"],
                                None if pet is None else str(np.dtype(pet)), repeat))
            continue
        times = repeat * (eqn.params["length"] if name == "scan" else 1)
        for sub in _sub_jaxprs(eqn.params):
            inner = collect_dots(sub, times)
            if inner and name in _UNCOUNTABLE:
                raise ValueError(f"{len(inner)} dot_general(s) under a {name!r}: how often they "
                                 "run is decided at run time, so the matmul ceiling is undefined")
            dots.extend(inner)
    return dots


def step_dots(fn: Callable, *args: Any) -> list[DotSpec]:
    """The dots ``fn(*args)`` executes (``fn`` may be jitted and may differentiate inside)."""
    return collect_dots(jax.make_jaxpr(fn)(*args))


def total_flops(dots: Sequence[DotSpec]) -> int:
    return sum(d.flops * d.count for d in dots)


def dots_only_program(dots: Sequence[DotSpec], seed: int = 0) -> tuple[Callable, list]:
    """A jitted function running exactly ``dots`` (each ``count`` times), all independent, and
    its random operands; it returns every product so none is dead code."""
    rng = np.random.default_rng(seed)
    expanded = [d for d in dots for _ in range(d.count)]
    operands = [(jnp.asarray(rng.standard_normal(d.lhs_shape), d.lhs_dtype),
                 jnp.asarray(rng.standard_normal(d.rhs_shape), d.rhs_dtype)) for d in expanded]

    @jax.jit
    def run(pairs):
        return [lax.dot_general(a, b, d.dimension_numbers,
                                preferred_element_type=d.preferred_element_type)
                for (a, b), d in zip(pairs, expanded, strict=True)]

    return run, operands


def step_flops(compiled: Any, num_devices: int = 1) -> float:
    """FLOPs of one step on all devices: XLA's cost analysis is of the per-device program.

    Replicated work (the optimizer update) is counted once per device, a negligible overcount
    next to the matmuls of the data-parallel forward and backward passes.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) * num_devices


def measure_matmul_peak(n: int = 2048, repeats: int = 20) -> float:
    """The machine's best measured float32 FLOP/s for n×n×n matmuls.

    Two ways, keeping the faster: one matmul on the default device (XLA's thread pool over all
    cores), and, with several devices, one matmul per device at once.  The second matters when
    each (fake) CPU device is single-threaded (``--xla_cpu_multi_thread_eigen=false``): the
    machine's peak is then only reached by all devices together, and measuring one device alone
    would understate the peak and inflate the MFU.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    one = jax.jit(lambda x, y: x @ y)
    peak = 2 * n**3 / best_seconds(lambda: one(a, a), repeats)
    devices = jax.devices()
    if len(devices) > 1:
        mesh = mesh_lib.make_mesh((len(devices),))
        stacked = jax.device_put(
            np.tile(np.asarray(a)[None], (len(devices), 1, 1)), mesh_lib.batch_sharding(mesh)
        )
        each = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x))
        peak = max(peak, 2 * n**3 * len(devices) / best_seconds(lambda: each(stacked), repeats))
    return peak


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn()`` (after one untimed call)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def median_seconds(fn: Callable, *args: Any, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn(*args)`` (results blocked on) over ``repeats`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_dots(dots: Sequence[DotSpec], repeats: int = 10) -> float:
    """Median seconds of one run of all ``dots`` together (see :func:`dots_only_program`)."""
    run, operands = dots_only_program(dots)
    return median_seconds(run, operands, repeats=repeats)


def time_by_kernel(dots: Sequence[DotSpec], repeats: int = 5) -> list[dict]:
    """Each distinct matmul (shapes + dimension numbers) timed alone, all its instances
    together: which shapes run far below peak.  Sorted by time, slowest first."""
    groups: dict[tuple, list[DotSpec]] = collections.defaultdict(list)
    for d in dots:
        groups[d.key()].append(d)
    rows = []
    for members in groups.values():
        seconds = time_dots(members, repeats)
        flops = total_flops(members)
        first = members[0]
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = first.dimension_numbers
        rows.append({
            "lhs": list(first.lhs_shape), "rhs": list(first.rhs_shape),
            "contract": [list(lhs_contract), list(rhs_contract)],
            "batch": [list(lhs_batch), list(rhs_batch)],
            "count": sum(m.count for m in members), "gflop": flops / 1e9,
            "ms": seconds * 1e3, "gflops_per_s": flops / seconds / 1e9,
        })
    rows.sort(key=lambda r: -r["ms"])
    return rows
