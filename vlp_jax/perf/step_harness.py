"""The real train step on a random batch: what the speed, memory and profile benchmarks measure.

``benchmarks/train_throughput.py``, ``memory.py``, ``step_profile.py`` and ``step_ab.py`` all
need the step exactly as training runs it (``train_step.make_train_step``: loss, gradients,
AdamW update, state donated) on the device mesh training would use, fed a synthetic batch with
the train-batch contract — so it is built in one place.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from vlp_jax.models import make_model, param_count
from vlp_jax.parallel import mesh as mesh_lib
from vlp_jax.perf.synthetic import random_batch
from vlp_jax.train import state as train_state
from vlp_jax.train import step as train_step


@dataclasses.dataclass
class StepHarness:
    """A jitted train step, its initial state and one sharded random batch."""

    step: Any  # jitted (state, batch) -> (state, metrics); donates the state
    state: Any
    batch: dict[str, jax.Array]
    mesh: jax.sharding.Mesh

    def lower(self) -> Any:
        return self.step.lower(self.state, self.batch)

    def param_count(self) -> int:
        return param_count(self.state.params)


def build(config: ml_collections.ConfigDict, batch_size: int, vocab_size: int) -> StepHarness:
    """The train step of ``config`` at global ``batch_size`` on all devices (a data mesh)."""
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_size
    mesh = mesh_lib.make_mesh((-1,))
    model = make_model(config, vocab_size=vocab_size)
    optimizer, state, shardings = train_state.init_model_state(model, config, mesh)
    step = train_step.make_train_step(model, optimizer, config, mesh, shardings)
    batch = mesh_lib.shard_host_batch(random_batch(config, batch_size, vocab_size), mesh)
    return StepHarness(step, state, batch, mesh)


def parse_compiler_options(items: Sequence[str]) -> dict[str, Any]:
    """``["xla_cpu_use_onednn=true", "xla_cpu_prefer_vector_width=128"]`` -> the
    ``compile(compiler_options=...)`` dict (XLA debug options, per compiled program, so two
    variants can be compared in one process); true/false become bools, numbers numbers."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("xla_"):
            raise ValueError(f"a compiler option is xla_NAME=VALUE, got {item!r}")
        if raw.lower() in ("true", "false"):
            options[key] = raw.lower() == "true"
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        options[key] = value if isinstance(value, int | float) else raw
    return options
