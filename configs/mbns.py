"""CDNS + MBNS: the recommended recipe with a memory bank of past item keys (large catalogs).

Starts from ``configs/base.py`` and changes only the ``negatives`` fields of :data:`RECIPE`:

* a 2,048-entry bank (16 × the global batch of 128), sharded over the ``data`` devices;
* keys from a momentum (EMA, decay 0.99) copy of the item tower — for the bank *and* for the
  query→item positives and in-batch negatives, so every candidate a query is scored against comes
  from the same slowly moving encoder (MoCo/ALBEF).  A bank of the online tower's own past keys
  (no EMA tower) makes training drift (docs/results/negatives.md).  Online in-batch keys beside
  this bank of EMA keys (``negatives.momentum_keys=False``) were chosen on ``valid`` in the
  declared bank-vs-base grids and beat ``configs/base.py`` on test, on honest and on realistic
  titles (docs/ablation/PROTOCOL.md); this file keeps the form those grids declared as
  ``recipe`` (its runs are compared against it), and ``--config.negatives.momentum_keys=False``
  gives the winning variant;
* the bank joins the loss when the learning-rate warm-up ends (``bank_warmup_steps = -1``);
* items clicked for the identical query text are not negatives (``mask_same_query``);
* keyword control (MAKE's keyword enhancement as false-negative control): an item whose title
  holds every keyword of the query counts as one more positive, in the batch and in the bank
  (``keyword_control = "positive"``), so the bank's many candidates add positives as well as
  negatives.  Containment is tested on 1,024-bit signatures (``keyword_bits``, the default), so
  few of a bank's candidates match by hash collision (docs/negatives.md).  Keyword positives
  rely on title containment, exact on the built-in catalog and approximate on realistic titles.

:data:`RECIPE` is written once, here: the ablation grids (``vlp_jax.experiments.grids``, which
reads it with ``vlp_jax.config.overrides.shipped_config("mbns")``) vary it, so the recipe they
measure is the one this file trains.  What the bank gains over the same recipe without it, and
at which budgets that was measured: docs/results.md and docs/negatives.md.

``--config.negatives.bank_size=0`` gives the same recipe without a bank (CDNS with momentum
keys), the baseline the bank is measured against.

    python -m vlp_jax.main --config=configs/mbns.py --workdir=runs/mbns
"""

import ml_collections

from configs import base
from vlp_jax.config.overrides import apply_overrides

RECIPE = {  # dotted overrides of configs/base.py
    "negatives.bank_size": 2048,  # 16 x the global batch of 128
    "negatives.momentum": 0.99,  # EMA item tower producing the keys
    "negatives.momentum_keys": True,  # positives, in-batch and bank keys all from the EMA tower
    "negatives.bank_warmup_steps": -1,  # bank joins when the LR warm-up ends
    "negatives.mask_same_query": True,  # items clicked for the same query text: not negatives
    "negatives.keyword_control": "positive",  # a title holding every query keyword: a positive
}


def get_config() -> ml_collections.ConfigDict:
    return apply_overrides(base.get_config(), RECIPE)
