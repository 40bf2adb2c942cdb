"""Paper scale: BERT-base-sized towers, 224 px images, a global batch of 4,096 and a 2^16 bank.

The regime of the Taobao papers (SIGIR'23 VLP, WWW'23 MAKE), for pods, not for this CPU box:

* both text towers at BERT-base size: 12 layers × 768 wide, 12 heads, MLP 3,072, post-LN
  (BERT's layout), a 30,522-token vocabulary (bert-base-uncased's size: train with
  ``--config.data.tokenizer=DIR`` or ``--config.model.text_init=DIR`` of a checkpoint converted
  by ``vlp_jax.convert.hf_bert``, which sets the same widths);
* the single-stream item tower reads 64 title tokens and a 224 px image at patch 16 (196
  patches), 260 positions;
* bf16 compute (losses stay float32), float32 parameters and AdamW moments;
* MPM_R scores each masked patch against the masked patches of its own image
  (``loss.mpm_candidates="image"``): the base config's batch-wide candidates would be a
  200,704 × 200,704 logits matrix at this batch;
* the CDNS + MBNS recipe of ``configs/mbns.py`` (momentum keys, keyword positives) with a
  65,536-entry bank (16 × the batch); ``--config.negatives.bank_size=1048576`` (2^20) and ``=0``
  are the other points of docs/aot.md's table.

Replicated parameters, optimizer state and the momentum copy take ~3.5 GB per chip, which every
TPU generation holds, so the parameters are not sharded (docs/aot.md: what fits where).
Compile it for a pod without one: ``python -m vlp_jax.aot --config=configs/paper_scale.py
--topology=v5e:16x16``.
"""

import ml_collections

from configs import mbns


def get_config() -> ml_collections.ConfigDict:
    config = mbns.get_config()
    d, m, t = config.data, config.model, config.train
    d.image_size = 224  # 14 × 14 = 196 patches of 16 px
    d.query_len = 32
    d.title_len = 64
    d.vocab_size = 30522  # bert-base-uncased's vocabulary size
    m.width = 768
    m.depth = 12
    m.query_depth = 12
    m.num_heads = 12
    m.mlp_ratio = 4
    m.mlp_dim = 3072
    m.pre_norm = False  # BERT's post-LN blocks (what converted BERT weights expect)
    m.layer_norm_eps = 1e-12
    m.embed_dim = 256
    m.patch_size = 16
    m.dtype = "bfloat16"
    config.loss.mpm_candidates = "image"
    config.negatives.bank_size = 65536
    t.batch_size = 4096  # global; a multiple of every table topology's chip count
    t.num_steps = 20000
    t.warmup_steps = 2000
    t.learning_rate = 2e-4
    config.checkpoint.every_steps = 1000
    config.eval.batch_size = 1024
    return config
