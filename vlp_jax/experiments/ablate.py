"""Multi-seed ablation harness: ``python -m vlp_jax.experiments.ablate --grid=paper --seeds=3
--workdir=DIR``.

Every (variant, seed) of a declared grid (``grids.py``) is one ordinary training run,
``python -m vlp_jax.main --config=BASE --workdir=DIR/runs/<variant>/seed<k> --config.X=...``, in
its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that cross-device
negatives have 8 (fake) devices on a CPU box. Subprocesses, not in-process calls, because the
device count is fixed at JAX start-up and a crashed run must not take the grid down.

Resumable by construction: a run whose ``eval/recall.json`` exists is skipped; an unfinished run is
started again with the same command and ``vlp_jax.main`` resumes it from its latest checkpoint.
Each run folder keeps ``ablate_run.json``: its overrides, start/end time and wall time per
attempt, and a provenance stamp (``stamps``: run id, folder, config hash, commit, machine,
results hash).  A folder started with *different* overrides, or whose stamp shows it was copied
or relabelled, is refused rather than silently mixed into the results (unless a declared claim
lists it as reused).  At the end (and with ``--report_only``) ``report.write_report`` writes
``DIR/results.json``, ``DIR/RESULTS.md`` and ``DIR/recall_bars.png``.

Grids of ``declared`` follow the reviewer's protocol (``protocol``): training evaluates on
``valid``; ``--confirm`` then evaluates the valid-selected candidate and the baseline on
``test``, once per claim (``confirm``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from vlp_jax.config.overrides import apply_overrides, load_config_file, parse_set_flags
from vlp_jax.experiments import confirm, declared, grids, protocol, stamps
from vlp_jax.experiments import report as report_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("grid", "paper", "Declared grid: one of "
                    f"{sorted([*grids.GRIDS, *declared.DECLARED])}.")
flags.DEFINE_integer("seeds", 3, "Seeds per variant (train.seed = 0 .. seeds-1).")
flags.DEFINE_string("workdir", None, "Output folder: runs/, results.json, RESULTS.md, chart.")
flags.DEFINE_string("base_config", "configs/base.py", "Config file every variant overrides.")
flags.DEFINE_list("variants", [], "Only these variants of the grid (default: all).")
flags.DEFINE_multi_string("set", [], "Extra override for every run, KEY=VALUE, e.g. "
                          "--set=train.num_steps=600 (repeatable).")
flags.DEFINE_integer("devices", 8, "Fake CPU devices per run (same for every variant).")
flags.DEFINE_bool("report_only", False, "Only (re)write the report from finished runs.")
flags.DEFINE_string("notes", "", "Markdown file appended to RESULTS.md (default: DIR/NOTES.md).")
flags.DEFINE_bool("confirm", False, "Protocol grids: evaluate the valid-selected candidate and "
                  "the baseline of every declared claim on test, once (DIR/confirm.json).")

RUN_META = "ablate_run.json"
Runner = Callable[["RunJob"], None]


class RunFailed(RuntimeError):
    """A training subprocess exited non-zero; the message names the run and its log."""


@dataclasses.dataclass(frozen=True)
class RunJob:
    """One training run of the grid."""

    variant: str
    seed: int
    run_dir: str
    overrides: dict[str, Any]  # common + variant + extra + seed (everything that differs)
    base_config: str


# ------------------------------------------------------------------------ config overrides
def format_override(key: str, value: Any) -> str:
    """One ``--config.KEY=VALUE`` flag as ``ml_collections.config_flags`` parses it."""
    if isinstance(value, tuple | list):
        text = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    else:
        text = str(value)
    return f"--config.{key}={text}"


def build_command(job: RunJob, python: str = sys.executable) -> list[str]:
    """The exact training command of one run."""
    return [python, "-m", "vlp_jax.main", f"--config={job.base_config}",
            f"--workdir={job.run_dir}", *(format_override(k, v) for k, v in job.overrides.items())]


def xla_env(devices: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` with the fake CPU device count set to ``devices`` (other XLA flags kept)."""
    env = dict(os.environ if environ is None else environ)
    flags_ = [f for f in env.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags_, f"--xla_force_host_platform_device_count={devices}"])
    return env


