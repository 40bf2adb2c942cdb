"""The query–item contrastive loss — the one home of the retrieval objective.

Read in this order:

* ``options``         — ``QicOptions``: what the loss is asked to do (from the config).
* ``loss``            — ``qic_loss``: candidate blocks (in-batch gathered / ring / local, bank)
                        merged and reduced once, inside one ``shard_map``.
* ``false_negatives`` — the rules that decide which candidates may be negatives (mask builders).
* ``blocks``          — logits, masks and log-sum-exps of one block of candidates.
* ``bank_block``      — the memory bank's candidates (distributed log-sum-exp over its shards).
* ``hooks``           — diagnostics: bank staleness, an injected relevance oracle.
* ``checks``          — argument checks with messages that name the config field.

The bank's state and writes are ``vlp_jax.parallel.memory_bank``; the ppermute ring is
``vlp_jax.parallel.ring``.  The train step builds the options with
``QicOptions.from_config(config)`` and calls ``qic_loss`` (``train.objective``).
"""

from vlp_jax.losses.qic.false_negatives import NegativeFilter
from vlp_jax.losses.qic.hooks import Relevance
from vlp_jax.losses.qic.loss import qic_loss
from vlp_jax.losses.qic.options import QicOptions

__all__ = ["NegativeFilter", "QicOptions", "Relevance", "qic_loss"]
