"""``train_and_evaluate(config, workdir)``: the whole run, importable and testable.

Order of work: validate config → mesh → dataset (cached) → model → sharded state → restore the
latest checkpoint if any (state *and* data iterator) → train loop with periodic logging,
checkpointing and evaluation → final checkpoint, evaluation and serving export.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from vlp_jax import checkpointing, config_check, metrics_log, train_state, train_step
from vlp_jax.data import dataset, pipeline
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.device_prefetch import DevicePrefetchIterator
from vlp_jax.eval import embed
from vlp_jax.models import make_model, pretrained
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.serve import export


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


class Run:
    """Objects a run needs in several places (train loop, eval, export)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config = pretrained.configure_text_init(config)  # widths/tokenizer from a checkpoint
        config_check.validate_config(config)
        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.mesh = mesh_lib.make_mesh(tuple(config.train.mesh_shape))
        mesh_lib.check_batch_divisible(config.train.batch_size, self.mesh)
        self.data = dataset.prepare_dataset(config.data)
        self.tokenizer = tokenizer_lib.load_tokenizer(self.data.tokenizer_dir)
        self.model = make_model(config, vocab_size=len(self.tokenizer))
        self.optimizer, self.state, self.shardings = train_state.init_model_state(
            self.model, config, self.mesh
        )
        if config.model.text_init:
            self.state = train_state.replace_params(
                self.state, pretrained.apply_text_init(config, self.state.params)
            )
        self.checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
        self.encode_fns = embed.make_encode_fns(self.model, self.mesh)
        logging.info(
            "model: %s parameters; mesh %s", f"{train_state.param_count(self.state.params):,}",
            dict(self.mesh.shape),
        )

    def evaluate(self, step: int, out_dir: str | None = None) -> dict[str, Any]:
        return embed.evaluate_model(
            self.model, self.state.params, self.data, self.tokenizer, self.config, self.mesh,
            out_dir or os.path.join(self.workdir, "eval"), step, encode_fns=self.encode_fns,
        )

    def restore_latest(self, data_iterator: Any = None) -> int:
        """Restore the newest checkpoint (if any); returns the step to continue from."""
        step = self.checkpointer.latest_step()
        if step is None:
            return 0
        abstract = checkpointing.abstract_like(self.state)
        self.state = self.checkpointer.restore(step, abstract, data_iterator)
        return int(step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pre-train, checkpoint, evaluate; returns the final evaluation results."""
    run = Run(config, workdir)
    cfg = run.config
    _save_config(cfg, workdir)
    host_iter = pipeline.make_train_iterator(
        run.data.sources["train"], run.data.sources["items"], run.tokenizer, cfg.data,
        global_batch_size=cfg.train.batch_size, patch_size=cfg.model.patch_size,
        seed=cfg.train.seed,
    )
    data_iter = DevicePrefetchIterator(
        host_iter, lambda b: mesh_lib.shard_host_batch(b, run.mesh), depth=max(cfg.data.prefetch, 1)
    )
    start_step = run.restore_latest(data_iter)
    if start_step:
        logging.info("resuming from step %d", start_step)
    step_fn = train_step.make_train_step(run.model, run.optimizer, cfg, run.mesh, run.shardings)
    logger = metrics_log.MetricsLogger(
        workdir, cfg.train.num_steps, cfg.train.batch_size, is_main=jax.process_index() == 0
    )
    results: dict[str, Any] = {}
    state = run.state
    try:
        for step in range(start_step + 1, cfg.train.num_steps + 1):
            state, metrics = step_fn(state, next(data_iter))
            logger.record(step, metrics)
            is_last = step == cfg.train.num_steps
            if step % cfg.train.log_every_steps == 0 or is_last:
                logger.flush()
            if step % cfg.checkpoint.every_steps == 0 or is_last:
                logger.flush()  # never checkpoint a state whose loss went non-finite
                run.checkpointer.save(step, state, data_iter, force=True)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not is_last:
                run.state = state
                eval_dir = os.path.join(workdir, "eval", f"step_{step}")
                logger.write_eval(step, run.evaluate(step, eval_dir))
        run.state = state
        run.checkpointer.wait()
        final_step = int(jax.device_get(state.step))
        results = run.evaluate(final_step)
        logger.write_eval(final_step, results)
        export.export_bundle(
            os.path.join(workdir, "export"), params=state.params, config=run.config,
            tokenizer=run.tokenizer, step=final_step,
        )
    finally:
        logger.close()
        run.checkpointer.close()
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``--mode=eval``: restore the latest checkpoint's params and evaluate."""
    run = Run(config, workdir)
    step = run.checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run.checkpointer.directory}")
    run.state = run.checkpointer.restore_params_only(step, checkpointing.abstract_like(run.state))
    results = run.evaluate(int(step))
    run.checkpointer.close()
    print(json.dumps(results["overall"], indent=2))
    return results