def subprocess_runner(devices: int = 8) -> Runner:
    """Runs each job as ``python -m vlp_jax.main ...``, output to ``<run_dir>/train.log``."""

    def run(job: RunJob) -> None:
        os.makedirs(job.run_dir, exist_ok=True)
        log_path = os.path.join(job.run_dir, "train.log")
        with open(log_path, "ab") as log:
            rc = subprocess.call(build_command(job), stdout=log, stderr=subprocess.STDOUT,
                                 env=xla_env(devices))
        if rc != 0:
            with open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            raise RunFailed(f"{job.variant} seed {job.seed} exited with code {rc}; "
                            f"log {log_path}; last lines:\n{tail}")

    return run


# ------------------------------------------------------------------------ planning and running
def plan_runs(grid: grids.Grid, seeds: int, workdir: str, base_config: str,
              variants: Sequence[str] = (), extra: dict[str, Any] | None = None
              ) -> list[RunJob]:
    """Every (variant, seed) job, variant-major (all seeds of a variant before the next)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    chosen = [grid.variant(v) for v in variants] if variants else list(grid.variants)
    return [
        RunJob(v.name, s, os.path.join(workdir, "runs", v.name, f"seed{s}"),
               grids.run_overrides(grid, v, s, extra), base_config)
        for v in chosen for s in range(seeds)
    ]


def validate_jobs(jobs: Sequence[RunJob], base: ml_collections.ConfigDict) -> None:
    """Check every job's resolved config up front: a typo fails now, not after an hour."""
    from vlp_jax.config import check as config_check

    for job in jobs:
        try:
            config_check.validate_config(apply_overrides(base, job.overrides))
        except (KeyError, ValueError) as e:
            raise ValueError(f"variant {job.variant!r}: {e}") from e


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "eval", "recall.json"))


def read_meta(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, RUN_META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_meta(run_dir: str, meta: dict[str, Any]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, RUN_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(run_dir, RUN_META))


def _jsonable(overrides: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(overrides, default=str))


def check_consistent(job: RunJob) -> None:
    """Refuse a run folder that was started with other overrides (stale budget, other grid)."""
    meta = read_meta(job.run_dir)
    if meta is not None and meta.get("overrides") != _jsonable(job.overrides):
        raise ValueError(
            f"{job.run_dir} was started with different overrides ({meta.get('overrides')}); "
            f"now {_jsonable(job.overrides)}. Remove that folder or use another --workdir."
        )


def job_hashes(jobs: Sequence[RunJob], base: ml_collections.ConfigDict) -> dict[str, str]:
    """``{run_dir: config hash}`` of every job's fully resolved config."""
    return {j.run_dir: stamps.config_hash(apply_overrides(base, j.overrides)) for j in jobs}


def verify_stamps(jobs: Sequence[RunJob], hashes: dict[str, str], reused: Sequence[str] = (),
                  strict: bool = False) -> None:
    """Refuse folders whose stamp says copied, relabelled, or results swapped (``stamps``),
    and one run id in two folders, unless listed in ``reused`` ("variant/seedN").
    ``strict`` (protocol grids): an unstamped folder with a run in it is refused too."""
    metas = {protocol.label(j.variant, j.seed): read_meta(j.run_dir) for j in jobs}
    dups = stamps.duplicate_run_ids({k: (m or {}).get("stamp") for k, m in metas.items()})
    for job in jobs:
        tag = protocol.label(job.variant, job.seed)
        stamp = (metas[tag] or {}).get("stamp")
        if stamp is None and (not strict or not os.path.isdir(job.run_dir)):
            continue
        problems = stamps.check_run(stamp, job.run_dir, job.variant, job.seed,
                                    hashes[job.run_dir],
                                    os.path.join(job.run_dir, "eval", "recall.json"))
        problems += [f"same run id as {', '.join(dups[tag])}"] if tag in dups else []
        if problems and tag not in reused:
            raise ValueError(f"{job.run_dir} refused: {'; '.join(problems)}. Remove it, use "
                             f"another --workdir, or declare it reused in the claim.")


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _eta(pending: Sequence[RunJob], walls: dict[str, list[float]]) -> float | None:
    """Remaining time: each pending run costs its variant's mean wall time so far (else the
    mean over all variants); None before any run has finished."""
    everything = [w for ws in walls.values() for w in ws]
    if not everything:
        return None
    overall = sum(everything) / len(everything)
    return sum(sum(walls[j.variant]) / len(walls[j.variant]) if walls.get(j.variant) else overall
               for j in pending)


def _recall_line(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "eval", "recall.json")) as f:
            overall = json.load(f)["overall"]
        return " ".join(f"{k} {v:.3f}" for k, v in overall.items())
    except (OSError, KeyError, ValueError):
        return "no recall"


