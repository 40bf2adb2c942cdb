"""The train-batch contract's shapes (docs/architecture.md) as a zero batch.

Parameters are initialised (and the state's abstract shapes traced) from this batch, so it lives
with the training state; ``vlp_jax.perf.synthetic`` fills the same shapes with random values.
"""

from __future__ import annotations

import ml_collections
import numpy as np


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Zero batch with the train-batch contract's shapes, for ``init``/``eval_shape``."""
    d = config.data
    n = (d.image_size // config.model.patch_size) ** 2
    pdim = config.model.patch_size**2 * 3
    lq, lt = d.query_len, d.title_len
    def z(*shape, dt=np.int32):
        return np.zeros((batch_size, *shape), dt)

    ids = np.arange(batch_size, dtype=np.int32)
    f32 = np.float32
    return {
        "query_tokens": z(lq), "query_mask": z(lq, dt=bool),
        "query_mlm_tokens": z(lq), "query_mlm_targets": z(lq), "query_mlm_weights": z(lq, dt=f32),
        "title_tokens": z(lt), "title_mask": z(lt, dt=bool),
        "title_mlm_tokens": z(lt), "title_mlm_targets": z(lt), "title_mlm_weights": z(lt, dt=f32),
        "patches": z(n, pdim, dt=f32), "patch_mask": z(n, dt=bool),
        "item_index": ids, "query_id": ids.copy(),
    }
