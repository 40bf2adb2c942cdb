"""Base config: vision-language pre-training on the built-in catalog.

Every field is documented inline.  Override any field from the command line, e.g.
``--config.train.batch_size=128``.  Other configs (``text_only.py``, ``tiny.py``) start from
``get_config()`` here and change a few fields, so the field names scripts rely on
(``data.catalog_dir``, ``train.num_steps``, ``train.batch_size``, ``train.seed``,
``model.use_image``, ``negatives.cross_device``, ``negatives.bank_size``,
``checkpoint.every_steps``, ``eval.every_steps``) exist in all of them.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.catalog_dir = ""  # catalog in the user data format; "" = built-in (generated, cached)
    d.builtin_num_items = 6000  # size of the built-in catalog when catalog_dir == ""
    d.builtin_seed = 0  # generator seed of the built-in catalog
    d.builtin_lang = "en"  # "en" or "zh": language of built-in titles and queries
    d.cache_dir = ""  # where built-in catalogs and TFDS builds are cached; "" = ~/.cache/vlp_jax
    # Local disk for verified copies of gs:// / s3:// data (the TFDS build each host reads, a
    # tokenizer folder); used only when cache_dir or tokenizer is on an object store.
    # "" = ~/.cache/vlp_jax/staged.  docs/pods_data.md.
    d.staging_dir = ""
    d.image_size = 64  # images are resized to image_size x image_size RGB at build time
    d.query_len = 12  # query tokens (incl. [CLS]/[SEP]); longer queries are truncated
    d.title_len = 24  # title tokens (incl. [CLS]/[SEP]); long titles are truncated
    d.tokenizer = ""  # "" = train a WordPiece vocab on the catalog; else an HF tokenizer folder
    d.vocab_size = 2000  # WordPiece vocab size when the tokenizer is trained on the catalog
    d.mlm_prob = 0.15  # fraction of (non-special) tokens selected for MLM (BERT 80/10/10 rule)
    d.mlm_max_fraction = 0.3  # at most ceil(0.3 * len) MLM targets per sequence; 1.0 = no cap
    d.patch_mask_ratio = 0.25  # fraction of image patches replaced by the mask token (MPM)
    d.patch_mask_shape = "random"  # "random" patches or "block" (BEiT blockwise rectangles)
    d.worker_count = 0  # Grain worker processes (0 = in-process; >0 for multi-core hosts)
    d.prefetch = 2  # batches prepared and placed on device ahead of the step

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.use_image = True  # False = text-only baseline: item tower sees the title only
    m.shared_query_encoder = False  # True: query tower reuses the item tower's text layers
    m.modal_adaptation = False  # MAKE: per-item softmax gate over pooled title vs image parts
    m.pooling = "mean"  # "mean" (masked mean over non-padding tokens) or "cls"
    m.normalize = True  # L2-normalise tower outputs (cosine similarity)
    m.embed_dim = 128  # size of the retrieval embedding
    m.width = 128  # transformer width (both towers)
    m.depth = 3  # transformer layers of the item tower
    m.query_depth = 3  # transformer layers of a separate query tower
    m.num_heads = 4  # attention heads
    m.mlp_ratio = 4  # MLP hidden = mlp_ratio * width
    m.dropout = 0.0  # dropout inside transformer blocks
    m.patch_size = 16  # ViT patch size in pixels (image_size must be divisible by it)
    m.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (losses always in float32)
    m.tie_mlm_embeddings = True  # MLM output layer reuses the token embedding matrix
    m.text_init = ""  # HF BERT checkpoint converted by vlp_jax.convert.hf_bert ("" = random)
    m.text_init_towers = "both"  # with text_init: "query" | "item" | "both" towers' text layers
    m.image_init = ""  # HF ViT / CLIP-vision folder for the item tower's image side ("" = random)
    m.image_init_towers = "item"  # with image_init: "item" | "both" (+ separate query tower layers)
    m.mlp_dim = 0  # MLP hidden size; 0 = mlp_ratio * width (text_init sets the checkpoint's)
    m.layer_norm_eps = 1e-6  # LayerNorm epsilon (BERT checkpoints: 1e-12, set by text_init)
    m.pre_norm = True  # pre-LN blocks; False = BERT post-LN (forced by text_init)
    m.remat = "none"  # activation rematerialisation: "none" | "block" (recompute each block)
    m.patch_pos_emb = "learned"  # image patch positions: "learned" or "sincos" (fixed 2-D)
    m.activation = "gelu"  # transformer MLP activation: "gelu" (BERT, ViT) | "quick_gelu" (CLIP)
    # LayerNorm on the embeddings: None = only in post-LN (BERT) towers; CLIP checkpoints: True
    m.embed_norm = placeholder(bool)
    m.image_cls = False  # an image [CLS] token before the patches (ViT checkpoints: image_init)
    # A separate query tower's own layout, where a text checkpoint's differs from the item
    # tower's (set by text_init next to image_init); None = the item tower's field above.
    m.query_num_heads = placeholder(int)
    m.query_mlp_dim = placeholder(int)
    m.query_layer_norm_eps = placeholder(float)
    m.query_pre_norm = placeholder(bool)
    m.query_activation = placeholder(str)
    m.query_embed_norm = placeholder(bool)

    # ---------------------------------------------------------------- losses
    c.loss = lo = ml_collections.ConfigDict()
    lo.qic_weight = 1.0  # query-item contrastive loss weight (0 = off)
    lo.qic_type = "softmax"  # "softmax" (margin=0), "am_softmax" (uses margin) or "sigmoid"
    lo.margin = 0.1  # additive margin on the positive logit for am_softmax
    lo.temperature = 0.05  # initial softmax temperature
    lo.learn_temperature = True  # learn log(1/temperature) (clipped to [0, log(100)])
    lo.sigmoid_bias_init = -10.0  # learned logit bias of the sigmoid QIC (SigLIP init)
    lo.symmetric = True  # add the item->query term to the query->item term
    lo.mlm_weight = 0.5  # title MLM (inside the item tower) weight (0 = off)
    lo.query_mlm_weight = 0.1  # query MLM (inside the query tower) weight (0 = off)
    lo.mpm_type = "contrastive"  # "contrastive" (MPM_R), "regression" or "none"
    lo.mpm_weight = 0.5  # masked-patch loss weight
    lo.mpm_temperature = 0.1  # MPM_R InfoNCE temperature
    lo.mpm_candidates = "batch"  # MPM_R candidates: "batch" (all masked patches) or "image"
    lo.mpm_dup_threshold = 1.0  # MPM_R: candidates with target cosine > this are not negatives
    lo.mpm_norm_target = False  # regression MPM: MAE per-patch normalised pixel targets
    lo.mpm_target = "patch_embed"  # MPM_R targets: "patch_embed" | "teacher" (EMA item tower)
    lo.mpm_teacher_momentum = 0.996  # EMA rate of the MPM_R teacher (1.0 = frozen at init)

    # ---------------------------------------------------------------- negatives
    c.negatives = n = ml_collections.ConfigDict()
    n.cross_device = True  # CDNS: all_gather items across devices (False = local batch only)
    n.bank_size = 0  # MBNS: memory-bank entries (global, sharded on `data`; 0 = no bank)
    n.bank_warmup_steps = -1  # first step using the bank; -1 = train.warmup_steps (LR warm-up end)
    n.bank_item_grad = "full"  # "batch": items' gradient from the in-batch softmax only (MBNS)
    n.momentum = 0.0  # EMA decay of the momentum tower producing bank keys (0 = no EMA)
    n.momentum_keys = False  # True: query->item positives/in-batch keys from the EMA tower too
    n.mask_same_query = False  # items clicked for the identical query text are not negatives
    n.keyword_control = "off"  # title holds every query keyword: "off" | "mask" | "positive"
    # Bits of the keyword signatures (keyword_control). One hash per token: a title of T tokens
    # falsely 'holds' a word with probability 1 - exp(-T/bits) (2.3 % at T = 24), and every
    # such false match in the batch or the bank becomes a wrong positive (docs/negatives.md).
    n.keyword_bits = 1024
    n.filter_margin = -1.0  # drop negatives scoring above positive - margin (< 0 = off)
    # Momentum distillation (ALBEF): query->item targets = (1 - a) hard labels + a softmax of
    # the momentum model's scores over the same candidates; a ramps up over the LR warm-up.
    # Needs momentum_keys (0 = off).
    n.distill_alpha = 0.0
    n.stale_probe = 32  # bank staleness diagnostic: items of each step compared with the bank
    n.relevance_probe = True  # built-in catalog: log false negatives (fn_mass, *_fn_count)
    n.oracle_fn_mask = False  # built-in catalog: mask relevant negatives (diagnostic bound only)
    n.ring = False  # memory-lean ring (ppermute) instead of all_gather for cross-device negatives
    n.bank_dtype = "float32"  # storage dtype of bank embeddings ("bfloat16" halves its memory)

    # ---------------------------------------------------------------- training
    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 700  # total optimiser steps
    t.batch_size = 128  # global batch (split over processes and devices)
    t.seed = 0  # seed of params init, masking and shuffling
    t.learning_rate = 1e-3  # peak AdamW learning rate
    t.warmup_steps = 100  # linear warm-up steps, then cosine decay to end_lr_fraction
    t.end_lr_fraction = 0.05  # final lr = end_lr_fraction * learning_rate
    t.weight_decay = 0.05  # AdamW decoupled weight decay (not on biases/norms)
    t.grad_clip_norm = 1.0  # global-norm gradient clipping (0 = off)
    t.log_every_steps = 20  # metrics.jsonl / TensorBoard / progress-line period
    t.mesh_shape = (-1,)  # devices along the `data` axis (-1 = all devices)
    t.cpu_devices = 1  # CPU backend devices: N = N; 0 = one per core (dividing the batch)
    t.accum_steps = 1  # GradCache: k micro-batches of batch_size/k, all k*B negatives kept
    t.nonfinite_policy = "stop"  # non-finite loss/grads: "stop" (dump, exit) or "skip" update
    t.max_consecutive_skips = 5  # with "skip": stop after this many non-finite steps in a row

    # ---------------------------------------------------------------- checkpointing
    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 250  # save period (and always at the end of training)
    ck.keep = 2  # checkpoints kept on disk
    ck.async_save = True  # write checkpoints in the background
    # A save (or its wait) that has not finished after this many seconds stops the run with
    # exit 9: an unreachable object store makes tensorstore retry for minutes without an error.
    ck.save_timeout_s = 600.0
    # Object-store workdirs: the lock's heartbeat lease; a lock not refreshed for this long is
    # stale and taken over (a preempted pod's new VMs resume without manual clean-up).
    ck.lock_lease_s = 600.0

    # ---------------------------------------------------------------- evaluation
    c.eval = e = ml_collections.ConfigDict()
    e.every_steps = 0  # evaluate every N steps (0 = only at the end)
    e.split = "test"  # split whose queries are evaluated ("valid" or "test")
    e.ks = (1, 10, 100, 1000)  # Recall@K cut-offs
    e.batch_size = 256  # embedding batch size
    e.chunk_size = 8192  # items scored per chunk in exact top-k
    e.max_queries = 0  # evaluate at most this many queries (0 = all)

    return c
