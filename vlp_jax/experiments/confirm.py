"""Test-split confirmation of declared claims: evaluate selected checkpoints on ``test``, once.

Training runs of a protocol grid evaluate on ``valid`` only (``eval.split = "valid"``), so the
test split stays unseen while steps, weights and options are selected.  ``--confirm`` then
evaluates the final checkpoint of the selected candidate and of the baseline, every seed, on
``test`` into ``<run>/eval_test/recall.json`` (per-query hits included), in a subprocess with the
same fake device count as training:

    python -m vlp_jax.experiments.confirm --run_dir=R --base_config=configs/base.py \
        --overrides_json='{"train.seed": 0, ...}'

"Once" is enforced by ``DIR/confirm.json``: it records, per claim, the selection that was
confirmed; a later ``--confirm`` whose selection differs (new runs changed the valid ranking) is
refused instead of quietly confirming a second choice on the same test split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from vlp_jax.experiments import protocol, stamps
from vlp_jax.runtime import atomic_io

RECORD = "confirm.json"


class AlreadyConfirmed(RuntimeError):
    """The claim was confirmed on test with another selection: test may be used only once."""


def read_record(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, RECORD)
    if not os.path.isfile(path):
        return {"claims": {}}
    with open(path) as f:
        return json.load(f)


def check_once(record: dict[str, Any], selection: dict[str, Any]) -> bool:
    """True if the claim still needs its confirmation; raises if it was confirmed otherwise."""
    done = record["claims"].get(selection["claim_id"])
    if done is None:
        return True
    if done["selected"] != selection["selected"]:
        raise AlreadyConfirmed(
            f"claim {selection['claim_id']} was confirmed on test at {done['at']['iso']} with "
            f"{done['selected']!r}; the valid selection is now {selection['selected']!r}. The "
            f"test split is used once per claim: declare a new claim to test the new choice.")
    return False


def mark_confirmed(workdir: str, record: dict[str, Any], selection: dict[str, Any]) -> None:
    record["claims"][selection["claim_id"]] = {
        "selected": selection["selected"], "valid_selection": selection["candidates"],
        "at": stamps.now(), **stamps.git_commit(), "machine": stamps.machine()}
    atomic_io.write_json(os.path.join(workdir, RECORD), record)


def eval_command(run_dir: str, base_config: str, overrides: dict[str, Any],
                 python: str = sys.executable) -> list[str]:
    return [python, "-m", "vlp_jax.experiments.confirm", f"--run_dir={run_dir}",
            f"--base_config={base_config}",
            f"--overrides_json={json.dumps(overrides, default=list)}"]


def run_eval(run_dir: str, base_config: str, overrides: dict[str, Any], env: dict[str, str]
             ) -> None:
    """Evaluate one run's checkpoint on test (subprocess; output to ``eval_test.log``)."""
    with open(os.path.join(run_dir, "eval_test.log"), "ab") as log:
        rc = subprocess.call(eval_command(run_dir, base_config, overrides), stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise RuntimeError(f"test evaluation of {run_dir} exited with {rc}; see eval_test.log")


def is_confirmed(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, protocol.TEST_DIR, "recall.json"))


def confirm_runs(jobs: Sequence[Any], selection: dict[str, Any], claim: protocol.Declared,
                 evaluate: Any) -> list[Any]:
    """Evaluate (with ``evaluate(job)``) every unconfirmed run of the selected candidate and
    the baseline; returns the jobs evaluated now."""
    sides = (selection["selected"], claim.baseline)
    todo = [j for j in jobs if j.variant in sides and not is_confirmed(j.run_dir)]
    for job in todo:
        evaluate(job)
    return todo


# ------------------------------------------------------------------------------ subprocess
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined only when run as a program: ``ablate`` imports this module and has its own."""
    flags.DEFINE_string("run_dir", None, "Finished training run to evaluate on test.")
    flags.DEFINE_string("base_config", "configs/base.py", "Config file of the grid.")
    flags.DEFINE_string("overrides_json", "{}", "The run's overrides (JSON object).")
    flags.mark_flag_as_required("run_dir")


def main(argv: Sequence[str]) -> None:
    del argv
    from vlp_jax.config.overrides import apply_overrides, load_config_file
    from vlp_jax.train import loop

    overrides = json.loads(FLAGS.overrides_json)
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    config = apply_overrides(load_config_file(FLAGS.base_config),
                             {**overrides, "eval.split": protocol.CONFIRM_SPLIT})
    run = loop.Run(config, FLAGS.run_dir)
    try:
        step = run.restore_latest(check_config=False)
    finally:
        run.checkpointer.close()
    if not step:
        raise FileNotFoundError(f"no checkpoint in {FLAGS.run_dir}")
    results = run.evaluate(int(step), os.path.join(FLAGS.run_dir, protocol.TEST_DIR))
    print(json.dumps(results["overall"]))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