def run_grid(jobs: Sequence[RunJob], runner: Runner, log: Callable[[str], None] = print,
             hashes: dict[str, str] | None = None, stamp_fields: dict[str, Any] | None = None
             ) -> dict[str, list[RunJob]]:
    """Run every unfinished job; returns ``{"executed", "skipped", "failed"}`` job lists.

    A failing run is logged and the grid continues (its folder keeps the checkpoint, so the next
    invocation resumes it); the caller decides what failures mean.  With ``hashes``
    (``job_hashes``) a run's first start writes its provenance stamp and its end the hash of its
    results.
    """
    for job in jobs:
        check_consistent(job)
    done: dict[str, list[RunJob]] = {"executed": [], "skipped": [], "failed": []}
    walls: dict[str, list[float]] = {}
    for job in jobs:  # finished runs from earlier invocations inform the ETA too
        meta = read_meta(job.run_dir)
        if is_finished(job.run_dir) and meta and meta.get("attempts"):
            walls.setdefault(job.variant, []).append(sum(a["seconds"] for a in meta["attempts"]))
    todo = [j for j in jobs if not is_finished(j.run_dir)]
    done["skipped"] = [j for j in jobs if is_finished(j.run_dir)]
    log(f"ablate: {len(jobs)} runs, {len(done['skipped'])} already finished, {len(todo)} to run; "
        f"ETA {_fmt(_eta(todo, walls))}")
    start = time.perf_counter()
    for i, job in enumerate(todo):
        meta = read_meta(job.run_dir) or {"variant": job.variant, "seed": job.seed,
                                          "overrides": _jsonable(job.overrides), "attempts": []}
        if hashes is not None and "stamp" not in meta and not meta["attempts"]:  # new runs only
            meta["stamp"] = stamps.new_stamp(job.run_dir, job.variant, job.seed,
                                             hashes[job.run_dir], **(stamp_fields or {}))
            _write_meta(job.run_dir, meta)
        started = stamps.now()
        resumed = " (resuming)" if meta["attempts"] else ""
        log(f"[{i + 1}/{len(todo)}] {job.variant} seed {job.seed}: start{resumed} -> {job.run_dir}")
        t0 = time.perf_counter()
        status = "ok"
        try:
            runner(job)
            if not is_finished(job.run_dir):
                raise RunFailed(f"{job.variant} seed {job.seed} ended without eval/recall.json")
        except Exception as e:  # noqa: BLE001 - one bad run must not stop the grid
            status = f"failed: {type(e).__name__}"
            done["failed"].append(job)
            log(f"[{i + 1}/{len(todo)}] {job.variant} seed {job.seed}: FAILED: {e}")
        seconds = time.perf_counter() - t0
        meta["attempts"].append({"seconds": round(seconds, 2), "status": status,
                                 "started_at": started, "finished_at": stamps.now(),
                                 **stamps.git_commit(), "host": stamps.machine()["host"]})
        if status == "ok" and "stamp" in meta:
            meta["stamp"]["finished_at"] = meta["attempts"][-1]["finished_at"]
            meta["stamp"]["recall_sha256"] = stamps.file_sha256(
                os.path.join(job.run_dir, "eval", "recall.json"))
        _write_meta(job.run_dir, meta)
        if status == "ok":
            done["executed"].append(job)
            walls.setdefault(job.variant, []).append(sum(a["seconds"] for a in meta["attempts"]))
            log(f"[{i + 1}/{len(todo)}] {job.variant} seed {job.seed}: done in {_fmt(seconds)} "
                f"({_recall_line(job.run_dir)}) | elapsed {_fmt(time.perf_counter() - start)}, "
                f"ETA {_fmt(_eta(todo[i + 1:], walls))}")
    return done


