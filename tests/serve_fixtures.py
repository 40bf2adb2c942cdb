"""One tiny trained + exported + indexed run shared by the serving tests (both modules).

Training is the expensive part (~45 s on 2 cores), so it happens once per test session: the
result is cached in this module, which pytest imports once for both test files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

_RUN: types.SimpleNamespace | None = None
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # the admin listeners' token in the tests
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NUM_STEPS = 100  # enough for category queries to work clearly above chance (P@10 ~0.5 vs 0.08)


def serving_config(data_cache_dir: str):
    """The conftest ``tiny_config`` (same cache, same catalog), trained a little longer."""
    from tiny_configs import tiny_test_config

    c = tiny_test_config(data_cache_dir)
    c.train.num_steps = NUM_STEPS
    c.train.warmup_steps = 10
    c.train.learning_rate = 3e-3
    c.train.log_every_steps = 50
    c.checkpoint.every_steps = 1000
    return c


def serving_run(tmp_path_factory, data_cache_dir: str) -> types.SimpleNamespace:
    """Train, export with ``--mode=export``'s function, and index with the CLI (all once)."""
    global _RUN
    if _RUN is not None:
        return _RUN
    from vlp_jax.data.build import from_config
    from vlp_jax.train import export_checkpoint
    from vlp_jax.train import loop as train

    config = serving_config(data_cache_dir)
    workdir = str(tmp_path_factory.mktemp("serve_run"))
    train.train_and_evaluate(config, workdir)
    bundle_dir = export_checkpoint.export_from_checkpoint(config, workdir)
    catalog_dir = from_config.builtin_catalog_dir(config.data)
    index_dir = os.path.join(workdir, "index")
    cmd = [sys.executable, "-m", "vlp_jax.indexing.index", f"--bundle={bundle_dir}",
           f"--items={os.path.join(catalog_dir, 'items.jsonl')}", f"--out={index_dir}",
           "--ann=hnsw", "--batch_size=64", "--chunk_size=128", "--progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(catalog_dir, "items.jsonl")) as f:
        items = [json.loads(line) for line in f]
    _RUN = types.SimpleNamespace(
        config=config, workdir=workdir, bundle_dir=bundle_dir, catalog_dir=catalog_dir,
        index_dir=index_dir, items=items, cli_stdout=proc.stdout,
    )
    return _RUN
