"""Faults a user can act on end a run with one ``error: …`` line and their own exit status.

A traceback from deep inside JAX, Orbax or Grain tells an operator nothing about what to do; a
launcher or scheduler that sees exit status 6 knows to free disk, 7 to rebuild the dataset, 8 to
restart the job. The table lives here, apart from ``vlp_jax.main``, so it can be tested without
defining command-line flags (absl's flags are process-global and other CLIs define the same
names). docs/reliability.md lists every status with its exact message.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from vlp_jax.data import shard_check
from vlp_jax.runtime import fs, peers, storage
from vlp_jax.train import checkpointing, metrics_log, resume_config, workdir_lock

FINISHED = 0  # finished, or preempted with the checkpoint saved: rerun to resume
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (metrics_log.NonFiniteLossError, 3),
    (workdir_lock.WorkdirLockedError, 4),
    (checkpointing.CheckpointRestoreError, 5),
    (resume_config.ConfigMismatchError, 5),
    (storage.DiskFullError, storage.DISK_FULL_EXIT),
    (shard_check.DatasetCorruptError, shard_check.DATASET_DAMAGED_EXIT),
    (fs.StorageAccessError, storage.STORAGE_UNAVAILABLE_EXIT),
    (storage.StorageTimeoutError, storage.STORAGE_UNAVAILABLE_EXIT),
)


def run_or_exit(run: Callable[[], None], watchdog: peers.PeerWatchdog | None) -> None:
    """Call ``run``; a known fault prints its one line and exits with its status.

    An unknown exception propagates with its traceback (a bug to report), except a disk that
    filled up somewhere we did not wrap (a library's own write): that still gets status 6. With a
    peer watchdog, an XLA runtime error first waits for the watchdog's verdict, because a dead
    process surfaces in the survivors as a failed collective, and "process 1 is gone" (exit 8) is
    the message that helps.
    """
    status = 1
    try:
        run()
        status = FINISHED
    except tuple(cls for cls, _ in EXIT_CODES) as err:
        status = next(code for cls, code in EXIT_CODES if isinstance(err, cls))
        _fail(f"error: {err}", status, watchdog)  # the message says what to do
    except Exception as err:
        if watchdog is not None and _collective_failure(err):
            watchdog.wait_for_verdict()  # a dead peer: its one line and exit 8 replace this
        if storage.is_disk_full(err):
            status = storage.DISK_FULL_EXIT
            _fail(f"error: no space left on device ({storage.reason(err)}). Free space on the "
                  "filesystem of --workdir (or of data.cache_dir), then rerun the same command "
                  "to resume from the newest complete checkpoint.", status, watchdog)
        raise
    finally:
        if watchdog is not None:
            watchdog.mark_exiting(status)


def _collective_failure(err: BaseException) -> bool:
    """An XLA runtime error (a collective or barrier that failed), the way a dead peer shows."""
    import jax

    return isinstance(err, jax.errors.JaxRuntimeError)


def _fail(message: str, status: int, watchdog: peers.PeerWatchdog | None) -> None:
    if watchdog is not None:
        watchdog.mark_exiting(status)
    print(message, file=sys.stderr, flush=True)
    if status == storage.STORAGE_UNAVAILABLE_EXIT:
        # Threads stuck in a storage library's retry loop (Orbax's writers) would keep the
        # interpreter from exiting for minutes: leave without joining them.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)
