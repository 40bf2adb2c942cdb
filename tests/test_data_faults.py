"""A damaged TFDS build: a truncated or missing array_record shard is named, with the fix,
before any training (``shard_check.DatasetCorruptError``, exit 7), and ``--rebuild_data`` rebuilds
it to the same bytes.  Works on a copy of the test run's tiny build, never on the shared one."""

from __future__ import annotations

import os
import shutil

import pytest

from vlp_jax.data import shard_check
from vlp_jax.data.build import from_config


@pytest.fixture()
def cache_copy(tiny_config, tmp_path):
    """A private cache dir holding a copy of the tiny catalog and its build."""
    handle = from_config.prepare_dataset(tiny_config.data)  # built once per test run
    root = from_config.cache_root(tiny_config.data)
    copy = tmp_path / "cache"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.lock", "xla"))
    tiny_config.data.cache_dir = str(copy)
    build = os.path.join(str(copy), os.path.relpath(handle.dataset_dir, root))
    return tiny_config, build


def _shard(build: str, split: str) -> str:
    return next(p for p, _ in shard_check.shard_files(build) if f"-{split}." in p)


def test_truncated_or_missing_shard_is_named_with_the_fix(cache_copy):
    config, build = cache_copy
    train_shard = _shard(build, "train")
    with open(train_shard, "r+b") as f:  # cut inside a chunk: the footer and the index go
        f.truncate(os.path.getsize(train_shard) // 2)
    with pytest.raises(shard_check.DatasetCorruptError) as err:
        from_config.prepare_dataset(config.data)
    message = str(err.value)
    assert message.startswith(f"dataset build {build} is damaged: {train_shard} is unreadable (")
    assert message.endswith("Rebuild it: rerun the same command with --rebuild_data (deletes "
                            "this build folder and builds it again from the catalog), or delete "
                            "the folder yourself.")
    os.remove(_shard(build, "items"))
    missing = f"{_shard(build, 'items')} is missing"
    with pytest.raises(shard_check.DatasetCorruptError, match=missing):
        shard_check.check_build(build)


def test_rebuild_data_makes_the_same_build_again(cache_copy):
    config, build = cache_copy
    test_shard = _shard(build, "test")
    original = open(test_shard, "rb").read()
    with open(test_shard, "r+b") as f:
        f.truncate(1000)
    handle = from_config.prepare_dataset(config.data, rebuild=True)
    assert handle.dataset_dir == build
    shard_check.check_build(build)
    assert open(test_shard, "rb").read() == original  # the build is deterministic
    assert handle.sources["test"][0]["query"]
