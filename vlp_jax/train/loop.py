"""``train_and_evaluate(config, workdir)``: the whole run, importable and testable.

Order of work: lock the workdir → validate config → mesh → dataset (cached) → model → sharded
state → restore the newest usable checkpoint if any (state *and* data iterator; the config is
checked against the one it was written with) → train loop with periodic logging, checkpointing
and evaluation → final checkpoint, evaluation and serving export.

Faults (docs/reliability.md): SIGTERM → checkpoint at the current step and return;
SIGKILL → the next run resumes from the newest complete checkpoint, bit-identically; unreadable
checkpoints → fallback to older ones; non-finite steps → ``train.nonfinite_policy``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from vlp_jax.config import check as config_check
from vlp_jax.convert import pretrained
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import from_config
from vlp_jax.data.catalog import relevance as catalog_relevance
from vlp_jax.data.input import pipeline
from vlp_jax.data.input.device_prefetch import DevicePrefetchIterator
from vlp_jax.eval import embed
from vlp_jax.indexing import export
from vlp_jax.models import make_model, param_count
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.runtime import fs, peers
from vlp_jax.train import (
    checkpointing,
    metrics_log,
    nonfinite,
    preemption,
    resume_config,
    workdir_lock,
)
from vlp_jax.train import state as train_state
from vlp_jax.train import step as train_step
from vlp_jax.train import workdir as run_workdir


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        fs.write_text(fs.join(workdir, "config.json"),
                      config.to_json_best_effort(indent=2, sort_keys=True))


class Run:
    """Objects a run needs in several places (train loop, eval, export)."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, *, writer: bool = False,
        rebuild_data: bool = False,
    ):
        """``writer``: this is the training run that owns the workdir (may clean up after
        killed saves and move unreadable checkpoints aside); eval/export only read.
        ``rebuild_data``: rebuild a damaged TFDS build instead of stopping (``--rebuild_data``)."""
        config = pretrained.configure_text_init(config)  # widths/tokenizer from a checkpoint
        # Locked: code writing a field that configs/base.py lacks fails naming it (config_flags
        # locks --config already; configs built in Python, e.g. by tests, are locked here).
        config.lock()
        config_check.validate_config(config)
        workdir = run_workdir.resolve(workdir, config)
        self.config, self.workdir = config, workdir
        fs.makedirs(workdir)
        self.mesh = mesh_lib.make_mesh(tuple(config.train.mesh_shape))
        mesh_lib.check_batch_divisible(config.train.batch_size, self.mesh)
        self.checkpointer = checkpointing.Checkpointer(
            workdir, config.checkpoint, cleanup_tmp=writer,
            metadata=resume_config.resume_metadata(
                config, self.mesh.devices.size, jax.process_count()
            ),
        )
        self._checked_steps: set[tuple[int, str | None]] = set()
        self.vocab: str | None = None  # known once the dataset is prepared
        newest = self.checkpointer.latest_step()
        if writer and newest is not None:  # fail fast, before the data build and compiles
            try:
                self.check_resume(newest, self.checkpointer.step_metadata(newest))
            except BaseException:
                self.checkpointer.close()
                raise
        self.data = from_config.prepare_dataset(config.data, rebuild=rebuild_data)
        self.tokenizer = tokenizer_lib.load_tokenizer(self.data.tokenizer_dir)
        # Checkpoints record the vocabulary they were trained on; resuming checks it.
        self.vocab = tokenizer_lib.vocab_fingerprint(self.tokenizer)
        self.checkpointer.metadata = resume_config.resume_metadata(
            config, self.mesh.devices.size, jax.process_count(), self.vocab)
        self.model = make_model(config, vocab_size=len(self.tokenizer))
        self.optimizer, self.state, self.shardings = train_state.init_model_state(
            self.model, config, self.mesh
        )
        if config.model.text_init or config.model.image_init:
            self.state = train_state.replace_params(
                self.state, pretrained.apply_text_init(config, self.state.params), config
            )
        self.encode_fns = embed.make_encode_fns(self.model, self.mesh)
        logging.info(
            "model: %s parameters; mesh %s", f"{param_count(self.state.params):,}",
            dict(self.mesh.shape),
        )

    def evaluate(self, step: int, out_dir: str | None = None) -> dict[str, Any]:
        return embed.evaluate_model(
            self.model, self.state.params, self.data, self.tokenizer, self.config, self.mesh,
            out_dir or fs.join(self.workdir, "eval"), step, encode_fns=self.encode_fns,
        )

    def restore_latest(self, data_iterator: Any = None, *, check_config: bool = True) -> int:
        """Restore the newest usable checkpoint (if any); returns the step to continue from.

        With ``check_config`` (training) a config that changed a shape-fixing field since the
        checkpoint raises ``ConfigMismatchError``; allowed changes are logged as warnings.
        """
        found = self.checkpointer.restore_newest(
            checkpointing.abstract_like(self.state), data_iterator,
            check=self.check_resume if check_config else None, quarantine=check_config,
        )
        if found is None:
            return 0
        step, self.state = found
        return int(step)

    def check_resume(self, step: int, saved: dict[str, Any] | None) -> None:
        """Raise ``ConfigMismatchError`` if this config cannot resume ``step``; warn on
        allowed changes (see ``resume_config``), once per step."""
        if (step, self.vocab) in self._checked_steps:
            return
        self._checked_steps.add((step, self.vocab))
        where = f"checkpoint step {step} in {self.checkpointer.directory}"
        for warning in resume_config.check_resume(
            saved, self.config, self.mesh.devices.size, jax.process_count(), where, self.vocab
        ):
            logging.warning(warning)

    def item_ids(self, item_index: list[int]) -> list[str]:
        """Catalog ids of ``items`` rows (for the non-finite debug dump)."""
        items = self.data.sources["items"]
        out = []
        for i in item_index:
            value = items[int(i)]["item_id"]
            out.append(value.decode() if isinstance(value, bytes) else str(value))
        return out


