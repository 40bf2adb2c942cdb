"""Orbax checkpoints of the train state together with the Grain iterator state.

Saving the data iterator beside the model is what makes a resumed run continue *exactly*: the
next batch after a restore is the one an uninterrupted run would have seen.

What "complete" means (orbax 0.12 on a POSIX filesystem): a step is written into
``<step>.orbax-checkpoint-tmp-<time>/`` and renamed to ``<step>/`` only after every item and
``commit_success.txt`` are written, so a process killed mid-save (even during an async save)
leaves a tmp directory that ``all_steps()`` never lists; the writer removes such leftovers at
start-up (``cleanup_tmp``).  A finished step can still be damaged afterwards (a deleted or
truncated file); that only shows when it is read, so ``restore_newest`` tries the newest step
first and falls back to older ones, naming each unusable step, and raises
``CheckpointRestoreError`` (no Orbax/tensorstore trace) when none can be read.

A full disk: Orbax raises the write error (``RESOURCE_EXHAUSTED: ... No space left on
device``) from its background thread at the next ``wait_until_finished`` or ``save`` and leaves
``<step>.orbax-checkpoint-tmp/`` behind (seen with orbax 0.12 on a full tmpfs).  Every save
is therefore checked when it is waited for (``wait``, and before the next ``save``): on a
failure the leftovers of that step are deleted (the space is needed) and
``storage.DiskFullError`` names the newest complete step, which is untouched.  A renamed step
without ``commit_success.txt`` (Orbax's last write) also counts as failed, and restoring skips
such a step, so a half-written step is never resumed from.

The "data" item (one JSON file per process) also carries the train loop's host counters
(``loop_state``, e.g. the non-finite skip streak): they live on the host, not in the
``TrainState`` pytree, yet a resumed run must continue them.  Files written before the counters
existed hold the bare iterator state; they restore with ``loop_state == {}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vlp_jax.runtime import fs, storage
from vlp_jax.train.state import TrainState

CORRUPT_DIR = "checkpoints_corrupt"
COMMIT_MARKER = "commit_success.txt"  # written by Orbax last, once a step is complete
_DATA_FORMAT_KEY = "vlp_jax_data_item"  # marks a data item holding iterator + loop_state


class _DataItem:
    """The data iterator and the loop's host counters as one Grain checkpoint item.

    Speaks the byte-state protocol of Grain's Orbax handler (``get_state() -> bytes``,
    ``set_state(bytes)``, ``start_prefetch``) and forwards the iterator part to the wrapped
    iterator in the protocol *it* speaks (a Grain ``DatasetIterator`` takes a dict, the others
    bytes), so the JSON of the iterator is the same as when it was saved alone.
    """

    def __init__(self, iterator: Any, loop_state: dict[str, Any] | None = None):
        self.iterator = iterator
        self.loop_state = json.loads(json.dumps(loop_state or {}))  # a snapshot, JSON-safe

    def get_state(self) -> bytes:
        state = self.iterator.get_state()
        if isinstance(state, bytes | bytearray):
            state = json.loads(state.decode())
        record = {_DATA_FORMAT_KEY: 1, "iterator": state, "loop_state": self.loop_state}
        return json.dumps(record, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        record = json.loads(state.decode())
        if isinstance(record, dict) and _DATA_FORMAT_KEY in record:
            iterator_state, self.loop_state = record["iterator"], record["loop_state"]
        else:  # written before loop_state existed: the bare iterator state
            iterator_state, self.loop_state = record, {}
        if isinstance(self.iterator, grain.DatasetIterator):
            self.iterator.set_state(iterator_state)
        else:
            self.iterator.set_state(json.dumps(iterator_state).encode())

    def start_prefetch(self) -> None:
        if hasattr(self.iterator, "start_prefetch"):
            self.iterator.start_prefetch()


class CheckpointRestoreError(RuntimeError):
    """No checkpoint in the directory could be restored."""


def _short_reason(err: BaseException) -> str:
    """One line for a log: the root cause of an (often multi-line, tensorstore-deep) error.

    Orbax wraps tensorstore errors in a message that dumps the whole spec; the innermost cause
    names the array and the file that could not be read.
    """
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(err).__name__}: {text}"


def _all_processes_ok(ok: bool) -> bool:
    """Every process must take the same fallback decision, or collective restores deadlock."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with (state, data-iterator) items.

    ``metadata`` is stored with every step (``resume_config.resume_metadata``).  ``cleanup_tmp``
    removes unfinished saves of killed runs; only the run that owns the workdir may do that,
    never an eval/export reader (it could delete a save in flight).
    """

    def __init__(
        self, workdir: str, cfg: ml_collections.ConfigDict, *,
        metadata: dict[str, Any] | None = None, cleanup_tmp: bool = False,
    ):
        self.workdir = fs.normalize(workdir)
        self.directory = fs.join(self.workdir, "checkpoints")
        self.metadata = metadata
        self.timeout = float(cfg.save_timeout_s)
        self.loop_state: dict[str, Any] = {}  # of the step last restored with its iterator
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=1,  # the train loop decides when to save
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
        )
        self._unverified: int | None = None  # the step of the save not yet checked
        self._failed_steps: list[int] = []  # saves that failed: their leftovers are deleted
        self.abandoned = False  # a save timed out: close() must not wait for it

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_metadata(self, step: int) -> dict[str, Any] | None:
        """The custom metadata saved with ``step`` (``None`` if absent or unreadable)."""
        try:
            return self.manager.metadata(step).custom_metadata or None
        except Exception:  # unreadable metadata: the restore attempt will name the problem
            return None

    def save(
        self, step: int, state: TrainState, data_iterator: Any, force: bool = False,
        loop_state: dict[str, Any] | None = None,
    ) -> bool:
        """Start saving ``step`` (async: returns once the arrays are copied off the device).

        ``loop_state`` (small, JSON-able host counters) is stored with the iterator's state, so
        it needs a ``data_iterator``; ``restore`` puts it back in ``self.loop_state``.
        """
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_DataItem(data_iterator, loop_state))
        elif loop_state:
            raise ValueError("loop_state is saved in the data item: pass the data iterator")
        self.wait()  # Orbax would wait for the previous save anyway; check it is complete first
        try:
            saved = storage.call_with_deadline(
                lambda: self.manager.save(step, args=ocp.args.Composite(**args), force=force,
                                          custom_metadata=self.metadata),
                self.timeout, f"saving checkpoint step {step} to {self.directory}")
        except storage.StorageTimeoutError as err:
            raise self._timed_out(step, err) from err
        except Exception as err:
            if storage.is_disk_full(err):
                raise self._save_failed(step, storage.reason(err)) from err
            if storage.is_unreachable(err):
                raise self._timed_out(step, storage.StorageTimeoutError(
                    f"saving checkpoint step {step} to {self.directory} failed: the storage "
                    f"cannot be reached ({storage.reason(err)})")) from err
            raise
        self._unverified = step if saved else None
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(
        self, step: int, abstract_state: TrainState, data_iterator: Any
    ) -> TrainState:
        """Restore into ``abstract_state``'s shapes/shardings; the iterator is updated in place
        and the step's ``loop_state`` (``{}`` if it has none) is put in ``self.loop_state``."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        item = None if data_iterator is None else _DataItem(data_iterator)
        if item is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(item)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        self.loop_state = item.loop_state if item is not None else {}
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"]

    def restore_params_only(self, step: int, abstract_state: TrainState) -> TrainState:
        """Restore the state without touching any data iterator (eval / export modes)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def restore_newest(
        self,
        abstract_state: TrainState,
        data_iterator: Any = None,
        *,
        check: Callable[[int, dict[str, Any] | None], None] | None = None,
        quarantine: bool = False,
    ) -> tuple[int, TrainState] | None:
        """Restore the newest readable step; ``None`` if there is no checkpoint at all.

        ``check(step, metadata)`` runs before each attempt and may raise (config mismatch): its
        error propagates, it is not a reason to fall back.  With ``quarantine`` (the training
        run), unreadable steps newer than the restored one are moved to ``checkpoints_corrupt/``
        so the resumed run can save those step numbers again; nothing is moved if no step is
        readable.  ``data_iterator=None`` restores the state only (eval/export).
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            if check is not None:
                check(step, self.step_metadata(step))
            try:
                if not self.is_complete(step):  # renamed, but a write failed (full disk)
                    raise RuntimeError(f"incomplete save: no {COMMIT_MARKER}")
                if data_iterator is None:
                    state, ok = self.restore_params_only(step, abstract_state), True
                else:
                    state, ok = self.restore(step, abstract_state, data_iterator), True
            except Exception as err:  # any read failure makes this step unusable
                state, ok, reason = None, False, _short_reason(err)
            else:
                reason = "failed on another process"
            if _all_processes_ok(ok):
                if quarantine:
                    for bad_step, _ in failures:
                        self._move_aside(bad_step)
                return step, state
            failures.append((step, reason))
            logging.warning(
                "checkpoint %s is unusable (%s); falling back to the previous checkpoint",
                fs.join(self.directory, str(step)), reason,
            )
        if failures:
            listing = "\n  ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointRestoreError(
                f"no usable checkpoint in {self.directory}; every step failed to restore:\n  "
                f"{listing}\nMove the checkpoints directory aside to start from scratch, or use "
                "another --workdir."
            )
        return None

    def _move_aside(self, step: int) -> None:
        src = fs.join(self.directory, str(step))
        dst = fs.join(self.workdir, CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and fs.exists(src):
            _move_tree(src, dst)
            logging.warning("checkpoint: moved unusable step %d to %s (kept for inspection)",
                            step, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vlp_jax.move_aside_{step}")
        self.manager.reload()

    def is_complete(self, step: int) -> bool:
        return fs.exists(fs.join(self.directory, str(step), COMMIT_MARKER))

    def wait(self) -> None:
        """Wait for the save in flight; raise ``DiskFullError`` if it could not be completed
        (the incomplete step is deleted first, the older ones are untouched)."""
        step, self._unverified = self._unverified, None

        def finish() -> bool:
            self.manager.wait_until_finished()
            return step is None or self.is_complete(step)

        try:
            complete = storage.call_with_deadline(
                finish, self.timeout, f"writing checkpoint step {step} to {self.directory}")
        except storage.StorageTimeoutError as err:
            raise self._timed_out(step, err) from err
        except Exception as err:
            if step is not None and storage.is_disk_full(err):
                raise self._save_failed(step, storage.reason(err)) from err
            if storage.is_unreachable(err):
                raise self._timed_out(step, storage.StorageTimeoutError(
                    f"writing checkpoint step {step} to {self.directory} failed: the storage "
                    f"cannot be reached ({storage.reason(err)})")) from err
            raise
        if step is not None and not _all_processes_ok(complete):
            raise self._save_failed(step, f"the save did not complete ({COMMIT_MARKER} missing)")

    def _save_failed(self, step: int, why: str) -> storage.DiskFullError:
        """Delete what the failed save of ``step`` left and describe what is still usable."""
        self._failed_steps.append(step)
        self._remove_partial(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vlp_jax.save_failed_{step}")
        self.manager.reload()
        complete = [s for s in self.all_steps() if s != step and self.is_complete(s)]
        if complete:
            usable = (f"The newest complete checkpoint, step {complete[-1]}, is intact: free "
                      "space (or use a --workdir on a larger disk), then rerun the same command "
                      "to resume from it.")
        else:
            usable = ("There is no complete checkpoint yet: free space, then rerun the same "
                      "command to start again.")
        return storage.DiskFullError(
            f"could not write the checkpoint of step {step} to {self.directory}: {why}; "
            f"{storage.describe_free(self.directory)} on its filesystem. The incomplete step was "
            f"deleted. {usable}")

    def _timed_out(self, step: int | None, err: storage.StorageTimeoutError
                   ) -> storage.StorageTimeoutError:
        """The message for a save stuck on an unreachable store; nothing is deleted (the store
        cannot be reached), and an unfinished step is never resumed from (no commit marker)."""
        self.abandoned = True
        older = [s for s in self.manager.all_steps() if s != step] if step is not None else []
        usable = (f"the newest complete checkpoint before it (step {max(older)}) is untouched"
                  if older else "there is no earlier complete checkpoint")
        return storage.StorageTimeoutError(
            f"{err} (deadline: checkpoint.save_timeout_s); is the storage of {self.workdir} "
            "reachable? "
            f"The unfinished step is never resumed from and {usable}: once the storage is back, "
            "rerun the same command to resume.")

    def _remove_partial(self, step: int) -> None:
        """Delete the step's directory and Orbax's temporary one (process 0 owns the tree)."""
        if jax.process_index() != 0 or not fs.isdir(self.directory):
            return
        for name in fs.listdir(self.directory):
            if name == str(step) or name.startswith(f"{step}.orbax-checkpoint-tmp"):
                try:
                    fs.rmtree(fs.join(self.directory, name))
                except OSError as err:
                    logging.warning("checkpoint: could not delete %s: %s", name, err)

    def close(self) -> None:
        """Wait and release; never raises for a save's outcome (``wait`` reports that, and
        Orbax re-raises a failed save's error on every later call), so a ``finally: close()``
        cannot hide the error being raised."""
        self._unverified = None
        if self.abandoned:  # Orbax's writer threads are stuck on the store: do not join them
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            logging.warning("checkpoint: a save had failed: %s", _short_reason(err))
        try:
            self.manager.close()
        except Exception as err:  # noqa: BLE001
            logging.warning("checkpoint: closing after a failed save: %s", _short_reason(err))
        # A failed async save's writer threads can still be creating files while ``wait``
        # deletes its temporary directory; once Orbax is closed they are gone, so delete again.
        for step in self._failed_steps:
            self._remove_partial(step)


def _move_tree(src: str, dst: str) -> None:
    """Move a checkpoint step aside (a rename locally; copy-then-delete on object stores)."""
    if not fs.is_remote(src):
        fs.makedirs(fs.parent(dst))
        shutil.move(src, dst)
        return
    import fsspec

    filesystem, src_key = fsspec.core.url_to_fs(src)
    _, dst_key = fsspec.core.url_to_fs(dst)
    filesystem.copy(src_key, dst_key, recursive=True)
    filesystem.rm(src_key, recursive=True)


def abstract_like(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of a live state: the Orbax restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
