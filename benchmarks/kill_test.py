"""Kill experiment: SIGKILL a tiny training run N times at random moments, finish it, compare.

    python benchmarks/kill_test.py [--kills=5 --seed=0 --steps=30 --workdir=/tmp/vlp_kill]

1. A reference run (``python -m vlp_jax.main``, tiny config with memory bank, EMA tower and
   dropout, async checkpoints) goes uninterrupted and checkpoints *every* step, so any step can
   be compared with it (the checkpoint period is not part of the compiled program).
2. The same command on another workdir (checkpoint every 3 steps, keep 3) is SIGKILLed
   ``--kills`` times: odd kills at a random moment (a random step, then a random fraction of a
   step), even kills the moment an async checkpoint write is seen in flight (its tmp directory
   exists).  Each rerun must resume from the newest complete checkpoint, and that checkpoint
   must equal the reference's at the same step, bit for bit (params, Adam moments, bank, EMA).
3. One more rerun is sent SIGTERM: it must save the current step and exit 0.
4. A last rerun finishes; its final state and every step's metrics must equal the reference's.

Writes ``benchmarks/results/kill_test.json``; exits 1 if any comparison fails.  Every run is
bounded by ``--timeout`` seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("kills", 5, "Number of SIGKILLs.")
flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
flags.DEFINE_integer("steps", 30, "Training steps of the run.")
flags.DEFINE_string("workdir", "/tmp/vlp_kill_test", "Scratch directory (wiped).")
flags.DEFINE_string("cache_dir", "", "data.cache_dir ('' = default cache).")
flags.DEFINE_float("timeout", 900.0, "Upper bound on each run (s).")
flags.DEFINE_string("out", "benchmarks/results/kill_test.json", "JSON output path.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("steps_per_sec", "examples_per_sec")


def _flags(steps: int, every: int, keep: int) -> list[str]:
    overrides = {
        "data.builtin_num_items": 300, "data.vocab_size": 800, "data.prefetch": 1,
        "train.batch_size": 16, "train.num_steps": steps, "train.warmup_steps": 2,
        "train.log_every_steps": 1, "train.mesh_shape": "1", "checkpoint.every_steps": every,
        "checkpoint.keep": keep, "eval.batch_size": 64, "eval.max_queries": 64,
        "negatives.bank_size": 32, "negatives.bank_warmup_steps": 2, "negatives.momentum": 0.5,
        "model.dropout": 0.1,
    }
    if FLAGS.cache_dir:
        overrides["data.cache_dir"] = FLAGS.cache_dir
    return ["--config=configs/tiny.py", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _start(workdir: str, flag_list: list[str]) -> tuple[subprocess.Popen, str]:
    name = f"{os.path.basename(workdir)}_{time.time():.3f}.log"
    log = os.path.join(os.path.dirname(workdir), name)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlp_jax.main", f"--workdir={workdir}", *flag_list],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
        )
    return proc, log


def _rows(workdir: str) -> dict[int, dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = {}
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r:
            rows[r["step"]] = {k: v for k, v in r.items() if k not in TIMING}
    return rows


def _steps(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return os.listdir(d) if os.path.isdir(d) else []


def _complete(workdir: str) -> list[int]:
    return sorted(int(n) for n in _steps(workdir) if n.isdigit())


def _owner(workdir: str) -> int | None:
    try:
        return json.load(open(os.path.join(workdir, "train.lock")))["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _wait(predicate, proc: subprocess.Popen, deadline: float, poll: float = 0.002) -> bool:
    """Wait for ``predicate``; False if the run ended (or the deadline passed) first."""
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def _state(workdir: str, step: int):
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return restored["state"]


def _identical(dir_a: str, dir_b: str, step: int) -> bool:
    import jax
    import numpy as np

    a, b = _state(dir_a, step), _state(dir_b, step)
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.array_equal(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _resumed_from(log: str) -> int:
    text = open(log).read()
    marker = "resuming from step "
    return int(text.split(marker)[1].split()[0]) if marker in text else 0


def _interrupt(i: int, mode: str, ref: str, run: str, run_flags: list[str],
               rng: random.Random) -> dict:
    """Start the run, wait for a random step (and a save in flight for ``mid_save``), signal."""
    steps = FLAGS.steps
    # The checkpoint this run must resume from: compared with the reference before the run
    # starts (it may be rotated away by keep=3 later).
    start = max(_complete(run), default=0)
    identical = start == 0 or _identical(ref, run, start)
    proc, log = _start(run, run_flags)
    deadline = time.monotonic() + FLAGS.timeout
    if not _wait(lambda: _owner(run) == proc.pid, proc, deadline):
        raise SystemExit(f"run {i} did not start: see {log}")
    target = rng.randint(start + 1, max(start + 1, steps - 3))
    # After "resuming from step" the run drops the killed run's later metrics rows within
    # milliseconds (its first new row takes a compile), so rows >= target are its own.
    _wait(lambda: _resumed_from(log) == start, proc, deadline, poll=0.01)
    time.sleep(0.2)
    _wait(lambda: max(_rows(run), default=0) >= target, proc, deadline, poll=0.01)
    if mode == "mid_save":
        _wait(lambda: any("tmp" in n for n in _steps(run)), proc, deadline)
    elif mode == "random":
        time.sleep(rng.uniform(0.0, 0.5))
    if proc.poll() is not None:
        raise SystemExit(f"run {i} finished before it could be interrupted: see {log}")
    in_flight = [n for n in _steps(run) if "tmp" in n]
    at_step = max(_rows(run), default=0)
    proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
    rc = proc.wait(timeout=FLAGS.timeout)
    event = {"run": i, "signal": "SIGTERM" if mode == "sigterm" else "SIGKILL", "mode": mode,
             "resumed_from": _resumed_from(log), "resume_identical": identical
             and _resumed_from(log) == start,
             "last_logged_step_at_signal": at_step, "save_in_flight": in_flight,
             "newest_complete_after": max(_complete(run), default=0), "exit_code": rc}
    if mode == "sigterm":
        text = open(log).read()
        event["clean_exit"] = rc == 0 and "preemption: SIGTERM received" in text
    return event


def main(argv):
    del argv
    rng = random.Random(FLAGS.seed)
    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    os.makedirs(FLAGS.workdir)
    ref, run = os.path.join(FLAGS.workdir, "reference"), os.path.join(FLAGS.workdir, "killed")
    steps = FLAGS.steps

    t0 = time.monotonic()
    proc, _ = _start(ref, _flags(steps, every=1, keep=steps))
    if proc.wait(timeout=FLAGS.timeout) != 0:
        raise SystemExit("reference run failed")
    print(f"reference run: {time.monotonic() - t0:.0f}s")

    events, failures = [], []
    run_flags = _flags(steps, every=3, keep=3)
    for i in range(FLAGS.kills + 1):  # N kills, then one SIGTERM
        mode = "sigterm" if i == FLAGS.kills else ("mid_save" if i % 2 else "random")
        event = _interrupt(i, mode, ref, run, run_flags, rng)
        if not event["resume_identical"] or (mode == "sigterm" and not event["clean_exit"]):
            failures.append(event)
        events.append(event)
        print(json.dumps(event))

    start = max(_complete(run), default=0)
    resume_ok = _identical(ref, run, start)
    proc, log = _start(run, run_flags)
    rc = proc.wait(timeout=FLAGS.timeout)
    resumed = _resumed_from(log)
    resume_ok = resume_ok and resumed == start
    final_ok = rc == 0 and _identical(ref, run, steps)
    rows_ok = _rows(ref) == _rows(run)
    summary = {
        "kills": FLAGS.kills, "seed": FLAGS.seed, "steps": steps,
        "kills_with_save_in_flight": sum(bool(e["save_in_flight"]) for e in events[:-1]),
        # runs 1..N each resumed after a SIGKILL; the final run resumed after the SIGTERM
        "resumes_after_kill": len(events[1:]),
        "bit_identical_resumes_after_kill": sum(e["resume_identical"] for e in events[1:]),
        "final_run": {"resumed_from": resumed, "resume_identical": resume_ok, "exit_code": rc,
                      "final_state_identical": final_ok, "metrics_identical": rows_ok},
        "events": events,
        "wall_seconds": round(time.monotonic() - t0, 1),
    }
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=1))
    if failures or not (resume_ok and final_ok and rows_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
