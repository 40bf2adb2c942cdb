"""model.image_init from a Hugging Face ViTModel folder: parity, mapping, positions, errors.

No torch needed: the reference outputs were computed once by tests/data/make_vision_reference.py
(torch + transformers) from the tiny random checkpoint stored next to them; a float64 NumPy
forward pass written from the HF tensors checks the same numbers independently of our mapping.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import vision_helpers as vh
from safetensors.numpy import load_file, save_file

from vlp_jax.convert import hf_vision, hf_vit, pretrained

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def vit():
    ref = vh.reference()
    config, model, params = vh.imported(vh.image_config(vh.VIT_DIR))
    return ref, config, model, params, vh.run_image(model, params, ref["images"])


def test_imported_vit_equals_transformers_outputs(vit):
    ref, _, _, _, hidden = vit
    np.testing.assert_allclose(hidden, ref["vit_hidden"], rtol=1e-4, atol=5e-5)
    # pooler_output = tanh(dense(CLS)): the pooler is not part of the tower, so apply the
    # checkpoint's pooler to our [CLS] output
    t = load_file(os.path.join(vh.VIT_DIR, "model.safetensors"))
    pooled = np.tanh(hidden[:, 0] @ t["pooler.dense.weight"].T + t["pooler.dense.bias"])
    np.testing.assert_allclose(pooled, ref["vit_pooled"], rtol=1e-4, atol=5e-5)


def test_float64_numpy_forward_agrees_with_reference_and_import(vit):
    ref, _, _, _, hidden = vit
    f64 = vh.hf_forward64(vh.VIT_DIR, "vit", ref["images"], IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(f64["hidden"], ref["vit_hidden"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64["pooled"], ref["vit_pooled"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden, f64["hidden"], rtol=1e-4, atol=5e-5)


def test_patch_layer_folds_normalisation_exactly_in_float64():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((5, 3, 4, 4)), rng.standard_normal(5)
    images = rng.integers(0, 256, (2, 8, 8, 3))
    kernel, folded = hf_vision.patch_linear(weight, bias, IMAGENET_MEAN, IMAGENET_STD)
    ours = images / 255.0 * 2.0 - 1.0  # the pipeline's (x/255 - 0.5)/0.5
    patches = ours.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    z = (images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    conv = np.einsum("bgyhxc,ocyx->bgho", z.reshape(2, 2, 4, 2, 4, 3), weight).reshape(2, 4, 5)
    np.testing.assert_allclose(patches @ kernel + folded, conv + bias, rtol=1e-12, atol=1e-12)


def test_configured_layout_and_untouched_parts(vit):
    ref, config, _, params, _ = vit
    m = config.model
    assert (m.width, m.depth, m.num_heads, m.mlp_dim, m.patch_size) == (32, 2, 4, 48, 8)
    assert (m.pre_norm, m.activation, m.embed_norm, m.image_cls) == (True, "gelu", False, True)
    assert m.layer_norm_eps == 1e-12 and m.query_depth == 2  # "item": query depth unchanged
    assert "embed_norm" not in params["item_encoder"]  # ViT has no embedding LayerNorm
    np.testing.assert_array_equal(params["item_encoder"]["type_embed"][1], 0.0)
    t = load_file(os.path.join(vh.VIT_DIR, "model.safetensors"))
    np.testing.assert_array_equal(params["patch_embed"]["mask_token"],
                                  t["embeddings.mask_token"].reshape(-1))
    np.testing.assert_array_equal(params["item_encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  t["encoder.layer.1.intermediate.dense.weight"].T)
    # the query tower is not an image tower: "item" leaves it random, "both" gives it the layers
    _, _, both = vh.imported(vh.image_config(vh.VIT_DIR, image_init_towers="both"))
    np.testing.assert_array_equal(both["query_encoder"]["blocks_0"]["attn"]["query"]["kernel"],
                                  t["encoder.layer.0.attention.attention.query.weight"].T)
    assert not np.array_equal(params["query_encoder"]["blocks_0"]["attn"]["query"]["kernel"],
                              both["query_encoder"]["blocks_0"]["attn"]["query"]["kernel"])


def test_v5_module_names_and_task_prefix_map_identically():
    t = load_file(os.path.join(vh.VIT_DIR, "model.safetensors"))
    arch = hf_vision.read_vision_arch(vh.VIT_DIR)
    base, _ = hf_vision.map_vision_weights(t, arch)
    renamed = {}
    for name, value in t.items():  # transformers 5's in-memory names, under a task model
        for old, new in ((".attention.attention.query.", ".attention.q_proj."),
                         (".attention.output.dense.", ".attention.o_proj."),
                         (".intermediate.dense.", ".mlp.fc1."), (".output.dense.", ".mlp.fc2.")):
            name = name.replace(old, new)
        renamed["vit." + name.replace("encoder.layer.", "layers.")] = value
    renamed["classifier.weight"] = np.zeros((3, 32), np.float32)
    assert hf_vit.canonical("layers.3.mlp.fc2.bias") == "encoder.layer.3.output.dense.bias"
    mapped, ignored = hf_vision.map_vision_weights(renamed, arch)
    assert "classifier.weight" in ignored and "vit.pooler.dense.weight" in ignored
    for group in ("patch_embed", "tower"):
        assert sorted(mapped[group]) == sorted(base[group])
        for key, value in base[group].items():
            np.testing.assert_array_equal(mapped[group][key], value)


def test_positions_are_resized_for_another_grid():
    t = load_file(os.path.join(vh.VIT_DIR, "model.safetensors"))
    config, model, params = vh.imported(vh.image_config(vh.VIT_DIR, image_size=48))
    pos = t["embeddings.position_embeddings"][0]
    assert params["patch_embed"]["pos_embed"].shape == (36, 32)
    np.testing.assert_array_equal(params["patch_embed"]["cls_pos"], pos[0])
    const = np.tile(np.arange(32, dtype=np.float32), (16, 1))  # every position the same
    np.testing.assert_allclose(hf_vision.resize_positions(const, 6), np.tile(const[:1], (36, 1)),
                               rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(hf_vision.resize_positions(pos[1:], 4), pos[1:])
    images = np.zeros((1, 48, 48, 3), np.uint8)
    assert vh.run_image(model, params, images).shape == (1, 37, 32)


def _copy_checkpoint(tmp_path, tensors=None, config=None) -> str:
    src = str(tmp_path / "vit")
    shutil.copytree(vh.VIT_DIR, src)
    if tensors is not None:
        save_file(tensors, os.path.join(src, "model.safetensors"))
    if config is not None:
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(config, f)
    return src


def test_errors_name_every_bad_tensor(tmp_path):
    t = dict(load_file(os.path.join(vh.VIT_DIR, "model.safetensors")))
    del t["encoder.layer.1.output.dense.bias"]
    t["encoder.layer.0.layernorm_after.weight"] = np.ones(31, np.float32)
    t["encoder.layer.0.attention.attention.rel_bias"] = np.ones(3, np.float32)
    src = _copy_checkpoint(tmp_path, tensors=t)
    with pytest.raises(ValueError) as e:
        vh.imported(vh.image_config(src))
    msg = str(e.value)
    assert "missing tensors ['encoder.layer.1.output.dense.bias']" in msg
    assert "encoder.layer.0.layernorm_after.weight: expected (32,), got (31,)" in msg
    assert "unexpected tensors ['encoder.layer.0.attention.attention.rel_bias']" in msg


def test_unsupported_settings_are_refused(tmp_path):
    with open(os.path.join(vh.VIT_DIR, "config.json")) as f:
        cfg = json.load(f)
    src = _copy_checkpoint(tmp_path, config={**cfg, "hidden_act": "relu", "qkv_bias": False,
                                              "num_channels": 1})
    with pytest.raises(ValueError, match="hidden_act='relu'") as e:
        pretrained.configure_text_init(vh.image_config(src))
    assert "qkv_bias=False" in str(e.value) and "num_channels=1" in str(e.value)
    with pytest.raises(ValueError, match="model_type='bert'"):
        hf_vision.vision_arch({**cfg, "model_type": "bert"})
    with pytest.raises(ValueError, match="has no config.json"):
        pretrained.configure_text_init(vh.image_config(str(tmp_path)))
    with pytest.raises(ValueError, match="needs model.use_image=True"):
        pretrained.configure_text_init(vh.image_config(vh.VIT_DIR, use_image=False))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        pretrained.configure_text_init(vh.image_config(vh.VIT_DIR, image_size=36))
    with pytest.raises(ValueError, match="image_init_towers must be one of"):
        pretrained.configure_text_init(vh.image_config(vh.VIT_DIR, image_init_towers="query"))
    bad = vh.image_config(vh.VIT_DIR)  # not configured: the model has the wrong sizes
    with pytest.raises(ValueError, match="configure_text_init") as e:
        vh.imported(bad, configure=False)
    assert "cannot initialise patch_embed" in str(e.value) and "the model has no ['cls_pos'" \
        in str(e.value)


def test_image_cls_token_is_not_a_patch_for_mpm_and_pooling(vit):
    import jax

    from vlp_jax.models.build import dummy_batch

    _, config, model, params, _ = vit
    batch = dummy_batch(config, 2)
    out = jax.eval_shape(lambda p, b: model.apply({"params": p}, b, train=False), params, batch)
    n, w = model.num_patches, config.model.width
    assert out["mpm_pred"].shape == out["mpm_target"].shape == (2, n, w)
    item = jax.eval_shape(lambda p, b: model.apply(
        {"params": p}, b["title_tokens"], b["title_mask"], b["patches"],
        method=lambda m, *a: m.encode_item(*a)), params, batch)
    assert item["patch_hidden"].shape == (2, n, w)  # the image [CLS] is sliced off
    image = jax.eval_shape(lambda p, x: model.apply(
        {"params": p}, x, method=lambda m, y: m.encode_image(y)), params, batch["patches"])
    assert image.shape == (2, 1 + n, w)