# ------------------------------------------------------------------------ workdir lock
LOCK = ".ablate.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(workdir: str) -> str:
    """Claim ``workdir`` for this process: two harnesses on one folder would train the same run
    twice at once. A lock left by a dead process is taken over. Returns the lock path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and _alive(pid):
        raise RuntimeError(f"{workdir} is in use by ablate process {pid} (lock {path}); wait for "
                           f"it to finish, or delete the lock if that process is not an ablate run")
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    return path


def confirm_grid(pg: protocol.ProtocolGrid | None, grid: grids.Grid, jobs: Sequence[RunJob],
                 hashes: dict[str, str], workdir: str, devices: int,
                 log: Callable[[str], None] = print) -> None:
    """``--confirm``: per declared claim, the valid selection's and the baseline's test eval."""
    if pg is None:
        raise ValueError(f"--confirm needs a protocol grid ({sorted(declared.DECLARED)}); "
                         f"{grid.name!r} has no declared claims")
    runs = report_lib.collect_runs(grid, jobs, hashes)
    record = confirm.read_record(workdir)
    for claim in pg.claims:
        sel = protocol.select(claim, runs)
        if sel["selected"] is None:
            log(f"confirm {claim.claim_id}: selection on valid not complete "
                f"({claim.seeds} seeds of every candidate and the baseline needed)")
            continue
        if confirm.check_once(record, sel):
            side = [j for j in jobs if j.seed < claim.seeds]
            done = confirm.confirm_runs(side, sel, claim, lambda j: confirm.run_eval(
                j.run_dir, j.base_config, j.overrides, xla_env(devices)))
            confirm.mark_confirmed(workdir, record, sel)
            log(f"confirm {claim.claim_id}: {sel['selected']} vs {claim.baseline} on test "
                f"({len(done)} evaluations)")


# ------------------------------------------------------------------------ CLI
def grid_command(args: Sequence[str]) -> str:
    """The command that (re)produces the grid, for the report: report-only flags dropped."""
    keep = [a for a in args if not a.startswith(("--report_only", "--noreport_only", "--notes"))]
    return " ".join(["python -m vlp_jax.experiments.ablate", *keep])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or (FLAGS.confirm and FLAGS.report_only):
        raise app.UsageError("--workdir is required; --confirm cannot go with --report_only")
    grid, pg = declared.lookup(FLAGS.grid)
    base = load_config_file(FLAGS.base_config)
    extra = parse_set_flags(FLAGS.set)
    if pg is not None and pg.catalog:
        extra = {"data.catalog_dir": protocol.catalog_dir(pg.catalog, base.data.cache_dir),
                 **extra}
    jobs = plan_runs(grid, FLAGS.seeds, FLAGS.workdir, FLAGS.base_config, FLAGS.variants, extra)
    validate_jobs(jobs, base)
    hashes = job_hashes(jobs, base)
    reused = [r for c in (pg.claims if pg else ()) for r in c.reused]
    verify_stamps(jobs, hashes, reused, strict=pg is not None)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    failed: list[RunJob] = []
    if not FLAGS.report_only:
        if pg is not None and pg.catalog:
            protocol.ensure_catalog(pg.catalog, base.data.cache_dir)
        lock = acquire_lock(FLAGS.workdir)
        try:
            fields = {"grid": grid.name, "claims": {c.claim_id: protocol.claim_hash(c)
                                                    for c in (pg.claims if pg else ())}}
            failed = run_grid(jobs, subprocess_runner(FLAGS.devices), hashes=hashes,
                              stamp_fields=fields)["failed"]
            if FLAGS.confirm:
                confirm_grid(pg, grid, jobs, hashes, FLAGS.workdir, FLAGS.devices)
        finally:
            os.remove(lock)
    notes = FLAGS.notes or os.path.join(FLAGS.workdir, "NOTES.md")
    command = grid_command(sys.argv[1:])
    paths = report_lib.write_report(FLAGS.workdir, grid, jobs, command=command,
                                    notes_path=notes, devices=FLAGS.devices, hashes=hashes,
                                    protocol_grid=pg)
    print(f"ablate: wrote {', '.join(paths)}")
    if failed:
        names = ", ".join(f"{j.variant}/seed{j.seed}" for j in failed)
        sys.exit(f"ablate: {len(failed)} run(s) failed: {names} (rerun the command to resume)")


if __name__ == "__main__":
    app.run(main)
