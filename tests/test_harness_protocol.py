"""The reviewer's protocol end to end with a fake trainer: stamps on every run and on
results.json, refusal of copied / relabelled / swapped runs unless declared reused, selection on
valid, confirmation on test once, exploratory marking from the claim's commit time."""

import dataclasses
import json
import os
import shutil
import subprocess

import pytest

from vlp_jax.experiments import ablate, confirm, declared, grids, protocol, report, stamps

COMMON = {**grids.MICRO_COMMON, "eval.split": "valid"}
VARIANTS = (grids.Variant("base", {}, "baseline"),
            grids.Variant("cand1", {"loss.mlm_weight": 0.4}, "candidate 1"),
            grids.Variant("cand2", {"loss.mlm_weight": 0.3}, "candidate 2"))
QUERIES = [f"q{i}" for i in range(8)]
# Per-query hits on valid and test per (variant, seed): cand2 wins on valid, and on test it beats
# base by 2/8, 3/8, 2/8 over the three seeds.
VALID = {"base": 2, "cand1": 3, "cand2": 5}
TEST = {("base", 0): 3, ("base", 1): 2, ("base", 2): 4,
        ("cand2", 0): 5, ("cand2", 1): 5, ("cand2", 2): 6}


def _recall(split, hits):
    per = [1.0] * hits + [0.0] * (len(QUERIES) - hits)
    r10 = sum(per) / len(per)
    return {"split": split, "overall": {"R@1": r10, "R@10": r10, "R@100": 1.0},
            "per_slice": {"visual": {"R@10": r10}},
            "per_query": {"query": QUERIES, "slice": ["visual"] * len(QUERIES),
                          "R@1": per, "R@10": per, "R@100": [1.0] * len(per)}}


def _write(run_dir, sub, payload):
    os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    with open(os.path.join(run_dir, sub, "recall.json"), "w") as f:
        json.dump(payload, f)


