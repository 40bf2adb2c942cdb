"""The ablation harness: micro grid end to end (in-process runner), resume, claim verdicts."""

import json
import os
import shutil

import pytest

from vlp_jax.experiments import ablate, grids, report


# ----------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize(
    "a, b, verdict",
    [
        ([0.70, 0.72, 0.74], [0.50, 0.52, 0.54], report.REPRODUCED),  # gap 0.2 > 0.02 + 0.02
        ([0.50, 0.52, 0.54], [0.70, 0.72, 0.74], report.NOT_REPRODUCED),
        ([0.60, 0.65, 0.70], [0.58, 0.62, 0.66], report.INCONCLUSIVE),  # 0.03 < 0.05 + 0.04
        ([0.61, 0.61], [0.60, 0.60], report.REPRODUCED),  # zero spread, any gap counts
        ([0.9], [0.1], report.INCONCLUSIVE),  # one seed: no spread to judge
        ([0.62, 0.64], [0.60, 0.60], report.REPRODUCED),  # gap 0.03 > std 0.0141
        ([0.60, 0.64], [0.60, 0.60], report.INCONCLUSIVE),  # gap 0.02 < std 0.0283
        ([0.2, 0.4], [0.3, 0.3], report.INCONCLUSIVE),  # same mean
    ],
)
def test_classify_hand_made_numbers(a, b, verdict):
    assert report.classify(a, b) == verdict


def test_mean_std_is_sample_std():
    assert report.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213562))
    assert report.mean_std([0.4]) == (0.4, 0.0)


