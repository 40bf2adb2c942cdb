"""Experiments on top of the trainer: the multi-seed ablation harness that reproduces the papers'
comparisons (``python -m vlp_jax.experiments.ablate``), its declared grids and its report."""
