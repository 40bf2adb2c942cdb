"""Hugging Face ``CLIPVisionModel`` (the vision half of CLIP): tensor names for the item tower.

CLIP's vision transformer differs from ViT in three ways, each hosted by an option of our
text transformer (``vlp_jax.models.text``) rather than approximated:

* ``pre_layrnorm``: a LayerNorm on the embeddings before the first block, in a pre-LN model ->
  ``embed_norm`` with ``model.embed_norm=True`` (without it every block would see un-normalised
  residuals).
* activation ``quick_gelu`` (``x * sigmoid(1.702 x)``) -> ``model.activation="quick_gelu"``.
* ``post_layernorm`` is applied by HF to the pooled [CLS] token only; here it becomes the
  tower's ``final_norm`` over every token, so the image [CLS] output equals CLIP's
  ``pooler_output`` and every other token is ``post_layernorm(last_hidden_state)`` (the
  parity test checks both).
* the patch convolution has no bias; ours gets one, holding the folded pixel normalisation.

=============================================  =================================================
``embeddings.patch_embedding``                 ``patch_embed/proj`` (conv -> linear)
``embeddings.class_embedding``                 ``patch_embed/cls_token``
``embeddings.position_embedding``              ``patch_embed/cls_pos`` (row 0), ``pos_embed``
``pre_layrnorm``                               ``embed_norm``
``encoder.layers.i.self_attn.{q,k,v}_proj``    ``blocks_i/attn/{query,key,value}`` (.T)
``encoder.layers.i.self_attn.out_proj``        ``blocks_i/attn/out`` (.T)
``encoder.layers.i.layer_norm1`` / ``2``       ``blocks_i/attn_norm`` / ``mlp_norm``
``encoder.layers.i.mlp.fc1`` / ``fc2``         ``blocks_i/mlp/fc1`` / ``fc2`` (.T)
``post_layernorm``                             ``final_norm``
=============================================  =================================================

Accepts ``CLIPVisionModel`` folders (bare names) and full ``CLIPModel`` ones (``vision_model.``
prefix; the text half, projections and ``logit_scale`` are listed as ignored).
"""

from __future__ import annotations

from typing import Any

MODEL_TYPES = ("clip_vision_model", "clip")
ANCHOR = "embeddings.patch_embedding.weight"
IGNORABLE = ("embeddings.position_ids",)
# OpenAI CLIP's preprocessing (CLIPImageProcessor defaults)
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)

_LAYER = {
    "self_attn.q_proj": ("attn/query", "linear"),
    "self_attn.k_proj": ("attn/key", "linear"),
    "self_attn.v_proj": ("attn/value", "linear"),
    "self_attn.out_proj": ("attn/out", "linear"),
    "layer_norm1": ("attn_norm", "norm"),
    "layer_norm2": ("mlp_norm", "norm"),
    "mlp.fc1": ("mlp/fc1", "linear"),
    "mlp.fc2": ("mlp/fc2", "linear"),
}


def vision_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIP config.json (a full ``clip`` config nests it)."""
    if hf.get("model_type") == "clip":
        return dict(hf.get("vision_config") or {})
    return hf


def canonical(name: str) -> str:
    return name


def arch_problems(hf: dict[str, Any]) -> list[str]:
    act = hf.get("hidden_act", "quick_gelu")
    if act not in ("gelu", "quick_gelu"):
        return [f"hidden_act={act!r} (supported: 'gelu', 'quick_gelu')"]
    return []


def block_map(depth: int) -> dict[str, tuple[str, str]]:
    out = {f"encoder.layers.{i}.{k}": (f"blocks_{i}/{p}", kind)
           for i in range(depth) for k, (p, kind) in _LAYER.items()}
    out["pre_layrnorm"] = ("embed_norm", "norm")
    out["post_layernorm"] = ("final_norm", "norm")
    return out


def embedding_names() -> dict[str, str]:
    return {
        "patch_weight": "embeddings.patch_embedding.weight",
        "cls": "embeddings.class_embedding",
        "pos": "embeddings.position_embedding.weight",
    }
