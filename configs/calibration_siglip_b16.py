"""Calibration: the published SigLIP B/16 run, as close as this code can express it.

Why this config exists: ``python -m vlp_jax.aot`` estimates step times for TPU pods no one here
has run on.  To say how far to trust those ranges, docs/aot.md compares the estimator with one
*measured* TPU training run whose configuration and speed are public:

    Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image Pre-Training",
    ICCV 2023 (arXiv:2303.15343), §4.5 and Table 1: a SigLIP with a ViT-B/16 image tower
    (224 px) and a B-sized text tower (16 tokens, 32k sentencepiece vocabulary, §4.2),
    "16 TPU-v4 chips", "16 k batch size for 2.4 B examples seen", "trained on 16 chips for
    three days" (71.0 % ImageNet 0-shot).

What is the same: 16 v4 chips (``--topology=v4:2x2x4``), a global batch of 16,384 (1,024 pairs
per chip), a 12 × 768 pre-LN ViT-B/16 at 224 px / patch 16 (196 patches), a 12 × 768 pre-LN
text tower over 16 tokens with a 32,000-token vocabulary, the sigmoid pairwise loss with a
learned bias over every pair of the global batch, bf16 compute, pure data parallelism.

What differs (each named in docs/aot.md's calibration section):

* our item tower is single-stream: it also reads ``data.title_len`` = 2 title tokens ([CLS],
  [SEP]) and an image [CLS] token (199 positions, SigLIP's image tower 196 with a MAP head);
* pooling: [CLS] / masked mean here, SigLIP's MAP-head attention pooling (one small attention
  layer per image, < 1 % of the FLOPs);
* no MLM / MPM / momentum tower / memory bank: the contrastive loss alone, as SigLIP;
* negatives: the global batch gathered to every chip (``negatives.cross_device``, a
  [1,024 × 16,384] score block per chip); SigLIP rotates text chunks with collective permutes
  (same scores, different collectives);
* optimizer: AdamW (two float32 moments) where SigLIP uses ScalingViT-Adafactor (factored
  second moment), so our optimizer state is larger;
* ``model.remat="block"``: 1,024 pairs per chip do not fit a v4's 32 GiB without
  rematerialisation here; whether and how the published run rematerialised is not stated;
* the published run fine-tuned from ViT-AugReg-B/16 weights (an initialisation: same program).
"""

import ml_collections

from configs import pretrained


def get_config() -> ml_collections.ConfigDict:
    config = pretrained.get_config()
    d, m, lo, n, t = config.data, config.model, config.loss, config.negatives, config.train
    d.query_len = 16  # SigLIP §4.2: "a maximum of 16 text tokens are kept"
    d.title_len = 2  # [CLS] [SEP]: the item tower is (almost) an image tower
    d.vocab_size = 32000  # SigLIP §4.2: 32k sentencepiece vocabulary
    # text tower: B-sized pre-LN transformer (big_vision's text encoder), no embedding LN
    m.query_pre_norm = True
    m.query_embed_norm = False
    m.query_layer_norm_eps = 1e-6
    m.layer_norm_eps = 1e-6
    m.remat = "block"
    # the sigmoid loss alone (SigLIP): no MLM, no MPM, no momentum tower, no bank
    lo.qic_type = "sigmoid"
    lo.symmetric = False  # the sigmoid loss already scores every pair once
    lo.mlm_weight = 0.0
    lo.query_mlm_weight = 0.0
    lo.mpm_type = "none"
    n.bank_size = 0
    n.momentum = 0.0
    n.momentum_keys = False
    n.keyword_control = "off"
    n.mask_same_query = False  # SigLIP: every other pair of the batch is a negative
    n.cross_device = True
    t.batch_size = 16384  # SigLIP §4.5: 16 k batch on 16 TPU-v4 chips
    config.eval.batch_size = 1024
    return config
