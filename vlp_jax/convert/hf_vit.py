"""Hugging Face ``ViTModel`` checkpoints: architecture check and tensor names for the item tower.

ViT's encoder layer is pre-LN (``x + Attn(LN(x))``, ``x + MLP(LN(x))``) with exact GELU and a
final LayerNorm over every token: exactly our ``pre_norm=True`` blocks and ``final_norm``, so
the layers map 1:1 (``vlp_jax.convert.hf_vision`` does the shared work: patch convolution,
positions, errors).  Names are matched in the layout ``save_pretrained`` writes (and the Hub
holds); transformers 5's in-memory names (``layers.i.attention.q_proj``, ``mlp.fc1``) are
renamed to it first, so a state dict taken from a live v5 model converts too.

=================================================  ===========================================
``embeddings.patch_embeddings.projection``         ``patch_embed/proj`` (conv -> linear)
``embeddings.cls_token`` / ``position_embeddings``  ``patch_embed/cls_token``, ``cls_pos``,
                                                   ``pos_embed`` (row 0 is the [CLS] position)
``embeddings.mask_token`` (when present)           ``patch_embed/mask_token``
``encoder.layer.i.attention.attention.{q,k,v}``    ``blocks_i/attn/{query,key,value}`` (.T)
``encoder.layer.i.attention.output.dense``         ``blocks_i/attn/out`` (.T)
``encoder.layer.i.layernorm_before`` / ``_after``  ``blocks_i/attn_norm`` / ``mlp_norm``
``encoder.layer.i.intermediate.dense``             ``blocks_i/mlp/fc1`` (.T)
``encoder.layer.i.output.dense``                   ``blocks_i/mlp/fc2`` (.T)
``layernorm``                                      ``final_norm``
=================================================  ===========================================

``pooler.dense`` (tanh pooler) and classifier heads are not part of the tower; they are listed
as ignored.  A checkpoint wrapped by a task model (``vit.`` prefix) is found by its patch
projection.
"""

from __future__ import annotations

import re
from typing import Any

MODEL_TYPES = ("vit",)
ANCHOR = "embeddings.patch_embeddings.projection.weight"
IGNORABLE = ("pooler.",)
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # google/vit-* preprocessor_config.json
DEFAULT_STD = (0.5, 0.5, 0.5)

_V5 = [  # transformers 5 module names -> saved (legacy) names, after "layers.i."
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]
_LAYER = {  # saved suffix under encoder.layer.i -> (our path under blocks_i, kind)
    "attention.attention.query": ("attn/query", "linear"),
    "attention.attention.key": ("attn/key", "linear"),
    "attention.attention.value": ("attn/value", "linear"),
    "attention.output.dense": ("attn/out", "linear"),
    "layernorm_before": ("attn_norm", "norm"),
    "layernorm_after": ("mlp_norm", "norm"),
    "intermediate.dense": ("mlp/fc1", "linear"),
    "output.dense": ("mlp/fc2", "linear"),
}


def canonical(name: str) -> str:
    """A tensor name in the saved layout (v5 in-memory names renamed; others unchanged)."""
    match = re.match(r"^(.*?)layers\.(\d+)\.(.*)$", name)
    if not match or ".layer." in name:
        return name
    prefix, index, rest = match.groups()
    for new, old in _V5:
        if rest.startswith(new):
            rest = old + rest[len(new):]
            break
    return f"{prefix}encoder.layer.{index}.{rest}"


def arch_problems(hf: dict[str, Any]) -> list[str]:
    """Settings our item tower cannot reproduce (empty list = supported)."""
    problems = []
    if hf.get("hidden_act", "gelu") not in ("gelu", "quick_gelu"):
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (supported: 'gelu', 'quick_gelu')")
    if not hf.get("qkv_bias", True):
        problems.append("qkv_bias=False (our attention always has query/key/value biases)")
    return problems


def block_map(depth: int) -> dict[str, tuple[str, str]]:
    """Saved name stem (without .weight/.bias) -> (our path, kind) for the transformer."""
    out = {f"encoder.layer.{i}.{k}": (f"blocks_{i}/{p}", kind)
           for i in range(depth) for k, (p, kind) in _LAYER.items()}
    out["layernorm"] = ("final_norm", "norm")
    return out


def embedding_names() -> dict[str, str]:
    """Roles of the embedding tensors (see ``hf_vision.map_vision_weights``)."""
    return {
        "patch_weight": "embeddings.patch_embeddings.projection.weight",
        "patch_bias": "embeddings.patch_embeddings.projection.bias",
        "cls": "embeddings.cls_token",
        "pos": "embeddings.position_embeddings",
        "mask_token": "embeddings.mask_token",
    }
