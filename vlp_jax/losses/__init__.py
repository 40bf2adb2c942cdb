"""Training losses: pure JAX functions, float32 maths (docs/architecture.md, "Where do I change X").

* ``qic`` — the query–item contrastive loss (CDNS across devices, MBNS memory bank,
  false-negative rules, momentum distillation): the one home of the retrieval objective.
* ``masked`` — MLM and the masked-patch tasks (MPM_R and regression).
* ``xent`` — the masked softmax cross-entropy both build on.
"""

from vlp_jax.losses.masked import mlm_loss, mpm_contrastive_loss, mpm_regression_loss
from vlp_jax.losses.xent import KINDS, softmax_xent_with_masks

__all__ = [
    "KINDS",
    "mlm_loss",
    "mpm_contrastive_loss",
    "mpm_regression_loss",
    "softmax_xent_with_masks",
]