BatchHook = Callable[[int, dict[str, Any]], dict[str, Any]]
_DUMP_KEYS = ("item_index", "query_id")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, batch_hook: BatchHook | None = None,
    rebuild_data: bool = False,
) -> dict[str, Any]:
    """Pre-train, checkpoint, evaluate; returns the final evaluation results.

    Returns ``{"preempted_at_step": step}`` instead when SIGTERM stopped the run (after saving
    a checkpoint of that step).  ``batch_hook(step, batch) -> batch`` is applied to each device
    batch before its step: a fault-injection point for tests and debugging (e.g. put an Inf
    into the patches at one step), ``None`` in normal runs.  Raises ``WorkdirLockedError``,
    ``ConfigMismatchError``, ``CheckpointRestoreError`` or ``NonFiniteLossError`` with a message
    meant for the user (``main`` prints it without a traceback).
    """
    workdir = run_workdir.resolve(workdir, config)  # refuses unusable locations before any work
    fs.makedirs(workdir)
    lease = config.checkpoint.lock_lease_s
    lock = workdir_lock.WorkdirLock(workdir, lease) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        with preemption.PreemptionWatcher() as watcher:
            return _train(config, workdir, watcher, batch_hook, rebuild_data, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(
    config: ml_collections.ConfigDict, workdir: str, watcher: preemption.PreemptionWatcher,
    batch_hook: BatchHook | None, rebuild_data: bool = False,
    lock: workdir_lock.WorkdirLock | None = None,
) -> dict[str, Any]:
    run = Run(config, workdir, writer=True, rebuild_data=rebuild_data)
    peers.align("train_start")  # before the first Gloo collective (restore, step 1)
    cfg = run.config
    host_iter = pipeline.make_train_iterator(
        run.data.sources["train"], run.data.sources["items"], run.tokenizer, cfg.data,
        global_batch_size=cfg.train.batch_size, patch_size=cfg.model.patch_size,
        seed=cfg.train.seed,
    )
    data_iter = DevicePrefetchIterator(
        host_iter, lambda b: mesh_lib.shard_host_batch(b, run.mesh), depth=max(cfg.data.prefetch, 1)
    )
    try:
        start_step = run.restore_latest(data_iter)
    except BaseException:
        run.checkpointer.close()
        raise
    _save_config(cfg, workdir)  # after the resume check: the file describes the live run
    if start_step:
        logging.info("resuming from step %d", start_step)
    step_fn = train_step.make_train_step(run.model, run.optimizer, cfg, run.mesh, run.shardings,
                                         relevance_tables=_relevance_tables(run))
    logger = metrics_log.MetricsLogger(
        workdir, cfg.train.num_steps, cfg.train.batch_size, is_main=jax.process_index() == 0,
        nonfinite_policy=cfg.train.nonfinite_policy,
        max_consecutive_skips=cfg.train.max_consecutive_skips, resume_step=start_step,
        skip_state=run.checkpointer.loop_state.get("nonfinite"),
    )
    results: dict[str, Any] = {}
    state = run.state
    try:
        for step in range(start_step + 1, cfg.train.num_steps + 1):
            batch = next(data_iter)
            if batch_hook is not None:
                batch = batch_hook(step, batch)
            if step == start_step + 1 and jax.process_count() > 1:
                step_fn = _compile_in_step(step_fn, state, batch)
            state, metrics = step_fn(state, batch)
            logger.record(step, metrics, {k: batch[k] for k in _DUMP_KEYS if k in batch})
            is_last = step == cfg.train.num_steps
            if step % cfg.train.log_every_steps == 0 or is_last:
                logger.flush()
            saved = step % cfg.checkpoint.every_steps == 0 or is_last
            if saved:
                if lock is not None:
                    lock.check_held()  # another run took the workdir over: never save into it
                logger.flush()  # never checkpoint a state whose loss went non-finite
                run.checkpointer.save(step, state, data_iter, force=True,
                                      loop_state=_loop_state(logger))
                logger.sync(run.checkpointer.timeout)  # object store: logs as fresh as it
            if watcher.should_stop(step):
                _save_on_preemption(run, logger, state, data_iter, step, saved)
                return {"preempted_at_step": step}
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not is_last:
                run.state = state
                eval_dir = fs.join(workdir, "eval", f"step_{step}")
                logger.write_eval(step, run.evaluate(step, eval_dir))
                logger.sync()
        run.state = state
        run.checkpointer.wait()
        final_step = int(jax.device_get(state.step))
        results = run.evaluate(final_step)
        logger.write_eval(final_step, results)
        export.export_bundle(
            fs.join(workdir, "export"), params=state.params, config=run.config,
            tokenizer=run.tokenizer, step=final_step,
        )
    except metrics_log.NonFiniteLossError as err:
        err.dump_path = nonfinite.write_dump(
            workdir, err.step, err.bad, err.batch_ids, err.message, run.item_ids
        )
        raise
    finally:
        logger.close(sync=not run.checkpointer.abandoned)
        run.checkpointer.close()
    return results


def _compile_in_step(step_fn: Any, state: Any, batch: Any) -> Any:
    """Multi-process: compile the train step, then wait for every process to have done so.

    A process that compiles slower (a busy host; only process 0 writes the persistent cache)
    would reach the step's first collective late, and Gloo gives up after 30 s
    (``peers.align``).  The compiled executable is the one ``jit`` would run.
    """
    compiled = step_fn.lower(state, batch).compile()
    peers.align("train_step_compiled")
    return compiled


def _loop_state(logger: metrics_log.MetricsLogger) -> dict[str, Any]:
    """Host counters a checkpoint keeps beside the iterator (not in the state pytree): the skip
    streak of ``nonfinite_policy="skip"`` must survive a resume, or a run that keeps going
    non-finite across preemptions would never reach ``max_consecutive_skips``."""
    return {"nonfinite": logger.skip_state()}


def _relevance_tables(run: Run) -> catalog_relevance.RelevanceTables | None:
    """The built-in catalog's relevance oracle for the false-negative diagnostics, or None
    (user catalog, ``negatives.relevance_probe`` off, or no contrastive loss)."""
    cfg = run.config
    if not cfg.negatives.relevance_probe or cfg.loss.qic_weight <= 0:
        return None
    if cfg.data.catalog_dir or cfg.negatives.ring:
        return None
    items = run.data.sources["items"]
    tables = catalog_relevance.relevance_tables(
        from_config.builtin_catalog_dir(cfg.data), run.item_ids(range(len(items))))
    if tables is not None:
        logging.info("false-negative diagnostics on: %d query combinations, %d items",
                     len(tables.query_hashes), len(tables.item_attrs))
    return tables


def _save_on_preemption(
    run: Run, logger: metrics_log.MetricsLogger, state: train_state.TrainState, data_iter: Any,
    step: int, already_saved: bool,
) -> None:
    """Checkpoint ``step`` (after any save in flight) so a rerun of the command resumes it."""
    logger.flush()  # a non-finite state raises here instead of being saved
    if not already_saved:
        run.checkpointer.save(step, state, data_iter, force=True,  # waits for an earlier save
                              loop_state=_loop_state(logger))
    run.checkpointer.wait()
    logging.warning(
        "preemption: SIGTERM received; saved checkpoint of step %d to %s. Exiting; rerun the "
        "same command to resume.", step, run.checkpointer.directory,
    )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, *, rebuild_data: bool = False
) -> dict[str, Any]:
    """``--mode=eval``: restore the newest readable checkpoint's params and evaluate."""
    run = Run(config, workdir, rebuild_data=rebuild_data)
    try:
        step = run.restore_latest(check_config=False)
    finally:
        run.checkpointer.close()
    if not step:
        raise FileNotFoundError(f"no checkpoint in {run.checkpointer.directory}")
    results = run.evaluate(int(step))
    print(json.dumps(results["overall"], indent=2))
    return results
