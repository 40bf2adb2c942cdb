"""``python -m vlp_jax.aot --config=configs/paper_scale.py --topology=v5e:16x16``

Compiles the run's train step, its evaluation encoders and the serving towers for a TPU
topology on a machine without TPUs (libtpu's compile-only devices: ``pip install -e
".[tpu]"``) and prints, per device, memory against the chip's HBM, the collectives in the
compiled programs and estimated step times (docs/aot.md).  Nothing is allocated or executed.
Exit status: 0 = every program compiled and fits, 1 = a program does not fit, 2 = bad input
(the message names the config field or flag to change).
"""

from __future__ import annotations

import os

# This process only ever *runs* on the CPU: libtpu is loaded for its compiler, and without
# JAX_PLATFORMS JAX would also probe it for TPU chips at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlp_jax.aot import report, topology  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: python, get_config().")
flags.DEFINE_string("topology", None, "TPU topology, GENERATION:AxB[xC], e.g. v5e:16x16.")
flags.DEFINE_list("programs", ["train", "eval", "serve"],
                  "Programs to compile: train (the train step), eval (item/query encoders at "
                  "eval.batch_size), serve (the serving towers on one chip).")
flags.DEFINE_integer("vocab_size", 0, "Token vocabulary size (0 = data.vocab_size); set it "
                     "when data.tokenizer names a tokenizer of another size.")
flags.DEFINE_integer("serve_batch", 128, "Rows per serving call (the bundle's largest bucket).")
flags.DEFINE_string("out", "", "Write the full report as JSON to this file.")
flags.DEFINE_string("hlo_dir", "", "Write each compiled program's HLO text here.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        result = report.build_report(
            FLAGS.config, FLAGS.topology, programs=tuple(FLAGS.programs),
            vocab_size=FLAGS.vocab_size, serve_batch=FLAGS.serve_batch, hlo_dir=FLAGS.hlo_dir)
    except (ValueError, topology.TopologyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.out:  # first: a closed stdout (a killed parent) must not lose the compile
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    print(report.format_report(result))
    if not all(p.get("fits", False) for p in result["programs"]):
        print(report.advice(result), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
