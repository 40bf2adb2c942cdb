"""Train-step throughput and MFU of a config at several batch sizes.

MFU = (FLOPs of one compiled train step, from XLA's cost analysis) / (step time) / (matmul peak
measured on this machine in the same run: the highest of a measurement before every batch size
and one at the end; ``vlp_jax/perf/mfu.py``).  ``benchmarks/mfu_ceiling.py`` gives the highest MFU
the step's matmuls alone reach on the machine.  Like ``make train``, the script re-executes
itself under a caching malloc when one is installed (``vlp_jax/runtime/allocator.py``;
``VLP_ALLOCATOR=system`` for glibc), and records which one in the JSON.
``benchmarks/torch_clip_reference.py`` times the same reference model in PyTorch eager
(open_clip's way) for the comparison issue #8 asks for.

Beside the config it also times ``benchmarks/clip_reference.py``: a straightforward plain-JAX
CLIP step at the open_clip size issue #8 compares against (9.6M params), so changes to our
model code can be judged against a fixed yardstick measured in the same run — and the same CLIP
model in the project's formulation (``clip_vlp_jax`` rows: identical loss and gradients), the
number to hold against PyTorch eager on that model.

    python benchmarks/train_throughput.py --config=configs/base.py --batch_sizes=64,128,256

Prints a table and writes ``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__":  # as `make train` does: step time depends on it (runtime/allocator.py)
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

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to benchmark.")
flags.DEFINE_string("batch_sizes", "64,128,256", "Comma-separated global batch sizes.")
flags.DEFINE_integer("steps", 10, "Timed steps per batch size (after 2 warm-up steps).")
flags.DEFINE_integer("vocab_size", 4000, "Vocabulary size (the built-in catalog's default).")
flags.DEFINE_string("out", "benchmarks/results/train_throughput.json", "JSON output path.")
flags.DEFINE_bool("reference", True, "Also time the CLIP reference step, plain and vlp_jax.")
FLAGS = flags.FLAGS


def _time_steps(run_step, steps: int) -> list[float]:
    """Seconds of each of ``steps`` timed steps (after 2 warm-up steps), each waited for.

    Rows report the median: this VM's throughput drifts and stalls for whole steps at a time
    (±10-15 % between runs), and the median is the statistic that noise moves least.  The mean
    is kept in the JSON beside it.  Waiting for each step costs well under 1 ms of dispatch.
    """
    for _ in range(2):
        jax.block_until_ready(run_step())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(run_step())
        times.append(time.perf_counter() - t)
    return times


def _row(model: str, batch_size: int, params: int, times: list[float], flops: float) -> dict:
    """One table row (median step time); ``mfu`` is added once the run's highest peak is known."""
    dt = float(np.median(times))
    return {
        "model": model, "batch_size": batch_size, "params": params, "ms_per_step": dt * 1e3,
        "ms_per_step_mean": float(np.mean(times)) * 1e3,
        "ms_per_step_all": [t * 1e3 for t in times],
        "examples_per_sec": batch_size / dt, "step_gflops": flops / 1e9,
    }


def bench_reference(batch_size: int, steps: int, formulation: str = "plain") -> dict:
    """The CLIP reference step (benchmarks/clip_reference.py) at ``batch_size``."""
    step, optimizer = clip_reference.make_step(formulation)
    params = clip_reference.init_params()
    count = clip_reference.param_count(params)
    holder = {"params": params, "opt": optimizer.init(params)}
    batch = jax.device_put(clip_reference.random_batch(batch_size))
    flops = mfu.step_flops(step.lower(holder["params"], holder["opt"], batch).compile())

    def run_step():
        holder["params"], holder["opt"], loss = step(holder["params"], holder["opt"], batch)
        return loss

    name = "clip_reference" if formulation == "plain" else f"clip_{formulation}"
    return _row(name, batch_size, count, _time_steps(run_step, steps), flops)


def bench_one(config, batch_size: int, steps: int, vocab: int) -> dict:
    harness = step_harness.build(config, batch_size, vocab)
    flops = mfu.step_flops(harness.lower().compile(), harness.mesh.size)

    def run_step():
        harness.state, metrics = harness.step(harness.state, harness.batch)
        return metrics

    name = os.path.basename(config_flags.get_config_filename(FLAGS["config"]))
    return _row(name, batch_size, harness.param_count(), _time_steps(run_step, steps), flops)


def main(argv):
    del argv
    config = FLAGS.config
    # The device layout `python -m vlp_jax.main` would pick (train.cpu_devices; with 0, one CPU
    # device per core dividing every benchmarked batch), before anything starts JAX's backend.
    sizing = config.copy_and_resolve_references()
    sizing.train.batch_size = math.gcd(*(int(b) for b in FLAGS.batch_sizes.split(",")))
    runtime.set_cpu_devices(sizing)
    # This VM's clock (and so its peak) drifts by up to ~15 % over minutes: the peak is measured
    # before every batch size and at the end, and the MFU of every row uses the highest.
    peaks = [mfu.measure_matmul_peak()]
    rows = []
    for b in FLAGS.batch_sizes.split(","):
        rows.append(bench_one(config, int(b), FLAGS.steps, FLAGS.vocab_size))
        if FLAGS.reference:
            for formulation in clip_reference.FORMULATIONS:
                rows.append(bench_reference(int(b), FLAGS.steps, formulation))
        peaks.append(mfu.measure_matmul_peak())
    peak = max(peaks)
    for r in rows:
        r["mfu"] = r["step_gflops"] * 1e9 / (r["ms_per_step"] / 1e3) / peak
    print(f"\nmatmul peak: {peak / 1e9:.1f} GFLOP/s, highest of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}  ({jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s), {os.cpu_count()} cores, "
          f"allocator {allocator.active_allocator()})")
    print(f"{'model':>16} {'params':>10} {'batch':>6} {'ms/step':>9} {'(mean)':>8} {'ex/s':>8} "
          f"{'GFLOP/step':>11} {'MFU':>6}")
    for r in rows:
        print(f"{r['model']:>16} {r['params']:>10,} {r['batch_size']:>6} {r['ms_per_step']:>9.1f} "
              f"{r['ms_per_step_mean']:>8.1f} {r['examples_per_sec']:>8.1f} "
              f"{r['step_gflops']:>11.2f} {r['mfu'] * 100:>5.1f}%")
    result = {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "platform": platform.platform(), "backend": jax.devices()[0].platform,
        "devices": jax.device_count(), "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": allocator.active_allocator(),
        "matmul_peak_gflops": peak / 1e9, "matmul_peaks_gflops": [p / 1e9 for p in peaks],
        "rows": rows,
    }
    atomic_io.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
