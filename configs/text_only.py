"""Text-only baseline: the same model and training, but the item tower never sees the image.

Everything else (steps, batch, tokenizer, negatives) is inherited from ``base.py`` so the
comparison with the vision-language model is at the same budget.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.use_image = False  # item tower = title tokens only
    config.loss.mpm_type = "none"  # no image, no masked-patch task
    config.loss.mpm_weight = 0.0
    return config