def test_build_command_and_env():
    job = ablate.RunJob("vl", 1, "/w/runs/vl/seed1",
                        {"model.use_image": False, "train.mesh_shape": (1,),
                         "eval.ks": (1, 10), "loss.qic_type": "sigmoid", "train.seed": 1},
                        "configs/base.py")
    assert ablate.build_command(job, python="py") == [
        "py", "-m", "vlp_jax.main", "--config=configs/base.py", "--workdir=/w/runs/vl/seed1",
        "--config.model.use_image=False", "--config.train.mesh_shape=(1,)",
        "--config.eval.ks=(1,10)", "--config.loss.qic_type=sigmoid", "--config.train.seed=1",
    ]
    assert ablate.grid_command(["--grid=paper", "--workdir=D", "--report_only",
                                "--notes=n.md"]) == (
        "python -m vlp_jax.experiments.ablate --grid=paper --workdir=D")
    env = ablate.xla_env(8, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --foo=1"})
    assert env["XLA_FLAGS"] == "--foo=1 --xla_force_host_platform_device_count=8"


def test_set_flags_and_override_errors(tiny_config):
    assert ablate.parse_set_flags(["train.num_steps=600", "model.pooling=cls",
                                   "train.mesh_shape=(8,)"]) == {
        "train.num_steps": 600, "model.pooling": "cls", "train.mesh_shape": (8,)}
    with pytest.raises(ValueError, match=r"KEY=VALUE with a dotted KEY .*, got 'steps'"):
        ablate.parse_set_flags(["steps"])
    with pytest.raises(KeyError,
                       match=r"field\(s\) .*'model.widht' \(did you mean 'model.width'\?\)"):
        ablate.apply_overrides(tiny_config, {"model.widht": 3})
    with pytest.raises(ValueError, match="unknown grid 'papr'; known grids: "):
        grids.get_grid("papr")
    paper = grids.get_grid("paper")
    jobs = ablate.plan_runs(paper, 3, "/w", "configs/base.py")
    assert len(jobs) == 3 * len(paper.variants) and len(paper.variants) >= 10
    ablate.validate_jobs(jobs, ablate.load_config_file("configs/base.py"))  # all valid configs
    bad = ablate.plan_runs(paper, 1, "/w", "configs/base.py", ["sigmoid"],
                           {"loss.qic_type": "sigmod"})
    msg = "variant 'sigmoid': invalid config:\n  loss.qic_type='sigmod' must be one of"
    with pytest.raises(ValueError, match=msg):
        ablate.validate_jobs(bad, ablate.load_config_file("configs/base.py"))
    for c in paper.claims:  # every claim names variants of its grid
        paper.variant(c.a), paper.variant(c.b)


def test_workdir_lock(tmp_path):
    path = ablate.acquire_lock(str(tmp_path))
    with open(path) as f:
        assert f.read() == str(os.getpid())
    with open(path, "w") as f:
        f.write(str(os.getppid()))  # a live process that is not us
    with pytest.raises(RuntimeError, match=f"is in use by ablate process {os.getppid()}"):
        ablate.acquire_lock(str(tmp_path))
    with open(path, "w") as f:
        f.write("999999999")  # no such process: a stale lock is taken over
    assert ablate.acquire_lock(str(tmp_path)) == path


# ----------------------------------------------------------------------------- end to end
# Hand-made R@10 per (variant, seed) for the fake runner: vl beats text_only by far more than
# the spreads, so claim 1a must come out "reproduced" with these exact means.
FAKE_R10 = {("text_only", 0): 0.20, ("text_only", 1): 0.24, ("vl", 0): 0.50, ("vl", 1): 0.56}


def _fake_runner(executed):
    """Writes what a finished run writes (eval/recall.json) without training: harness logic only."""

    def run(job):
        executed.append((job.variant, job.seed))
        r10 = FAKE_R10[(job.variant, job.seed)]
        rec = {"R@1": r10 / 2, "R@10": r10, "R@100": min(1.0, 2 * r10)}
        os.makedirs(os.path.join(job.run_dir, "eval"), exist_ok=True)
        with open(os.path.join(job.run_dir, "eval", "recall.json"), "w") as f:
            json.dump({"overall": rec, "per_slice": {"visual": rec, "textual": rec},
                       "num_queries": {"overall": 10}, "num_items": 300, "step": 6}, f)

    return run


def test_micro_grid_report_and_resume(tmp_path):
    grid = grids.get_grid("micro")
    workdir = str(tmp_path / "ablate")
    jobs = ablate.plan_runs(grid, 2, workdir, "configs/base.py")
    executed, log = [], []
    done = ablate.run_grid(jobs, _fake_runner(executed), log=log.append)
    assert executed == [("text_only", 0), ("text_only", 1), ("vl", 0), ("vl", 1)]
    assert [len(done[k]) for k in ("executed", "skipped", "failed")] == [4, 0, 0]
    assert log[0] == "ablate: 4 runs, 0 already finished, 4 to run; ETA ?"
    assert log[-1].startswith("[4/4] vl seed 1: done in 0:00 (R@1 0.280 R@10 0.560 R@100 1.000)")
    assert log[-1].endswith("ETA 0:00")

    paths = report.write_report(workdir, grid, jobs, command="cmd")
    assert [os.path.basename(p) for p in paths] == ["results.json", "RESULTS.md",
                                                     "recall_bars.png"]
    with open(paths[0]) as f:
        results = json.load(f)
    runs = results["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == executed
    assert runs[0]["config_diff"] == {"model.use_image": False, "loss.mpm_type": "none"}
    assert runs[2]["config_diff"] == {} and runs[2]["overall"]["R@10"] == 0.50
    assert runs[0]["wall_time_s"] >= 0 and runs[0]["attempts"] == 1
    cell = results["summary"]["vl"]["visual"]["R@10"]
    assert cell["values"] == [0.50, 0.56] and cell["n"] == 2
    assert cell["mean"] == pytest.approx(0.53) and cell["std"] == pytest.approx(0.0424264)
    (claim,) = results["claims"]
    assert claim["verdict"] == report.REPRODUCED and claim["delta"] == pytest.approx(0.31)
    with open(paths[1]) as f:
        md = f.read()
    assert ("| 1a | V+L beats text-only | `vl` | `text_only` | R@10 overall | 0.530 ± 0.042 | "
            "0.220 ± 0.028 | +0.310 | **reproduced** | 2/2 |") in md
    assert claim["paired_deltas"] == pytest.approx([0.30, 0.32])
    assert "| `text_only` | 2 | 0.220 ± 0.028 | 0.220 ± 0.028 | 0.220 ± 0.028 |" in md
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    only_vl = report.write_report(str(tmp_path / "partial"), grid, jobs[2:])  # no text_only
    with open(only_vl[0]) as f:
        assert json.load(f)["claims"] == []  # claims need both variants in the planned jobs
    shutil.rmtree(os.path.join(jobs[0].run_dir, "eval"))
    shutil.rmtree(os.path.join(jobs[1].run_dir, "eval"))
    report.write_report(workdir, grid, jobs)
    with open(paths[1]) as f:
        assert "| 0.530 ± 0.042 | – | – | **not run** | 0/0 |" in f.read()
    executed.clear()
    ablate.run_grid(jobs, _fake_runner(executed), log=log.append)
    assert executed == [("text_only", 0), ("text_only", 1)]
    # resume: every run finished -> nothing executed
    executed.clear()
    done = ablate.run_grid(jobs, _fake_runner(executed), log=log.append)
    assert executed == [] and len(done["skipped"]) == 4
    # an unfinished run (no eval/recall.json) is the only one run again
    shutil.rmtree(os.path.join(jobs[1].run_dir, "eval"))
    done = ablate.run_grid(jobs, _fake_runner(executed), log=log.append)
    assert executed == [("text_only", 1)] and len(done["skipped"]) == 3
    assert "[1/1] text_only seed 1: start (resuming)" in log[-2]
    assert len(ablate.read_meta(jobs[1].run_dir)["attempts"]) == 3  # one record per attempt
    # a failing run is reported, the others still run, and the folder is not marked finished
    shutil.rmtree(os.path.join(jobs[0].run_dir, "eval"))
    shutil.rmtree(os.path.join(jobs[3].run_dir, "eval"))

    def flaky(job):
        if job.seed == 0:
            raise RuntimeError("boom")
        _fake_runner(executed)(job)

    executed.clear()
    done = ablate.run_grid(jobs, flaky, log=log.append)
    assert [(j.variant, j.seed) for j in done["failed"]] == [("text_only", 0)]
    assert executed == [("vl", 1)] and not ablate.is_finished(jobs[0].run_dir)
    # a folder started with other overrides is refused, not mixed into the results
    other = ablate.plan_runs(grid, 1, workdir, "configs/base.py", ["vl"], {"train.num_steps": 7})
    with pytest.raises(ValueError, match="was started with different overrides"):
        ablate.run_grid(other, _fake_runner(executed))


def test_micro_run_with_the_real_trainer(tiny_config, tmp_path):
    """One micro-grid job through the harness with the real trainer, in process (no 8-device
    subprocess): the report reads the recall.json the trainer wrote."""
    from vlp_jax.train import loop as train

    grid = grids.get_grid("micro")
    workdir = str(tmp_path / "ablate")
    jobs = ablate.plan_runs(grid, 1, workdir, "configs/tiny.py", ["text_only"])  # cheapest

    def runner(job):
        train.train_and_evaluate(ablate.apply_overrides(tiny_config, job.overrides), job.run_dir)

    assert len(ablate.run_grid(jobs, runner, log=lambda m: None)["executed"]) == 1
    report.write_report(workdir, grid, jobs)
    with open(os.path.join(workdir, "results.json")) as f:
        (run,) = json.load(f)["runs"]
    with open(os.path.join(jobs[0].run_dir, "eval", "recall.json")) as f:
        rec = json.load(f)
    assert run["step"] == 4 and run["num_items"] == 300
    assert run["overall"] == {k: rec["overall"][k] for k in ("R@1", "R@10", "R@100")}
    assert set(run["per_slice"]) == {"mixed", "textual", "visual"}
