"""The train-batch contract's zero batch, as ``train/state.py`` imports it.

The function lives in ``vlp_jax.models.build`` (the serving export and the benchmarks need it
below the train layer); this name stays only until ``train/state.py`` imports it from there.
"""

from vlp_jax.models.build import dummy_batch

__all__ = ["dummy_batch"]
