"""Random batches with the train-batch contract, for benchmarks and tests that need a realistic
batch without building a dataset."""

from __future__ import annotations

import ml_collections
import numpy as np

from vlp_jax.data.input.preprocess import mlm_max_predictions
from vlp_jax.models.build import dummy_batch


def random_batch(
    config: ml_collections.ConfigDict, batch_size: int, vocab: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Dummy-batch shapes filled with plausible random values (masks ~15%/25% on)."""
    rng = np.random.default_rng(seed)
    batch = dummy_batch(config, batch_size)
    for key, value in batch.items():
        if key.endswith("_mask") and key != "patch_mask":
            batch[key] = np.ones_like(value)
        elif key.endswith("tokens") or key.endswith("targets"):
            batch[key] = rng.integers(5, vocab, value.shape).astype(np.int32)
        elif key.endswith("weights"):  # ~15% selected, at most the pipeline's cap per row
            draws = rng.random(value.shape)
            cap = mlm_max_predictions(value.shape[1], config.data.mlm_max_fraction)
            rank = np.argsort(np.argsort(draws, axis=1), axis=1)
            batch[key] = ((draws < 0.15) & (rank < cap)).astype(np.float32)
        elif key == "patches":
            batch[key] = rng.standard_normal(value.shape).astype(np.float32)
    n = batch["patch_mask"].shape[1]
    k = int(round(config.data.patch_mask_ratio * n))
    batch["patch_mask"] = np.zeros_like(batch["patch_mask"])
    batch["patch_mask"][:, :k] = True
    return batch
