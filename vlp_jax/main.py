"""Entry point: ``python -m vlp_jax.main --config=configs/base.py --workdir=DIR``.

Thin on purpose: flags → ``train.train_and_evaluate``; all logic is importable and tested.
Faults a user can act on end with one clear message and a distinct exit status instead of a
traceback: 0 = finished or preempted (checkpoint saved; rerun to resume), 3 = non-finite loss,
4 = workdir in use, 5 = checkpoint unusable or incompatible with the config, 6 = disk full,
7 = dataset build damaged, 8 = another process of a multi-process run is gone, 9 = storage
unusable or a checkpoint save past its deadline (docs/reliability.md).
"""

import os

if __name__ == "__main__":  # first, before 4 s of imports: re-exec under a caching malloc
    from vlp_jax.runtime import allocator

    allocator.reexec_with_fast_allocator()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlp_jax.parallel import mesh as mesh_lib  # noqa: E402
from vlp_jax.runtime import allocator, peers  # noqa: E402
from vlp_jax.runtime import devices as runtime  # noqa: E402
from vlp_jax.train import exit_status, export_checkpoint  # noqa: E402
from vlp_jax.train import loop as train  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: python, get_config().")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval, export.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "export"],
                  "train (+ final eval), eval, or export (bundle of the latest checkpoint).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")
flags.DEFINE_float("peer_timeout", 60.0,
                   "Multi-process runs: seconds without a heartbeat after which another process "
                   "counts as dead and every process stops (exit 8).")
flags.DEFINE_bool("rebuild_data", False,
                  "Delete a damaged TFDS build (missing or truncated shard) and build it again.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    runtime.quiet_library_logs()
    logging.info("memory allocator: %s", allocator.active_allocator())
    runtime.enable_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))
    if runtime.skip_absent_tpu():
        logging.info("libtpu installed but no TPU chip on this host: running on the CPU")
    if not FLAGS.num_processes:  # multi-process launchers set their own device counts
        count = runtime.set_cpu_devices(FLAGS.config)
        if count:
            logging.info("CPU backend: %d device(s) (train.cpu_devices)", count)
    mesh_lib.maybe_initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        **peers.jax_timeouts(FLAGS.peer_timeout),
    )
    watchdog = peers.start_watchdog(FLAGS.peer_timeout, FLAGS.coordinator_address)
    exit_status.run_or_exit(_run_mode, watchdog)


def _run_mode() -> None:
    if FLAGS.mode == "eval":
        train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, rebuild_data=FLAGS.rebuild_data)
    elif FLAGS.mode == "export":
        export_checkpoint.export_from_checkpoint(FLAGS.config, FLAGS.workdir,
                                                 rebuild_data=FLAGS.rebuild_data)
    else:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, rebuild_data=FLAGS.rebuild_data)


if __name__ == "__main__":
    app.run(main)
