"""What the query–item loss is asked to do: one frozen record instead of many keyword arguments.

Why: the loss has many switches (kind, cross-device mode, bank gradient, false-negative rules,
diagnostics), and passing them one by one through the train step and gradient caching is where
they drifted apart.  ``QicOptions.from_config`` reads them from the config in one place; the
record is hashable, so it parameterises the traced loss as static structure.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from vlp_jax.losses.qic.false_negatives import NegativeFilter


@dataclasses.dataclass(frozen=True)
class QicOptions:
    """Static structure of the query–item contrastive loss (see ``loss.qic_loss``).

    kind: "softmax", "am_softmax" (additive margin on the positive) or "sigmoid" (SigLIP).
    margin: the AM-softmax margin (ignored by the other kinds: they use 0).
    symmetric: also the item→query term, averaged with query→item (softmax kinds).
    cross_device: negatives from every device (CDNS); False = each device's own items only.
    ring: the cross-device candidates travel a ppermute ring (b × b logits per device) instead
      of being all-gathered (b × N·b).
    momentum_keys: query→item positives and in-batch negatives are the momentum tower's item
      keys (given to the loss as ``item_keys``), consistent with the bank's (MoCo/ALBEF).
    bank_item_grad: "full" or "batch" (the items' gradient from the in-batch softmax only).
    filt: false-negative rules (``false_negatives.NegativeFilter``).
    stale_probe: with a bank, measure its keys' staleness on this many items (a diagnostic).
    distill: momentum distillation of the query→item term (ALBEF); α is a runtime argument.
    precision: matmul precision; HIGHEST matches the single-device reference on every backend.
    """

    kind: str = "softmax"
    margin: float = 0.0
    symmetric: bool = False
    cross_device: bool = True
    ring: bool = False
    momentum_keys: bool = False
    bank_item_grad: str = "full"
    filt: NegativeFilter = NegativeFilter()
    stale_probe: int = 0
    distill: bool = False
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @property
    def margin_used(self) -> float:
        """The margin the positive logit is shifted by: ``margin`` for AM-softmax, else 0."""
        return float(self.margin) if self.kind == "am_softmax" else 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> QicOptions:
        """The loss options a training config asks for (``loss.*`` and ``negatives.*``)."""
        lo, neg = config.loss, config.negatives
        return cls(
            kind=str(lo.qic_type),
            margin=float(lo.margin) if lo.qic_type == "am_softmax" else 0.0,
            symmetric=bool(lo.symmetric),
            cross_device=bool(neg.cross_device),
            ring=bool(neg.ring),
            momentum_keys=bool(neg.momentum_keys),
            bank_item_grad=str(neg.bank_item_grad),
            filt=NegativeFilter.from_config(neg),
            stale_probe=int(neg.stale_probe),
            distill=float(neg.distill_alpha) > 0,
        )
