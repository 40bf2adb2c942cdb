"""Training losses: pure JAX functions, float32 maths (see docs/architecture.md, "Losses")."""

from vlp_jax.losses.contrastive import qic_loss, softmax_xent_with_masks
from vlp_jax.losses.masked import mlm_loss, mpm_contrastive_loss, mpm_regression_loss

__all__ = [
    "mlm_loss",
    "mpm_contrastive_loss",
    "mpm_regression_loss",
    "qic_loss",
    "softmax_xent_with_masks",
]
