"""A/B two variants of the train step in one process, alternating steps.

Why: on a shared or throttled machine (this project's CI VM drifts ±5–10 % between runs) two
separate benchmark runs cannot resolve a 3 % change.  Here both variants are compiled in the
same process and their steps alternate A, B, A, B, ..., so drift hits both alike; the medians
and their ratio are the result.  A variant is the config plus dotted overrides (``--b=model.
dtype=bfloat16``) and/or XLA debug options for its compilation only (``--b_xla=xla_cpu_use_onednn
=true``, passed as ``compile(compiler_options=...)``).  Loss and XLA's FLOP count are printed so a
variant that changes the computation shows it.  Issue #8's experiments were measured this way.

    python benchmarks/step_ab.py --batch_size=256 --steps=12 --b=model.dtype=bfloat16

Writes ``benchmarks/results/step_ab.json``.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # as `make train` does: step time depends on it
    from vlp_jax.runtime import allocator

    allocator.reexec_with_fast_allocator()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlp_jax.config.overrides import apply_overrides, parse_set_flags  # noqa: E402
from vlp_jax.perf import mfu, step_harness
from vlp_jax.runtime import (
    allocator,  # noqa: E402
    atomic_io,
)
from vlp_jax.runtime import devices as runtime

config_flags.DEFINE_config_file("config", "configs/base.py", "Config both variants start from.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps per variant (alternating, after 2 warm-ups each).")
flags.DEFINE_integer("vocab_size", 4000, "Vocabulary size (the built-in catalog's default).")
flags.DEFINE_multi_string("a", [], "Override for variant A, KEY=VALUE (repeatable).")
flags.DEFINE_multi_string("b", [], "Override for variant B, KEY=VALUE (repeatable).")
flags.DEFINE_multi_string("a_xla", [], "XLA option for compiling A, xla_NAME=VALUE.")
flags.DEFINE_multi_string("b_xla", [], "XLA option for compiling B, xla_NAME=VALUE.")
flags.DEFINE_string("out", "benchmarks/results/step_ab.json", "JSON output path.")
FLAGS = flags.FLAGS


def _variant(config, overrides: list[str], xla: list[str]) -> dict:
    """Compile one variant and run its 2 warm-up steps; returns its runner and metadata."""
    cfg = apply_overrides(config, parse_set_flags(overrides))
    harness = step_harness.build(cfg, FLAGS.batch_size, FLAGS.vocab_size)
    options = step_harness.parse_compiler_options(xla)
    compiled = harness.lower().compile(compiler_options=options or None)

    def run() -> dict:
        harness.state, metrics = compiled(harness.state, harness.batch)
        return jax.block_until_ready(metrics)

    metrics = [run() for _ in range(2)]
    return {"run": run, "overrides": overrides, "xla": options, "times": [],
            "label": " ".join(overrides + xla) or "(config as is)",
            "gflop": mfu.step_flops(compiled, harness.mesh.size) / 1e9,
            "loss_first_step": float(metrics[0]["loss"])}


def main(argv):
    del argv
    config = FLAGS.config.copy_and_resolve_references()
    config.train.batch_size = FLAGS.batch_size
    runtime.set_cpu_devices(config)  # one device layout for both: they share the process
    variants = {"A": _variant(config, FLAGS.a, FLAGS.a_xla),
                "B": _variant(config, FLAGS.b, FLAGS.b_xla)}
    for _ in range(FLAGS.steps):
        for v in variants.values():
            t = time.perf_counter()
            v["run"]()
            v["times"].append(time.perf_counter() - t)
    rows = {}
    for name, v in variants.items():
        ms = np.asarray(v["times"]) * 1e3
        rows[name] = {"overrides": v["overrides"], "xla_options": v["xla"],
                      "ms_median": float(np.median(ms)), "ms_min": float(ms.min()),
                      "ms_mean": float(ms.mean()), "ms_all": ms.tolist(),
                      "gflop_per_step": v["gflop"], "loss_first_step": v["loss_first_step"]}
        r = rows[name]
        print(f"{name}: {v['label']}\n   median {r['ms_median']:.1f} ms  min {r['ms_min']:.1f}  "
              f"mean {r['ms_mean']:.1f}  {v['gflop']:.2f} GFLOP/step  "
              f"first-step loss {v['loss_first_step']:.6f}")
    ratio = rows["B"]["ms_median"] / rows["A"]["ms_median"]
    print(f"B / A median step time: {ratio:.3f} ({FLAGS.steps} alternating steps each, batch "
          f"{FLAGS.batch_size}, allocator {allocator.active_allocator()})")
    atomic_io.write_json(FLAGS.out, {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "batch_size": FLAGS.batch_size, "steps": FLAGS.steps, "devices": jax.device_count(),
        "allocator": allocator.active_allocator(), "b_over_a_median": ratio, "variants": rows})


if __name__ == "__main__":
    app.run(main)
