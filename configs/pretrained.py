"""The realistic starting point: a BERT-family text checkpoint + a ViT / CLIP image checkpoint.

What the teams we compare with do (ViLT, ALBEF, big_vision, open_clip): nobody trains the image
encoder from scratch.  Here

* the item tower is a ViT-B/16 (``model.image_init``: a local Hugging Face ``ViTModel`` or
  ``CLIPVisionModel`` folder): 224 px images at 16 px patches (196 patches + an image [CLS]),
  its 12 pre-LN layers carry the title tokens too (ViLT), whose embedding tables come from
  ``model.text_init`` (a BERT-family checkpoint converted by ``vlp_jax.convert.hf_bert``);
* the separate query tower is that BERT checkpoint whole (12 post-LN layers, its own layout via
  the ``model.query_*`` fields);
* the rest is ``configs/paper_scale.py`` (the CDNS + MBNS recipe, bf16, global batch 4,096,
  2^16 bank, 64 title tokens, MPM_R over each image's own patches).

Without checkpoints (``text_init`` / ``image_init`` empty) the shapes are already those of
ViT-B/16 + BERT-base, so ``python -m vlp_jax.aot --config=configs/pretrained.py
--topology=v5e:16x16`` compiles exactly the program a run with the real checkpoints trains.
With them, ``vlp_jax.convert.pretrained.configure_text_init`` sets every size and layout from
the checkpoints (docs/pretrained.md); the values below are what ViT-B/16 + BERT-base give.

Train on a CPU (small catalog, a few steps; docs/pretrained.md has the tested command)::

    python -m vlp_jax.main --config=configs/pretrained.py --workdir=runs/pretrained \\
        --config.model.text_init=CONVERTED_BERT_DIR --config.model.image_init=HF_VIT_DIR \\
        --config.train.batch_size=8 --config.train.num_steps=4 ...
"""

import ml_collections

from configs import paper_scale


def get_config() -> ml_collections.ConfigDict:
    config = paper_scale.get_config()
    m = config.model
    m.text_init = ""  # converted BERT-family folder (python -m vlp_jax.convert.hf_bert)
    m.text_init_towers = "both"  # query tower whole; item tower: its text embedding tables
    m.image_init = ""  # HF ViTModel / CLIPVisionModel folder (config.json + model.safetensors)
    m.image_init_towers = "item"
    # ViT-B/16's layout for the item tower (image_init sets these from the checkpoint) ...
    m.pre_norm = True
    m.layer_norm_eps = 1e-12
    m.activation = "gelu"  # CLIP checkpoints set "quick_gelu"
    m.embed_norm = False  # CLIP checkpoints set True (its pre_layrnorm)
    m.image_cls = True
    m.patch_pos_emb = "learned"
    # ... and BERT-base's for the query tower (text_init sets these from the checkpoint).
    m.query_num_heads = 12
    m.query_mlp_dim = 3072
    m.query_layer_norm_eps = 1e-12
    m.query_pre_norm = False
    m.query_activation = "gelu"
    m.query_embed_norm = True
    return config
