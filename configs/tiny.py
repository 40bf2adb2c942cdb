"""Smoke config: a tiny model on a ~1k-item catalog; train + eval in well under 90 s on 2 cores.

For users' smoke tests and scripts, and for the project's own end-to-end tests.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.builtin_num_items = 1000
    config.data.image_size = 32
    config.data.query_len = 12
    config.data.title_len = 24
    config.data.vocab_size = 1500
    config.model.width = 64
    config.model.depth = 2
    config.model.query_depth = 2
    config.model.num_heads = 2
    config.model.mlp_ratio = 2
    config.model.embed_dim = 32
    config.model.patch_size = 8
    config.train.num_steps = 60
    config.train.batch_size = 32
    config.train.warmup_steps = 10
    config.train.log_every_steps = 10
    config.checkpoint.every_steps = 30
    config.eval.ks = (1, 10, 100)
    config.eval.batch_size = 128
    return config
