"""model.image_init from a CLIPVisionModel / CLIPModel folder: parity, layout, and the rule for
text_init + image_init together.

Reference outputs: tests/data/make_vision_reference.py (torch + transformers, run once).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import vision_helpers as vh
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from vlp_jax.convert import hf_vision, pretrained
from vlp_jax.convert.text_encoder import restore_params

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def clip():
    ref = vh.reference()
    config, model, params = vh.imported(vh.image_config(vh.CLIP_DIR))
    return ref, config, model, params, vh.run_image(model, params, ref["images"])


def test_imported_clip_equals_transformers_outputs(clip):
    ref, _, _, _, hidden = clip
    # post_layernorm is the tower's final norm: [CLS] = pooler_output, every token normalised
    np.testing.assert_allclose(hidden[:, 0], ref["clip_pooled"], rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(hidden, ref["clip_hidden_post_ln"], rtol=1e-4, atol=5e-5)


def test_float64_numpy_forward_agrees_with_reference_and_import(clip):
    ref, _, _, _, hidden = clip
    f64 = vh.hf_forward64(vh.CLIP_DIR, "clip", ref["images"], CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(f64["hidden"], ref["clip_hidden"], rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(f64["pooled"], ref["clip_pooled"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden, f64["post_ln"], rtol=1e-4, atol=5e-5)


def test_clip_layout_options(clip):
    _, config, _, params, _ = clip
    m = config.model
    assert (m.activation, m.embed_norm, m.pre_norm, m.layer_norm_eps) == (
        "quick_gelu", True, True, 1e-5)
    t = load_file(os.path.join(vh.CLIP_DIR, "model.safetensors"))
    enc = params["item_encoder"]
    np.testing.assert_array_equal(enc["embed_norm"]["scale"], t["pre_layrnorm.weight"])
    np.testing.assert_array_equal(enc["final_norm"]["bias"], t["post_layernorm.bias"])
    np.testing.assert_array_equal(params["patch_embed"]["cls_token"],
                                  t["embeddings.class_embedding"])
    assert np.all(params["patch_embed"]["mask_token"] == 0)  # not in CLIP: stays as initialised


def test_full_clip_model_folder_maps_like_the_vision_model(tmp_path):
    t = load_file(os.path.join(vh.CLIP_DIR, "model.safetensors"))
    with open(os.path.join(vh.CLIP_DIR, "config.json")) as f:
        vision = json.load(f)
    full = {"vision_model." + k: v for k, v in t.items()}
    full.update({"text_model.embeddings.token_embedding.weight": np.zeros((10, 16), np.float32),
                 "visual_projection.weight": np.zeros((8, 32), np.float32),
                 "logit_scale": np.zeros((), np.float32)})
    src = tmp_path / "clip_full"
    src.mkdir()
    save_file(full, str(src / "model.safetensors"))
    with open(src / "config.json", "w") as f:
        json.dump({"model_type": "clip", "architectures": ["CLIPModel"],
                   "vision_config": {k: v for k, v in vision.items() if k != "model_type"},
                   "text_config": {"hidden_size": 16}}, f)
    arch, mapped, ignored = hf_vision.load_vision_checkpoint(str(src))
    _, base, _ = hf_vision.load_vision_checkpoint(vh.CLIP_DIR)
    assert arch["family"] == "clip" and arch["activation"] == "quick_gelu"
    assert sorted(ignored) == ["logit_scale", "text_model.embeddings.token_embedding.weight",
                               "visual_projection.weight"]
    for group in ("patch_embed", "tower"):
        assert sorted(mapped[group]) == sorted(base[group])
        for key, value in base[group].items():
            np.testing.assert_array_equal(mapped[group][key], value)


# ---------------------------------------------------------------------- text_init + image_init
def test_text_and_image_init_together_follow_the_documented_rule(tmp_path):
    text_dir = vh.write_tiny_bert(str(tmp_path / "bert"), 32)
    config = vh.image_config(vh.CLIP_DIR, text_init=text_dir)
    config, _, params = vh.imported(config)
    m = config.model
    # layout: item tower = CLIP; separate query tower = the BERT checkpoint's own layout
    assert (m.depth, m.pre_norm, m.activation, m.embed_norm) == (2, True, "quick_gelu", True)
    assert (m.query_pre_norm, m.query_activation, m.query_layer_norm_eps) == (False, "gelu",
                                                                              1e-12)
    bert = traverse_util.flatten_dict(restore_params(text_dir), sep="/")
    item = traverse_util.flatten_dict(params["item_encoder"], sep="/")
    query = traverse_util.flatten_dict(params["query_encoder"], sep="/")
    # item tower: text tables from BERT (type row 0 only), blocks and norms from CLIP
    np.testing.assert_array_equal(item["token_embed/embedding"], bert["token_embed/embedding"])
    np.testing.assert_array_equal(item["type_embed"][0], bert["type_embed"][0])
    np.testing.assert_array_equal(item["type_embed"][1], 0.0)
    clip_t = load_file(os.path.join(vh.CLIP_DIR, "model.safetensors"))
    np.testing.assert_array_equal(item["blocks_0/attn/query/kernel"],
                                  clip_t["encoder.layers.0.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(item["embed_norm/scale"], clip_t["pre_layrnorm.weight"])
    # query tower: the whole BERT (blocks and its embedding LayerNorm)
    for path in ("blocks_1/mlp/fc2/kernel", "embed_norm/scale", "token_embed/embedding"):
        np.testing.assert_array_equal(query[path], bert[path])
    # image_init_towers="both": the query tower takes CLIP's layers, BERT's tables only
    both = vh.image_config(vh.CLIP_DIR, text_init=text_dir, image_init_towers="both")
    both, _, params = vh.imported(both)
    assert both.model.query_pre_norm is None  # no separate query layout: the item tower's
    query = traverse_util.flatten_dict(params["query_encoder"], sep="/")
    np.testing.assert_array_equal(query["blocks_0/attn/query/kernel"],
                                  clip_t["encoder.layers.0.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(query["token_embed/embedding"], bert["token_embed/embedding"])


def test_text_and_image_widths_must_match(tmp_path):
    config = vh.image_config(vh.CLIP_DIR, text_init=vh.write_tiny_bert(str(tmp_path / "bert"), 16))
    with pytest.raises(ValueError, match="has width 16 but model.image_init=.* has width 32"):
        pretrained.configure_text_init(config)
