"""The highest MFU a train step can reach on this machine: its matmuls alone, next to the step.

For each batch size, this times two programs in the same process, alternating runs so that the
VM's clock drift hits both alike:

- the real train step of the config (``vlp_jax/perf/step_harness.py``);
- a program that runs exactly the step's ``dot_general``s, forward and backward, with the same
  shapes and dimension numbers, and nothing else (``vlp_jax/perf/mfu.py``).

Both are divided into the step's XLA FLOPs and the matmul peak measured in the same run.  The
second figure is a ceiling: the MFU the step would reach if softmax, LayerNorm, GELU, residuals,
losses and the optimizer were free.  No reformulation of those ops can beat it; only faster
matmul kernels for the step's shapes, or other shapes (another model), can.  ``--by_kernel``
also times each distinct matmul alone and lists the slowest, which shows which shapes pull the
ceiling down.  ``--reference`` adds the CLIP reference step of ``benchmarks/clip_reference.py``
in the project's formulation.

    python benchmarks/mfu_ceiling.py --batch_sizes=64,256 --by_kernel

Prints a table and writes ``benchmarks/results/mfu_ceiling.json``.  Runs on one device
(``train.cpu_devices=1``, the default): the dots-only program is a single-device program.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # as `make train` does: step time depends on it
    from vlp_jax.runtime import allocator

    allocator.reexec_with_fast_allocator()

import clip_reference  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlp_jax.perf import mfu, step_harness
from vlp_jax.runtime import (
    allocator,  # noqa: E402
    atomic_io,
)
from vlp_jax.runtime import devices as runtime

config_flags.DEFINE_config_file("config", "configs/base.py", "Config whose step is measured.")
flags.DEFINE_string("batch_sizes", "64,256", "Comma-separated global batch sizes.")
flags.DEFINE_integer("steps", 10, "Timed runs of each program (alternating, after warm-up).")
flags.DEFINE_integer("vocab_size", 4000, "Vocabulary size (the built-in catalog's default).")
flags.DEFINE_bool("by_kernel", False, "Also time each distinct matmul alone.")
flags.DEFINE_integer("top", 12, "How many of the slowest matmul kernels to print.")
flags.DEFINE_bool("reference", False, "Also measure the CLIP reference step (vlp_jax form).")
flags.DEFINE_string("out", "benchmarks/results/mfu_ceiling.json", "JSON output path.")
FLAGS = flags.FLAGS


def _alternate(step_run, dots_run, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of ``steps`` runs of each, interleaved step, dots, step, dots, ... ."""
    for _ in range(2):
        jax.block_until_ready(step_run())
        jax.block_until_ready(dots_run())
    step_times, dots_times = [], []
    for _ in range(steps):
        for run, times in ((step_run, step_times), (dots_run, dots_times)):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
    return step_times, dots_times


def measure(name: str, batch_size: int, step_fn, step_args: tuple, advance, flops: float) -> dict:
    """One row: the step (``advance()`` runs it and keeps its new state) against its dots."""
    dots = mfu.step_dots(step_fn, *step_args)
    dots_fn, operands = mfu.dots_only_program(dots)
    step_times, dots_times = _alternate(advance, lambda: dots_fn(operands), FLAGS.steps)
    row = {
        "model": name, "batch_size": batch_size, "step_gflops": flops / 1e9,
        "dot_count": sum(d.count for d in dots), "dot_gflops": mfu.total_flops(dots) / 1e9,
        "step_ms": float(np.median(step_times)) * 1e3,
        "dots_ms": float(np.median(dots_times)) * 1e3,
        "step_ms_all": [t * 1e3 for t in step_times], "dots_ms_all": [t * 1e3 for t in dots_times],
    }
    if FLAGS.by_kernel:
        row["kernels"] = mfu.time_by_kernel(dots)
    return row


def config_row(config, batch_size: int) -> dict:
    harness = step_harness.build(config, batch_size, FLAGS.vocab_size)
    if harness.mesh.size != 1:
        raise ValueError(f"mfu_ceiling runs on one device, got a mesh of {harness.mesh.size}; "
                         "pass --config.train.cpu_devices=1")
    compiled = harness.lower().compile()
    args = (harness.state, harness.batch)  # traced before the first run donates the state

    def advance():
        harness.state, metrics = compiled(harness.state, harness.batch)
        return metrics

    name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
    return measure(name, batch_size, harness.step, args, advance, mfu.step_flops(compiled))


def reference_row(batch_size: int) -> dict:
    step, optimizer = clip_reference.make_step("vlp_jax")
    params = clip_reference.init_params()
    holder = {"params": params, "opt": optimizer.init(params)}
    batch = jax.device_put(clip_reference.random_batch(batch_size))
    args = (holder["params"], holder["opt"], batch)
    compiled = step.lower(*args).compile()

    def advance():
        holder["params"], holder["opt"], loss = compiled(holder["params"], holder["opt"], batch)
        return loss

    return measure("clip_vlp_jax", batch_size, step, args, advance, mfu.step_flops(compiled))


def main(argv):
    del argv
    config = FLAGS.config.copy_and_resolve_references()
    runtime.set_cpu_devices(config)
    peaks = [mfu.measure_matmul_peak()]
    rows = []
    for b in (int(b) for b in FLAGS.batch_sizes.split(",")):
        rows.append(config_row(config, b))
        if FLAGS.reference:
            rows.append(reference_row(b))
        peaks.append(mfu.measure_matmul_peak())
    peak = max(peaks)
    for r in rows:
        r["step_mfu"] = r["step_gflops"] / r["step_ms"] * 1e3 / (peak / 1e9)
        r["ceiling_mfu"] = r["step_gflops"] / r["dots_ms"] * 1e3 / (peak / 1e9)
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s (highest of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}); allocator "
          f"{allocator.active_allocator()}; medians of {FLAGS.steps} alternating runs")
    print(f"{'model':>14} {'batch':>6} {'GFLOP':>7} {'in dots':>8} {'step ms':>8} {'MFU':>6} "
          f"{'dots ms':>8} {'ceiling':>8}")
    for r in rows:
        print(f"{r['model']:>14} {r['batch_size']:>6} {r['step_gflops']:>7.1f} "
              f"{r['dot_gflops'] / r['step_gflops']:>7.1%} {r['step_ms']:>8.0f} "
              f"{r['step_mfu']:>6.1%} {r['dots_ms']:>8.0f} {r['ceiling_mfu']:>8.1%}")
    for r in rows:
        if "kernels" not in r:
            continue
        print(f"\n{r['model']}, batch {r['batch_size']}: slowest matmul kernels, each alone "
              f"({r['dot_count']} dots)")
        print(f"{'ms':>7} {'GFLOP/s':>8} {'count':>5}  lhs x rhs  (contract; batch)")
        for k in r["kernels"][:FLAGS.top]:
            print(f"{k['ms']:>7.1f} {k['gflops_per_s']:>8.0f} {k['count']:>5}  {k['lhs']} x "
                  f"{k['rhs']}  ({k['contract']}; {k['batch']})")
    atomic_io.write_json(FLAGS.out, {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "devices": jax.device_count(), "cpu_count": os.cpu_count(),
        "allocator": allocator.active_allocator(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_peak_gflops": peak / 1e9, "matmul_peaks_gflops": [p / 1e9 for p in peaks],
        "rows": rows,
    })


if __name__ == "__main__":
    app.run(main)
