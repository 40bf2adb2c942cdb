"""Where the train step's time goes: a ``jax.profiler`` trace attributed to model parts.

Traces a few steps of the config's real train step (``vlp_jax/perf/step_harness.py``) and joins the
per-op durations with the compiled HLO (``vlp_jax/perf/profiling.py``): time per category (matmul,
attention core, LayerNorm, GELU + bias, MLM/MPM heads, losses, optimizer), forward vs backward,
matmul GFLOP/s, and the most expensive ops with their layer.  This is the table issue #8's
profiling was done with.  On CPU the script turns on ``--xla_cpu_enable_xprof_traceme`` (per-op
events) and, like ``make train``, re-executes itself under a caching malloc.

    python benchmarks/step_profile.py --batch_size=256

Prints the table and writes ``benchmarks/results/step_profile.json`` (the trace itself stays in
``--trace_dir`` for TensorBoard / Perfetto).
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":
    from vlp_jax.runtime import allocator

    allocator.reexec_with_fast_allocator()
    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlp_jax.perf import profiling, step_harness
from vlp_jax.runtime import (
    allocator,  # noqa: E402
    atomic_io,
)
from vlp_jax.runtime import devices as runtime

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to profile.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps", 3, "Traced steps (after 2 warm-up steps).")
flags.DEFINE_integer("vocab_size", 4000, "Vocabulary size (the built-in catalog's default).")
flags.DEFINE_integer("top", 25, "How many of the most expensive ops to list.")
flags.DEFINE_string("trace_dir", "", "Where the trace goes (default: a new temp dir).")
flags.DEFINE_string("out", "benchmarks/results/step_profile.json", "JSON output path.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config.copy_and_resolve_references()
    config.train.batch_size = FLAGS.batch_size
    runtime.set_cpu_devices(config)
    harness = step_harness.build(config, FLAGS.batch_size, FLAGS.vocab_size)
    compiled = harness.lower().compile()
    ops = profiling.parse_hlo(compiled.as_text())

    def run_step():
        harness.state, metrics = compiled(harness.state, harness.batch)
        jax.block_until_ready(metrics)

    for _ in range(2):
        run_step()
    trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="vlp_step_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(FLAGS.steps):
            run_step()
    t0 = time.perf_counter()  # wall time measured outside the trace (tracing costs a little)
    for _ in range(FLAGS.steps):
        run_step()
    wall = (time.perf_counter() - t0) / FLAGS.steps
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json*"),
                              recursive=True))
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
    durations, counts = profiling.op_durations(traces[-1])
    if not durations:
        raise RuntimeError("the trace has no per-op events (on CPU they need "
                           "--xla_cpu_enable_xprof_traceme=true in XLA_FLAGS before JAX starts)")
    summary = profiling.summarize(durations, counts, ops, FLAGS.steps, wall, top=FLAGS.top)
    print(f"{config_flags.get_config_filename(FLAGS['config'])}, batch {FLAGS.batch_size}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"allocator {allocator.active_allocator()}; trace: {traces[-1]}")
    print(profiling.format_summary(summary))
    summary.update(config=config_flags.get_config_filename(FLAGS["config"]),
                   batch_size=FLAGS.batch_size, devices=jax.device_count(),
                   xla_flags=os.environ.get("XLA_FLAGS", ""), trace=traces[-1])
    atomic_io.write_json(FLAGS.out, summary)


if __name__ == "__main__":
    app.run(main)
