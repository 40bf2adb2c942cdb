"""End-to-end training tests on a tiny built-in catalog: smoke, learning, exact resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from checkpoint_helpers import saved_state

from vlp_jax.train import loop as train


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_rows(workdir):
    return {r["step"]: r for r in _metrics(workdir) if "loss" in r}


def _final_state(workdir, step):
    return saved_state(workdir, step)[0]


def test_run_writes_every_output_learns_and_eval_mode_agrees(tiny_config, tmp_path):
    tiny_config.train.num_steps = 30
    tiny_config.train.learning_rate = 2e-3
    tiny_config.checkpoint.every_steps = 100  # only the final checkpoint
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(tiny_config, workdir)
    rows = _train_rows(workdir)
    assert list(rows) == list(range(1, 31))
    for key in ("loss", "qic_loss", "mlm_loss", "query_mlm_loss", "mpm_loss", "examples_per_sec",
                "learning_rate", "qic_pos_logit_mean", "qic_neg_logit_mean", "item_emb_norm"):
        assert key in rows[1], key
        assert np.isfinite(rows[1][key]), key
    total = (rows[1]["qic_loss"] + 0.5 * rows[1]["mlm_loss"] + 0.1 * rows[1]["query_mlm_loss"]
             + 0.5 * rows[1]["mpm_loss"])
    assert rows[1]["loss"] == pytest.approx(total, rel=1e-5)
    # It learns: the loss falls over 30 steps.
    first = np.mean([rows[s]["loss"] for s in range(1, 6)])
    last = np.mean([rows[s]["loss"] for s in range(26, 31)])
    assert last < first - 0.2, (first, last)
    assert rows[30]["qic_loss"] < rows[1]["qic_loss"]
    recall = json.load(open(os.path.join(workdir, "eval", "recall.json")))
    assert recall["overall"] == results["overall"]
    assert os.path.exists(os.path.join(workdir, "eval", "report.md"))
    saved = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert saved == ["30"]
    # --mode=eval on the checkpoint reproduces the end-of-training evaluation.
    again = train.evaluate_checkpoint(tiny_config, workdir)
    assert again["overall"] == pytest.approx(results["overall"])


def test_eight_devices_with_bank_match_one_device_and_resume_exactly(tiny_config, tmp_path):
    """Same global batch on 8 devices vs 1 → same per-step losses (bank + EMA tower on); and the
    8-device run, losing its last checkpoint and rerun, resumes bit-identically (sharded state,
    bank, EMA params, data iterator).  Kill/SIGTERM resumes: tests/test_faults.py."""
    k = 2
    tiny_config.train.num_steps = 2 * k
    tiny_config.checkpoint.every_steps = k
    tiny_config.negatives.bank_size = 64
    tiny_config.negatives.bank_warmup_steps = 1
    tiny_config.negatives.momentum = 0.5
    rows = {}
    for devices in (1, 8):
        tiny_config.train.mesh_shape = (devices,)
        workdir = str(tmp_path / f"d{devices}")
        train.train_and_evaluate(tiny_config, workdir)
        rows[devices] = _train_rows(workdir)
    losses = {d: [r["loss"] for _, r in sorted(rows[d].items())] for d in rows}
    np.testing.assert_allclose(losses[8], losses[1], rtol=2e-5)

    full, interrupted = str(tmp_path / "d8"), str(tmp_path / "interrupted")
    shutil.copytree(full, interrupted)
    # Simulate a crash right after step k: drop what came later (checkpoint and log lines).
    shutil.rmtree(os.path.join(interrupted, "checkpoints", str(2 * k)))
    kept = [r for r in _metrics(interrupted) if r["step"] <= k and "loss" in r]
    with open(os.path.join(interrupted, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    train.train_and_evaluate(tiny_config, interrupted)
    a, b = rows[8], _train_rows(interrupted)
    assert sorted(b) == list(range(1, 2 * k + 1))
    for step in range(k + 1, 2 * k + 1):
        for key in ("loss", "qic_loss", "mlm_loss", "mpm_loss", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    pa, pb = _final_state(full, 2 * k), _final_state(interrupted, 2 * k)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)  # params, opt state, bank
    bank = pa["extra"]["sharded_bank"]
    assert bank["embeddings"].shape == (64, tiny_config.model.embed_dim)
    assert b[2 * k]["qic_loss"] > 0 and "bank_fill" in b[2 * k]


def test_invalid_config_fails_fast_naming_the_field(tiny_config, tmp_path):
    tiny_config.loss.qic_type = "cosine"
    tiny_config.model.num_heads = 3
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert "loss.qic_type='cosine'" in str(err.value)
    assert "model.width=64 must be divisible by model.num_heads=3" in str(err.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
