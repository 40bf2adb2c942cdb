"""The tests' tiny config: configs/tiny.py shrunk further (300 items, batch 16, one device).

A plain module (not a fixture) so that conftest's fixtures and the shared serving run build the
same catalog in the same cache from one definition.
"""

from __future__ import annotations

import ml_collections


def tiny_test_config(data_cache_dir: str) -> ml_collections.ConfigDict:
    """A fresh copy: unit-level end-to-end runs take seconds, not minutes."""
    from configs import tiny

    config = tiny.get_config()
    config.data.cache_dir = data_cache_dir
    config.data.builtin_num_items = 300
    config.data.vocab_size = 800
    config.data.prefetch = 1
    config.train.batch_size = 16
    config.train.num_steps = 8
    config.train.warmup_steps = 2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 4
    config.train.mesh_shape = (1,)  # the 8-device path is covered by the tests that need it
    config.eval.batch_size = 64
    config.eval.max_queries = 64
    return config
