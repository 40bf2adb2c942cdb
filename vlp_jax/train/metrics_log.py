"""Metrics: ``metrics.jsonl``, TensorBoard events and a human progress line.

Per-step metrics stay on device until a log step, then are fetched in one transfer; that keeps
the host from blocking the asynchronous dispatch of every step, while the non-finite check can
still name the exact step at which the loss first became NaN/Inf.

Non-finite steps follow ``train.nonfinite_policy`` (see ``vlp_jax.train.nonfinite``): ``stop``
raises at the first bad step; ``skip`` leaves bad steps out of the averages, counts them in the
row's ``skipped_steps`` and raises after ``max_consecutive_skips`` in a row.  On resume the rows
after the restored step (written by the interrupted run) are dropped, so ``metrics.jsonl`` reads
as if the run had never stopped; the skip counters (``skip_state``) are saved with each
checkpoint and given back on resume, so a streak that spans an interruption still stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from vlp_jax.runtime import fs
from vlp_jax.train import remote_mirror

# Metrics that are NaN at steps where there is nothing to measure (e.g. no bank entry of this
# step's items yet): averaged over the steps that measured something, left out if none did.
SPARSE_METRICS = frozenset({"qic_bank_stale_cos"})


class NonFiniteLossError(RuntimeError):
    """Raised when a logged loss is NaN/Inf; the message names the first bad step.

    ``step``, ``bad`` (the non-finite values) and ``batch_ids`` (device arrays of the bad step's
    ``item_index``/``query_id``, when recorded) let the train loop write a debug dump, whose
    path it stores in ``dump_path`` so that ``str(err)`` names it.
    """

    def __init__(self, message: str, step: int = -1, bad: dict[str, float] | None = None,
                 batch_ids: dict[str, Any] | None = None):
        super().__init__(message)
        self.message, self.step, self.bad, self.batch_ids = message, step, bad or {}, batch_ids
        self.dump_path: str | None = None

    def __str__(self) -> str:
        if self.dump_path:
            return f"{self.message} Batch ids of step {self.step}: {self.dump_path}"
        return self.message


def _read_rows(path: str) -> tuple[list[dict[str, Any]], int]:
    """Rows of a metrics file and the number of lines cut short by a kill mid-write."""
    rows, broken = [], 0
    for line in fs.read_text(path).splitlines(keepends=True):
        try:
            rows.append(json.loads(line))
        except ValueError:
            broken += 1
    return rows, broken


def _is_eval_row(row: dict[str, Any]) -> bool:
    return any(key.startswith("eval/") for key in row)


def truncate_after(path: str, step: int, total_steps: int) -> int:
    """Drop rows an interrupted run wrote after its last checkpoint ``step``; rows dropped.

    Train rows after ``step`` are redone by the resumed run.  Eval rows at ``step`` are kept
    (periodic evals run right after the checkpoint they follow) except the final evaluation,
    which a rerun of a finished run repeats.
    """
    if not fs.exists(path):
        return 0
    rows, broken = _read_rows(path)
    kept = [
        r for r in rows
        if r.get("step", 0) < step
        or (r.get("step") == step and (step < total_steps or not _is_eval_row(r)))
    ]
    if len(kept) != len(rows) or broken:
        fs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))  # atomic
    return len(rows) - len(kept) + broken


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


METRICS = "metrics.jsonl"


class MetricsLogger:
    """Buffers device metrics per step; on ``flush`` writes averages and prints progress."""

    def __init__(
        self, workdir: str, total_steps: int, global_batch: int, is_main: bool = True, *,
        nonfinite_policy: str = "stop", max_consecutive_skips: int = 5,
        resume_step: int | None = None, skip_state: dict[str, int] | None = None,
    ):
        """``skip_state``: the ``skip_state()`` saved with the checkpoint being resumed (``None``
        or missing keys, e.g. a checkpoint older than these counters: start from 0)."""
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.is_main = is_main
        self.nonfinite_policy = nonfinite_policy
        self.max_consecutive_skips = max_consecutive_skips
        skip_state = skip_state or {}
        self.consecutive_skips = int(skip_state.get("consecutive_skips", 0))
        self.skipped_total = int(skip_state.get("skipped_total", 0))
        self._pending: list[tuple[int, dict[str, Any], dict[str, Any] | None]] = []
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self._start_time = self._last_time
        # An object-store workdir logs into a local mirror uploaded at sync points (after each
        # checkpoint save): no append on object stores, and a dead store must not stall steps.
        self._mirror = None
        if is_main and fs.is_remote(workdir):
            self._mirror = remote_mirror.RemoteMirror(workdir, files_to_fetch=(METRICS,))
            workdir = self._mirror.local
        self._path = fs.join(workdir, METRICS)
        self._tb = None
        if is_main:
            fs.makedirs(workdir)
            if resume_step is not None:
                dropped = truncate_after(self._path, resume_step, total_steps)
                if dropped:
                    logging.info("metrics: dropped %d rows written after step %d by the "
                                 "interrupted run", dropped, resume_step)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(fs.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
                logging.warning("tensorboardX not installed: no TensorBoard events")

    def skip_state(self) -> dict[str, int]:
        """The non-finite counters as of the last flush, for the checkpoint of that step."""
        return {"consecutive_skips": self.consecutive_skips, "skipped_total": self.skipped_total}

    def record(
        self, step: int, metrics: dict[str, Any], batch_ids: dict[str, Any] | None = None
    ) -> None:
        """Keep a step's (device) metrics; ``step`` is the step number *after* the update.

        ``batch_ids`` (small device arrays, e.g. the batch's ``item_index``) are only fetched
        if this step turns out non-finite, for the debug dump.
        """
        self._pending.append((step, metrics, batch_ids))

    def _check_finite(self, steps: list[int], host: list[dict[str, Any]], ids: list) -> list[bool]:
        """Apply the non-finite policy; returns which steps are good (raises to stop)."""
        good = []
        for step, row, batch_ids in zip(steps, host, ids, strict=True):
            loss_ok = math.isfinite(float(row["loss"]))
            ok = loss_ok and not float(row.get("nonfinite", 0.0))
            good.append(ok)
            if ok:
                self.consecutive_skips = 0
                continue
            bad = {k: float(v) for k, v in row.items() if not math.isfinite(float(v))}
            what = "loss" if not loss_ok else "gradients"
            if self.nonfinite_policy != "skip":
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step}: {bad}. Stopping "
                    "(train.nonfinite_policy='stop'); no checkpoint is written for this state. "
                    "Lower train.learning_rate or check the data at this step.",
                    step, bad, batch_ids,
                )
            self.consecutive_skips += 1
            self.skipped_total += 1
            logging.warning("non-finite %s at step %d: %s; update skipped (%d in a row)",
                            what, step, bad, self.consecutive_skips)
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step}: {bad}. {self.consecutive_skips} "
                    "consecutive steps were non-finite and skipped "
                    f"(train.max_consecutive_skips={self.max_consecutive_skips}): stopping. "
                    "Lower train.learning_rate or check the data at these steps.",
                    step, bad, batch_ids,
                )
        return good

    def flush(self) -> dict[str, float] | None:
        """Fetch pending metrics, check finiteness, write averages; returns the written row."""
        if not self._pending:
            return None
        steps = [s for s, _, _ in self._pending]
        ids = [i for _, _, i in self._pending]
        host = jax.device_get([m for _, m, _ in self._pending])
        self._pending = []
        good = self._check_finite(steps, host, ids)
        now = time.perf_counter()
        last = steps[-1]
        n_steps = len(steps) if self._last_step is None else last - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_sec = n_steps / elapsed
        row: dict[str, Any] = {"step": last}
        kept = [m for m, ok in zip(host, good, strict=True) if ok]
        for key in kept[-1] if kept else ():
            if key == "nonfinite":
                continue
            values = np.asarray([float(m[key]) for m in kept])
            if key in SPARSE_METRICS:  # NaN = nothing to measure at that step
                values = values[np.isfinite(values)]
                if not values.size:
                    continue
            row[key] = float(np.mean(values))
        if self.nonfinite_policy == "skip":
            row["skipped_steps"] = len(host) - len(kept)
        row["steps_per_sec"] = steps_per_sec
        row["examples_per_sec"] = steps_per_sec * self.global_batch
        self._last_time, self._last_step = now, last
        if self.is_main:
            self._write(row)
            remaining = (self.total_steps - last) / max(steps_per_sec, 1e-9)
            skipped = f"  skipped {self.skipped_total}" if self.skipped_total else ""
            logging.info(
                "step %d/%d  loss %.4f  %.2f steps/s  %.0f ex/s  elapsed %s  ETA %s%s",
                last, self.total_steps, row.get("loss", math.nan), steps_per_sec,
                row["examples_per_sec"], format_duration(now - self._start_time),
                format_duration(remaining), skipped,
            )
        return row

    def write_eval(self, step: int, results: dict[str, Any]) -> None:
        if not self.is_main:
            return
        flat = {"step": step}
        for k, v in results.get("overall", {}).items():
            flat[f"eval/{k}"] = v
        for slice_name, vals in results.get("per_slice", {}).items():
            for k, v in vals.items():
                flat[f"eval/{slice_name}/{k}"] = v
        self._write(flat)

    def _write(self, row: dict[str, Any]) -> None:
        with open(self._path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k.replace("@", "_at_"), v, row["step"])
            self._tb.flush()

    def sync(self, timeout: float = remote_mirror.SYNC_TIMEOUT_S) -> None:
        """Object-store workdir: upload the logs written since the last sync (else a no-op),
        giving up (with a warning) after ``timeout`` seconds."""
        if self._mirror is not None:
            if self._tb is not None:
                self._tb.flush()
            self._mirror.sync(timeout)

    def close(self, sync: bool = True) -> None:
        """``sync=False`` when the storage is known to be gone (a save timed out)."""
        if self._tb is not None:
            self._tb.close()
        if sync:
            self.sync()
