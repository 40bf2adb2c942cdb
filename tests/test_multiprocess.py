"""Two processes × 4 CPU devices over 127.0.0.1 train exactly like one process × 8 devices.

Exercises ``jax.distributed`` start-up, per-process data sharding, global-array assembly,
multi-process Orbax checkpoints and evaluation, through the real launcher script.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlp_jax.train import loop as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(config) -> list[str]:
    d, t = config.data, config.train
    return [
        "--config=configs/tiny.py",
        f"--config.data.cache_dir={d.cache_dir}",
        f"--config.data.builtin_num_items={d.builtin_num_items}",
        f"--config.data.vocab_size={d.vocab_size}",
        f"--config.data.prefetch={d.prefetch}",
        f"--config.train.batch_size={t.batch_size}",
        f"--config.train.num_steps={t.num_steps}",
        f"--config.train.warmup_steps={t.warmup_steps}",
        f"--config.train.log_every_steps={t.log_every_steps}",
        f"--config.checkpoint.every_steps={config.checkpoint.every_steps}",
        f"--config.eval.batch_size={config.eval.batch_size}",
        f"--config.eval.max_queries={config.eval.max_queries}",
    ]


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_match_one_process(tiny_config, tmp_path):
    tiny_config.train.num_steps = 4
    tiny_config.checkpoint.every_steps = 4
    tiny_config.train.mesh_shape = (8,)
    single = str(tmp_path / "single")
    single_results = train.train_and_evaluate(tiny_config, single)  # also builds the dataset

    multi = str(tmp_path / "multi")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
    proc = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", *_flags(tiny_config), f"--workdir={multi}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _losses(single), _losses(multi)
    assert sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
    multi_results = json.load(open(os.path.join(multi, "eval", "recall.json")))
    for k, v in single_results["overall"].items():
        assert multi_results["overall"][k] == pytest.approx(v, abs=1e-6), k
    # Each process saved its own data-iterator state beside the shared model state.
    data_dir = os.path.join(multi, "checkpoints", "4", "data")
    states = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]
