"""Non-finite loss or gradients: never let them into the train state; stop or skip on the host.

``guard_step`` wraps the *unjitted* step function: when the loss or the global gradient norm is
NaN/Inf, the step returns its input state with only ``step`` advanced (params, optimizer state,
memory bank and EMA params keep their old values), and ``metrics["nonfinite"]`` is 1.0.  The
select is elementwise and fuses into the optimizer update; no host sync happens per step.  The
guard is the same whatever the policy, so both policies run one compiled program and a stop
never leaves a poisoned state in memory.

The host sees the flag when the metrics logger fetches metrics (at log and checkpoint steps)
and applies ``train.nonfinite_policy`` there (``metrics_log.MetricsLogger``):

- ``stop`` (default): the first bad step raises ``NonFiniteLossError``; no checkpoint is written
  after it (the logger flushes before every save), and ``write_dump`` records the bad step's
  batch ids in the workdir so the data can be inspected.
- ``skip``: bad steps are counted in ``skipped_steps`` and left out of the averages; the run
  stops after ``train.max_consecutive_skips`` bad steps in a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.runtime import fs

FLAG = "nonfinite"


def guard_step(step_fn: Callable[..., tuple[Any, dict]]) -> Callable:
    """``(state, batch) -> (state, metrics)`` adding ``metrics["nonfinite"]`` (0.0 or 1.0).

    The step is bad when the loss or the global gradient norm (``metrics["grad_norm"]``, when
    the step reports it) is NaN/Inf; a bad step returns the input state with ``step`` advanced.
    """

    def guarded(state, batch):
        new_state, metrics = step_fn(state, batch)
        finite = jnp.isfinite(metrics["loss"])
        if "grad_norm" in metrics:
            finite &= jnp.isfinite(metrics["grad_norm"])
        metrics = dict(metrics, **{FLAG: (~finite).astype(jnp.float32)})
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = new_state.replace(
            params=jax.tree.map(keep, new_state.params, state.params),
            opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
            extra=jax.tree.map(keep, new_state.extra, state.extra),
        )
        return new_state, metrics

    return guarded


def _host_rows(array: Any) -> list[int]:
    """This process's rows of a (possibly multi-process) batch array, in global row order."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array)).reshape(-1).tolist()
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:  # replicated copies of one block appear once
        if shard.index[0].start in seen:
            continue
        seen.add(shard.index[0].start)
        rows.extend(np.asarray(shard.data).reshape(-1).tolist())
    return rows


def write_dump(
    workdir: str,
    step: int,
    bad_metrics: dict[str, float],
    batch_ids: dict[str, Any] | None,
    message: str,
    item_id_lookup: Callable[[Sequence[int]], list[str]] | None = None,
) -> str:
    """Write ``nonfinite_step_<step>[.process_<k>].json`` with the bad batch's ids; its path."""
    record: dict[str, Any] = {"step": step, "message": message, "nonfinite_metrics": bad_metrics}
    for key, array in (batch_ids or {}).items():
        record[key] = _host_rows(array)
    if item_id_lookup is not None and "item_index" in record:
        try:
            record["item_id"] = item_id_lookup(record["item_index"])
        except Exception as err:  # the dump must never hide the original error
            record["item_id_error"] = repr(err)
    suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
    path = fs.join(workdir, f"nonfinite_step_{step}{suffix}.json")
    fs.write_text(path, json.dumps(record, indent=1))
    return path
