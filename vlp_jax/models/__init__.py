"""Pure-functional flax.linen models: text/vision encoders, the two towers and training heads."""

from vlp_jax.models.build import dummy_batch, init_params, make_model, param_count
from vlp_jax.models.heads import MLMHead, MPMHead
from vlp_jax.models.text import TextTransformer, masked_attention, masked_mean_pool
from vlp_jax.models.towers import VLPModel
from vlp_jax.models.vision import PatchEmbed, sincos_2d

__all__ = [
    "MLMHead",
    "MPMHead",
    "PatchEmbed",
    "TextTransformer",
    "VLPModel",
    "dummy_batch",
    "init_params",
    "make_model",
    "masked_attention",
    "masked_mean_pool",
    "param_count",
    "sincos_2d",
]