def _claims_repo(tmp_path, date):
    """A git repository whose claims file was committed at ``date`` (committer time)."""
    repo = tmp_path / f"claims{date[:4]}"
    repo.mkdir()
    path = repo / "claims.py"
    path.write_text('Declared(claim_id="c1")\n')
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date,
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "claims.py"], ["commit", "-qm", "declare c1"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    return str(path)


CLAIM = protocol.Declared(claim_id="c1", text="a candidate beats base",
                          candidates=("cand1", "cand2"), baseline="base", seeds=3)


def _protocol_grid(source_file, claim=CLAIM):
    return protocol.ProtocolGrid(grids.Grid("proto", COMMON, VARIANTS, ()), (claim,), None,
                                 source_file)


@pytest.fixture
def finished(tmp_path):
    """Three variants x 3 seeds 'trained' (valid results) with stamps, in ``tmp/w``."""
    grid = grids.Grid("proto", COMMON, VARIANTS, ())
    jobs = ablate.plan_runs(grid, 3, str(tmp_path / "w"), "configs/base.py")
    hashes = ablate.job_hashes(jobs, ablate.load_config_file("configs/base.py"))
    ablate.run_grid(jobs, lambda j: _write(j.run_dir, "eval", _recall("valid", VALID[j.variant])),
                    log=lambda m: None, hashes=hashes,
                    stamp_fields={"grid": "proto", "claims": {"c1": protocol.claim_hash(CLAIM)}})
    return grid, jobs, hashes


def test_runs_and_results_are_stamped(finished, tmp_path):
    grid, jobs, hashes = finished
    meta = ablate.read_meta(jobs[0].run_dir)
    stamp = meta["stamp"]
    assert stamp["run_dir"] == os.path.abspath(jobs[0].run_dir) and len(stamp["run_id"]) == 32
    assert stamp["config_hash"] == hashes[jobs[0].run_dir] and stamp["variant"] == "base"
    assert len(stamp["commit"]) == 40 and stamp["machine"]["cpus"] == os.cpu_count()
    assert stamp["started_at"]["epoch"] <= stamp["finished_at"]["epoch"]
    assert stamp["recall_sha256"] == stamps.file_sha256(
        os.path.join(jobs[0].run_dir, "eval", "recall.json"))
    (attempt,) = meta["attempts"]
    assert attempt["started_at"]["iso"].endswith("Z") and attempt["status"] == "ok"
    # Different configs hash differently; the same config hashes the same.
    assert len({hashes[j.run_dir] for j in jobs}) == len(jobs)
    again = ablate.job_hashes(jobs[:1], ablate.load_config_file("configs/base.py"))
    assert again[jobs[0].run_dir] == hashes[jobs[0].run_dir]
    paths = report.write_report(str(tmp_path / "w"), grid, jobs, hashes=hashes)
    with open(paths[0]) as f:
        results = json.load(f)
    assert results["stamp"]["commit"] == stamp["commit"] and "host" in results["stamp"]["machine"]
    assert results["stamp"]["written_at"]["epoch"] >= stamp["finished_at"]["epoch"]
    assert all(r["stamp"]["run_id"] and r["provenance"] == [] for r in results["runs"])
    assert "per_query" not in results["runs"][0]["valid"]  # stays in the run folders


def test_copied_relabelled_or_swapped_runs_are_refused(finished, tmp_path):
    _, jobs, hashes = finished
    ablate.verify_stamps(jobs, hashes, strict=True)  # intact
    # Copied: the whole workdir somewhere else.
    shutil.copytree(tmp_path / "w", tmp_path / "copy")
    copied = [ablate.RunJob(j.variant, j.seed, j.run_dir.replace("/w/", "/copy/"),
                            j.overrides, j.base_config) for j in jobs]
    chashes = {c.run_dir: hashes[j.run_dir] for c, j in zip(copied, jobs, strict=True)}
    with pytest.raises(ValueError, match="refused: copied or moved: stamped in"):
        ablate.verify_stamps(copied, chashes)
    # Relabelled: seed folders of one variant swapped.
    s0, s1 = jobs[0].run_dir, jobs[1].run_dir
    os.rename(s0, s0 + ".tmp")
    os.rename(s1, s0)
    os.rename(s0 + ".tmp", s1)
    with pytest.raises(ValueError, match="relabelled: stamped as base/seed1"):
        ablate.verify_stamps(jobs, hashes)
    # ... unless the claim declares them reused.
    ablate.verify_stamps(jobs, hashes, reused=["base/seed0", "base/seed1"])
    # Results swapped after the run finished.
    _write(jobs[4].run_dir, "eval", _recall("valid", 8))
    with pytest.raises(ValueError, match="recall.json changed after the run finished"):
        ablate.verify_stamps(jobs[3:], hashes)
    # Unstamped folders: refused by protocol grids, tolerated (reported) by the old grids.
    os.remove(os.path.join(jobs[5].run_dir, ablate.RUN_META))
    ablate.verify_stamps(jobs[5:6], hashes)
    with pytest.raises(ValueError, match="no stamp"):
        ablate.verify_stamps(jobs[5:6], hashes, strict=True)
    assert stamps.duplicate_run_ids({"a": {"run_id": "x"}, "b": {"run_id": "x"},
                                     "c": {"run_id": "y"}, "d": None}) == {"a": ["b"],
                                                                           "b": ["a"]}


def test_select_on_valid_confirm_on_test_once(finished, tmp_path, monkeypatch):
    _, jobs, hashes = finished
    pg = _protocol_grid(_claims_repo(tmp_path, "2020-01-01T00:00:00Z"))
    assert protocol.declaration(pg, pg.claims[0])["iso"] == "2020-01-01T00:00:00Z"
    evaluated = []

    def fake_eval(run_dir, base_config, overrides, env):
        variant, seed = run_dir.split(os.sep)[-2], int(run_dir[-1])
        evaluated.append((variant, seed))
        _write(run_dir, protocol.TEST_DIR, _recall("test", TEST[(variant, seed)]))

    monkeypatch.setattr(confirm, "run_eval", fake_eval)
    workdir = str(tmp_path / "w")
    ablate.confirm_grid(pg, pg.grid, jobs, hashes, workdir, 8, log=lambda m: None)
    assert sorted(evaluated) == sorted(TEST)  # only the selection and the baseline, on test
    paths = report.write_report(workdir, pg.grid, jobs, hashes=hashes, protocol_grid=pg)
    with open(paths[0]) as f:
        (row,) = json.load(f)["declared_claims"]
    assert row["selected"] == "cand2" and row["selection"]["candidates"]["cand1"][
        "mean_delta"] == pytest.approx(1 / 8)
    assert row["deltas"] == pytest.approx([2 / 8, 3 / 8, 2 / 8])
    # Paired t on (0.25, 0.375, 0.25): mean 0.29167, sd 0.07217, t = 7.0, p = 0.00990 (2 df).
    assert row["p_greater"] == pytest.approx(0.0099, abs=1e-4)
    assert row["verdict"] == "reproduced" and row["old_rule"] == "reproduced"
    # Per-query: 8 queries, hits averaged over the 3 seeds, resampled.
    assert row["num_queries"] == 8 and row["query_ci95"][0] > 0
    with open(paths[1]) as f:
        md = f.read()
    assert "| c1 | 2020-01-01T00:00:00Z" in md and "paired_t α=0.05 (≥ 2 seeds), p=0.010" in md
    # Once: a changed valid ranking may not be confirmed on the same test split again.
    for j in jobs:
        if j.variant == "cand1":
            _write(j.run_dir, "eval", _recall("valid", 8))
    with pytest.raises(confirm.AlreadyConfirmed, match="test split is used once per claim"):
        ablate.confirm_grid(pg, pg.grid, jobs, {}, workdir, 8, log=lambda m: None)


def test_runs_before_the_declaration_are_exploratory(finished, tmp_path, monkeypatch):
    _, jobs, hashes = finished
    for j in jobs:
        if j.variant in ("base", "cand2"):
            _write(j.run_dir, protocol.TEST_DIR, _recall("test", TEST[(j.variant, j.seed)]))
    later = _protocol_grid(_claims_repo(tmp_path, "2099-01-01T00:00:00Z"))
    runs = report.collect_runs(later.grid, jobs, hashes)
    row = protocol.judge(later, later.claims[0], runs, "cand2", report.classify)
    assert set(row["runs"].values()) == {"exploratory (started before the claim was declared)"}
    assert row["verdict"].startswith("untestable: 0 of 3 declared seeds admissible")
    # Declared in time, but edited after the runs started (another metric): they do not count.
    source = _claims_repo(tmp_path, "2020-01-01T00:00:00Z")
    edited = _protocol_grid(source, dataclasses.replace(CLAIM, metric="R@1"))
    row = protocol.judge(edited, edited.claims[0], runs, "cand2", report.classify)
    assert set(row["runs"].values()) == {
        "exploratory (the claim was absent or different when the run started)"}
    assert protocol.claim_hash(dataclasses.replace(CLAIM, reused=("base/seed0",))) == (
        protocol.claim_hash(CLAIM))  # declaring reuse later is allowed
    row = protocol.judge(_protocol_grid(source), CLAIM, runs, "cand2", report.classify)
    assert row["verdict"] == "reproduced"
    uncommitted = _protocol_grid(str(tmp_path / "nowhere.py"))
    assert protocol.declaration(uncommitted, uncommitted.claims[0]) is None
    assert stamps.is_exploratory(runs[0]["stamp"], None)


def test_declared_grids_are_valid_and_committed_literally():
    base = ablate.load_config_file("configs/base.py")
    with open(declared.FILE) as f:
        source = f.read()
    for name, pg in declared.DECLARED.items():
        assert pg.grid.common["eval.split"] == "valid"
        extra = {"data.catalog_dir": "/nonexistent"} if pg.catalog else {}
        seeds = max(c.seeds for c in pg.claims)
        ablate.validate_jobs(ablate.plan_runs(pg.grid, seeds, "/w", "configs/base.py",
                                              extra=extra), base)
        for c in pg.claims:
            assert f'claim_id="{c.claim_id}"' in source and c.seeds >= 3
        assert declared.lookup(name)[1] is pg
    with pytest.raises(ValueError, match="must set eval.split='valid'"):
        protocol.ProtocolGrid(grids.Grid("x", grids.MICRO_COMMON, VARIANTS, ()), ())
    with pytest.raises(ValueError, match="cannot reach alpha=0.05 with sign_flip"):
        protocol.Declared("x", "t", ("cand1",), "base", seeds=4, test="sign_flip")


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_mpm_baseline_differs_in_the_loss_weight_only():
    """``none_masked`` sees the same masked images as ``mpmr`` (the model keeps MPM on, so the
    item tower gets the patch mask); the resolved configs differ in one field."""
    from vlp_jax.models.build import make_model

    base = ablate.load_config_file("configs/base.py")
    pg = declared.MPM_CLOSEUP
    cfg = {v.name: ablate.apply_overrides(base, grids.run_overrides(pg.grid, v, 0))
           for v in pg.grid.variants}
    a, b = _flat(cfg["mpmr"]), _flat(cfg["none_masked"])
    assert {k for k in a if a[k] != b[k]} == {"loss.mpm_weight"}
    assert make_model(cfg["none_masked"], 100).mpm_type == "contrastive"  # input masked
    assert make_model(cfg["none"], 100).mpm_type == "none"  # the old arm: unmasked input


def test_protocol_catalog_generated_once(tmp_path):
    spec = {"num_items": 40, "seed": 1, "image_size": 16, "num_eval_queries": 6,
            "object_scale": (1.1, 1.4), "text_noise": "realistic"}
    out = protocol.ensure_catalog(spec, str(tmp_path))
    assert out == protocol.catalog_dir(spec, str(tmp_path)) and "object_scale-1.1-1.4" in out
    with open(os.path.join(out, "catalog_info.json")) as f:
        info = json.load(f)
    assert info["object_scale"] == [1.1, 1.4] and info["text_noise"] == "realistic"
    stamp = os.stat(os.path.join(out, "items.jsonl")).st_mtime_ns
    assert protocol.ensure_catalog(spec, str(tmp_path)) == out
    assert os.stat(os.path.join(out, "items.jsonl")).st_mtime_ns == stamp  # not regenerated
