"""Notice of preemption (SIGTERM) turned into a clean "checkpoint now and exit" decision.

Schedulers (Kubernetes, SLURM, TPU/GPU VM maintenance) send SIGTERM and then, after a grace
period, SIGKILL.  The handler only sets a flag — no I/O, no JAX calls, which are not safe inside
a signal handler — and the train loop polls ``should_stop(step)`` after each step, saves a
checkpoint of that step and returns.

Several processes must stop at the *same* step, otherwise the collective save would deadlock.
With ``jax.distributed`` initialised, JAX's preemption service (on by default) already catches
SIGTERM on any host and agrees on a common step through the coordinator; ``should_stop`` then
asks ``multihost_utils.reached_preemption_sync_point``, a local check that costs nothing until a
notice arrives.  A single process uses its own handler.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Context manager: ``with PreemptionWatcher() as w: ... if w.should_stop(step): ...``."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False
        self._use_jax_sync = False

    def _handler(self, signum, frame) -> None:
        self._flag.set()
        # A second SIGTERM means "now": fall back to the default action (terminate).
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> PreemptionWatcher:
        if jax.process_count() > 1:
            self._use_jax_sync = True  # JAX's preemption notifier owns SIGTERM
            return self
        if threading.current_thread() is not threading.main_thread():
            logging.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
            return self
        self._previous = signal.signal(self.signum, self._handler)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    @property
    def signalled(self) -> bool:
        return self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        """True once a preemption notice arrived; multi-process: at the agreed step on all.

        Must be called after every step (the JAX sync protocol relies on seeing each step id).
        """
        if self._use_jax_sync:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as err:  # preemption service disabled by the user
                logging.warning("preemption sync unavailable (%s); SIGTERM will kill the run", err)
                self._use_jax_sync = False
                return False
        return self._flag.is_set()
