"""Shared by the ViT / CLIP-vision import tests: the reference data, our imported image path,
and an independent float64 NumPy forward pass of the HF models written from their tensors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file
from scipy.special import erf

from configs import tiny
from vlp_jax.convert import hf_bert, pretrained
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.input.preprocess import image_to_patches
from vlp_jax.models import make_model
from vlp_jax.models.build import dummy_batch

DATA = os.path.join(os.path.dirname(__file__), "data")
VIT_DIR = os.path.join(DATA, "vit_tiny")
CLIP_DIR = os.path.join(DATA, "clip_vision_tiny")
PATCH = 8


CORPUS = ["red striped cotton shirt", "blue denim jeans", "white leather sneakers",
          "vintage wool scarf warm winter gift"]


def write_tiny_bert(out: str, width: int, max_len: int = 80) -> str:
    """A random 2-layer BERT of ``width`` as an HF folder ``out + "_hf"`` (WordPiece vocab
    trained on a few phrases), converted into ``out`` by ``vlp_jax.convert.hf_bert``."""
    src = out + "_hf"
    os.makedirs(src, exist_ok=True)
    tok = tokenizer_lib.train_wordpiece(CORPUS, 120, src)
    vocab, inter, rng = len(tok), 2 * width, np.random.default_rng(width)
    t = {"embeddings.word_embeddings.weight": (vocab, width),
         "embeddings.position_embeddings.weight": (max_len, width),
         "embeddings.token_type_embeddings.weight": (2, width),
         "embeddings.LayerNorm.weight": (width,), "embeddings.LayerNorm.bias": (width,)}
    for i in range(2):
        p = f"encoder.layer.{i}."
        for name, shape in {"attention.self.query": (width, width),
                            "attention.self.key": (width, width),
                            "attention.self.value": (width, width),
                            "attention.output.dense": (width, width),
                            "intermediate.dense": (inter, width),
                            "output.dense": (width, inter)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = shape, shape[:1]
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = (width,), (width,)
    tensors = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in t.items()}
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"model_type": "bert", "vocab_size": vocab, "hidden_size": width,
                   "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": inter,
                   "max_position_embeddings": max_len, "type_vocab_size": 2}, f)
    hf_bert.convert(src, out, overwrite=True)
    return out


def reference() -> dict[str, np.ndarray]:
    with np.load(os.path.join(DATA, "vision_reference.npz")) as z:
        return {k: z[k] for k in z.files}


def image_config(image_init: str, image_size: int = 32, **model):
    config = tiny.get_config()
    config.data.image_size = image_size
    config.model.image_init = image_init
    for key, value in model.items():
        config.model[key] = value
    return config


def zero_params(model, config):
    """Every param of ``model`` as zeros: its shapes without running (or compiling) an init,
    which costs tens of seconds on a loaded 2-core box; the imported leaves replace zeros."""
    shapes = jax.eval_shape(
        lambda rng: model.init(rng, dummy_batch(config), train=False)["params"],
        jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def imported(config, configure: bool = True):
    """(config, model, params) after configure + params + apply, as a training run does."""
    if configure:
        config = pretrained.configure_text_init(config)
    model = make_model(config, vocab_size=config.data.vocab_size)
    return config, model, pretrained.apply_text_init(config, zero_params(model, config))


def run_image(model, params, images: np.ndarray) -> np.ndarray:
    """Our item tower on images alone (uint8 [B, H, W, 3]) -> hidden [B, 1 + N, W] float32."""
    patches = image_to_patches(images, PATCH)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, y: m.encode_image(y)))
    return np.asarray(run(params, patches), np.float32)


# ---------------------------------------------------------------------- float64 HF forward
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _act(x, name):
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _names(family: str, i: int) -> dict[str, str]:
    if family == "vit":
        p = f"encoder.layer.{i}."
        return {"q": p + "attention.attention.query", "k": p + "attention.attention.key",
                "v": p + "attention.attention.value", "o": p + "attention.output.dense",
                "ln1": p + "layernorm_before", "ln2": p + "layernorm_after",
                "fc1": p + "intermediate.dense", "fc2": p + "output.dense"}
    p = f"encoder.layers.{i}."
    return {"q": p + "self_attn.q_proj", "k": p + "self_attn.k_proj", "v": p + "self_attn.v_proj",
            "o": p + "self_attn.out_proj", "ln1": p + "layer_norm1", "ln2": p + "layer_norm2",
            "fc1": p + "mlp.fc1", "fc2": p + "mlp.fc2"}


def hf_forward64(src: str, family: str, images: np.ndarray, mean, std) -> dict[str, np.ndarray]:
    """The HF model's forward pass in float64 from the folder's tensors (no torch, no mapping
    code of ours): {"hidden": last_hidden_state, "pooled": pooler_output (CLIP) / CLS}."""
    from safetensors.numpy import load_file

    raw = load_file(os.path.join(src, "model.safetensors"))
    t = {k: v.astype(np.float64) for k, v in raw.items()}
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    eps, heads, act = cfg["layer_norm_eps"], cfg["num_attention_heads"], cfg["hidden_act"]
    z = (images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)  # B H W C
    b, h, w, _ = z.shape
    p = cfg["patch_size"]
    g = h // p
    conv_w = t["embeddings.patch_embeddings.projection.weight" if family == "vit"
               else "embeddings.patch_embedding.weight"]
    tiles = z.reshape(b, g, p, g, p, 3)
    x = np.einsum("bgyhxc,ocyx->bgho", tiles, conv_w).reshape(b, g * g, -1)
    if family == "vit":
        x = x + t["embeddings.patch_embeddings.projection.bias"]
        cls, pos = t["embeddings.cls_token"].reshape(-1), t["embeddings.position_embeddings"][0]
    else:
        cls, pos = t["embeddings.class_embedding"], t["embeddings.position_embedding.weight"]
    x = np.concatenate([np.broadcast_to(cls, (b, 1, cls.size)), x], axis=1) + pos
    if family == "clip":
        x = _ln(x, t["pre_layrnorm.weight"], t["pre_layrnorm.bias"], eps)
    width = x.shape[-1]
    dh = width // heads
    for i in range(cfg["num_hidden_layers"]):
        n = _names(family, i)

        def lin(v, key, n=n):
            return v @ t[n[key] + ".weight"].T + t[n[key] + ".bias"]

        y = _ln(x, t[n["ln1"] + ".weight"], t[n["ln1"] + ".bias"], eps)
        q, k, v = (lin(y, key).reshape(b, -1, heads, dh) for key in "qkv")
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + lin(np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, -1, width), "o")
        y = _ln(x, t[n["ln2"] + ".weight"], t[n["ln2"] + ".bias"], eps)
        x = x + lin(_act(lin(y, "fc1"), act), "fc2")
    if family == "vit":
        x = _ln(x, t["layernorm.weight"], t["layernorm.bias"], eps)
        return {"hidden": x, "pooled": np.tanh(x[:, 0] @ t["pooler.dense.weight"].T
                                               + t["pooler.dense.bias"])}
    return {"hidden": x, "pooled": _ln(x[:, 0], t["post_layernorm.weight"],
                                       t["post_layernorm.bias"], eps),
            "post_ln": _ln(x, t["post_layernorm.weight"], t["post_layernorm.bias"], eps)}
