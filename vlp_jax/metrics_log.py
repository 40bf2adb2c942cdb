"""Metrics: ``metrics.jsonl``, TensorBoard events and a human progress line.

Per-step metrics stay on device until a log step, then are fetched in one transfer; that keeps
the host from blocking the asynchronous dispatch of every step, while the non-finite check can
still name the exact step at which the loss first became NaN/Inf.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np


class NonFiniteLossError(RuntimeError):
    """Raised when a logged loss is NaN/Inf; the message names the first bad step."""


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricsLogger:
    """Buffers device metrics per step; on ``flush`` writes averages and prints progress."""

    def __init__(self, workdir: str, total_steps: int, global_batch: int, is_main: bool = True):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.is_main = is_main
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self._start_time = self._last_time
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if is_main:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
                logging.warning("tensorboardX not installed: no TensorBoard events")

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Keep a step's (device) metrics; ``step`` is the step number *after* the update."""
        self._pending.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        """Fetch pending metrics, check finiteness, write averages; returns the written row."""
        if not self._pending:
            return None
        steps = [s for s, _ in self._pending]
        host = jax.device_get([m for _, m in self._pending])
        self._pending = []
        for step, m in zip(steps, host, strict=True):
            if not math.isfinite(float(m["loss"])):
                bad = {k: float(v) for k, v in m.items() if not math.isfinite(float(v))}
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: {bad}. Stopping; no checkpoint is written "
                    "for this state. Lower train.learning_rate or check the data at this step."
                )
        now = time.perf_counter()
        last = steps[-1]
        n_steps = len(steps) if self._last_step is None else last - self._last_step
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_sec = n_steps / elapsed
        row = {"step": last}
        for key in host[-1]:
            row[key] = float(np.mean([float(m[key]) for m in host]))
        row["steps_per_sec"] = steps_per_sec
        row["examples_per_sec"] = steps_per_sec * self.global_batch
        self._last_time, self._last_step = now, last
        if self.is_main:
            self._write(row)
            remaining = (self.total_steps - last) / max(steps_per_sec, 1e-9)
            logging.info(
                "step %d/%d  loss %.4f  %.2f steps/s  %.0f ex/s  elapsed %s  ETA %s",
                last, self.total_steps, row["loss"], steps_per_sec, row["examples_per_sec"],
                format_duration(now - self._start_time), format_duration(remaining),
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
