"""Peak memory of one train step: remat on/off and GradCache accumulation at a fixed global batch.

For every (global batch, ``model.remat``, ``train.accum_steps``) combination the real train
step (``train_step.make_train_step``: loss, grads, AdamW update, state donated) is compiled for
the config and measured two ways:

* **XLA** — ``compiled.memory_analysis()`` of the step: ``temp`` (activations and other
  scratch buffers live during the step), ``argument`` (state + batch), ``output`` (new state +
  metrics) and ``alias`` (outputs written in place of donated arguments).  The step's peak is
  ``argument + output - alias + temp``; ``temp`` is the part remat and accumulation act on.
* **RSS** (``--rss``, default on) — each combination runs in its own subprocess: after the
  compile, freed heap is returned to the OS (``malloc_trim``), then the resident set size is
  sampled every millisecond while ``--steps`` steps run.  ``rss_step_peak - rss_before`` is the
  memory the steps really added on top of the live state; ``ru_maxrss`` (whole process, compile
  included) is reported too, with wall and process-CPU time per step (CPU time is the
  steadier figure on a shared machine).

    python benchmarks/memory.py --config=configs/base.py --batch_sizes=128,256

Prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.perf import step_harness
from vlp_jax.runtime import atomic_io  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to measure.")
flags.DEFINE_string("batch_sizes", "128,256", "Comma-separated global batch sizes.")
flags.DEFINE_string("remat", "none,block", "model.remat values to try.")
flags.DEFINE_string("accum_steps", "1,2,4", "train.accum_steps values (same global batch).")
flags.DEFINE_integer("steps", 3, "Steps run (after one warm-up) while RSS is sampled.")
flags.DEFINE_integer("vocab_size", 0, "Vocabulary size; 0 = config.data.vocab_size.")
flags.DEFINE_bool("rss", True, "Measure process RSS, one subprocess per combination.")
flags.DEFINE_string("child", "", "Internal: 'batch,remat,accum' to measure in this process.")
flags.DEFINE_string("out", "benchmarks/results/memory.json", "JSON output path.")
FLAGS = flags.FLAGS

MB = 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Max RSS seen by a background thread polling /proc/self/statm every ``period`` s."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS ≈ live memory before the steps."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(config, batch_size: int, remat: str, accum: int, vocab: int, steps: int,
            rss: bool) -> dict:
    """Compile the train step for one combination; XLA memory analysis (+ RSS when ``rss``)."""
    config = config.copy_and_resolve_references()
    config.model.remat = remat
    config.train.accum_steps = accum
    harness = step_harness.build(config, batch_size, vocab)
    state, batch = harness.state, harness.batch
    t0 = time.perf_counter()
    compiled = harness.lower().compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {
        "batch_size": batch_size, "remat": remat, "accum_steps": accum,
        "micro_batch": batch_size // accum, "compile_s": round(compile_s, 1),
    }
    for name in ("temp", "argument", "output", "alias", "generated_code"):
        row[f"xla_{name}_bytes"] = int(getattr(mem, f"{name}_size_in_bytes", 0))
    row["xla_peak_bytes"] = (row["xla_argument_bytes"] + row["xla_output_bytes"]
                             - row["xla_alias_bytes"] + row["xla_temp_bytes"])
    if not rss:
        return row
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    _trim_heap()
    before = _rss_bytes()
    with RssSampler() as sampler:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
        cpu_s = (time.process_time() - c0) / steps
    row.update(
        rss_before_bytes=before, rss_step_peak_bytes=sampler.peak,
        rss_step_added_bytes=sampler.peak - before,
        ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ms_per_step=round(step_s * 1e3, 1), cpu_ms_per_step=round(cpu_s * 1e3, 1),
        loss=float(metrics["loss"]),
    )
    return row


def _run_child(combo: tuple[int, str, int]) -> dict:
    """One combination in a fresh process (RSS of one configuration only)."""
    batch, remat, accum = combo
    argv = [sys.executable, os.path.abspath(__file__), f"--child={batch},{remat},{accum}",
            f"--config={config_flags.get_config_filename(FLAGS['config'])}",
            f"--steps={FLAGS.steps}", f"--vocab_size={FLAGS.vocab_size}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"child {combo} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        title = (f"{'batch':>5} {'remat':>5} {'accum':>5} {'micro':>5} {'XLA temp':>9} "
                 f"{'XLA peak':>9} {'RSS +step':>9} {'RSS max':>8} {'ms/step':>8} "
                 f"{'CPU ms':>7}")
        print(title)
        print("-" * len(title))
    for r in rows:
        rss = (f"{r['rss_step_added_bytes'] / MB:>7.0f}MB {r['ru_maxrss_bytes'] / MB:>6.0f}MB "
               f"{r['ms_per_step']:>8.0f} {r['cpu_ms_per_step']:>7.0f}"
               if "rss_step_added_bytes" in r else "")
        print(f"{r['batch_size']:>5} {r['remat']:>5} {r['accum_steps']:>5} {r['micro_batch']:>5} "
              f"{r['xla_temp_bytes'] / MB:>7.1f}MB {r['xla_peak_bytes'] / MB:>7.1f}MB {rss}",
              flush=True)


def main(argv):
    del argv
    config = FLAGS.config
    vocab = FLAGS.vocab_size or config.data.vocab_size
    if FLAGS.child:
        batch, remat, accum = FLAGS.child.split(",")
        row = measure(config, int(batch), remat, int(accum), vocab, FLAGS.steps, rss=True)
        print(json.dumps(row))
        return
    combos = list(itertools.product(
        [int(x) for x in FLAGS.batch_sizes.split(",")], FLAGS.remat.split(","),
        [int(x) for x in FLAGS.accum_steps.split(",")],
    ))
    rows = []
    for combo in combos:
        if FLAGS.rss:
            rows.append(_run_child(combo))
        else:
            rows.append(measure(config, *combo, vocab, FLAGS.steps, rss=False))
        _print_table(rows[-1:], header=len(rows) == 1)
    print()
    _print_table(rows)
    result = {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "vocab_size": vocab,
        "platform": platform.platform(), "backend": jax.devices()[0].platform,
        "devices": jax.device_count(), "cpu_count": os.cpu_count(),
        "peak_definition": "xla_peak = argument + output - alias + temp (compiled train step); "
                           "rss_step_added = max sampled RSS during the steps - RSS before them",
        "rows": rows,
    }
    atomic_io.write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
