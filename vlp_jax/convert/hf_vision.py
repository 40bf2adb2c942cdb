"""Read a Hugging Face ViT / CLIP-vision folder and map it onto the item tower's image path.

Input: a local folder with ``config.json`` and ``model.safetensors`` (or a sharded index), plus
``preprocessor_config.json`` when present; read with the safetensors *numpy* API (no torch, no
hub access).  Output: float32 arrays keyed by our param paths, in two groups —
``patch_embed`` (``proj/{kernel,bias}``, ``pos_embed``, ``cls_token``, ``cls_pos``, optionally
``mask_token``) and ``tower`` (``blocks_i/...``, ``final_norm``, CLIP's ``embed_norm``).
The per-family names live in ``hf_vit`` and ``hf_clip_vision``.

Three conversions are not plain copies:

* **Patch convolution -> linear layer.**  The conv weight is [W, C, P, P]; our pipeline flattens
  each patch as (py, px, c) (docs/architecture.md "Batches"), so the kernel is
  ``weight.transpose(2, 3, 1, 0).reshape(P*P*C, W)``.
* **Pixel normalisation folded in.**  Our pixels are ``x = 2p - 1`` (p in [0, 1]); the checkpoint
  was trained on ``z_c = (p - mean_c) / std_c = x / (2 std_c) + (0.5 - mean_c) / std_c``.  So
  channel c of the kernel is divided by ``2 std_c`` and the bias gains
  ``sum_c (0.5 - mean_c) / std_c * sum_{py,px} weight[:, c]``: the imported layer computes on our
  pixels exactly what the checkpoint computed on its own (ViT's 0.5/0.5 makes this the identity;
  CLIP's mean/std do not).  mean/std come from ``preprocessor_config.json``, else the family's
  published defaults.
* **Positions.**  Row 0 of the checkpoint's table is the [CLS] position; the other rows form its
  g0 x g0 grid.  When our grid (image_size / patch_size) differs, the grid is resized with
  bicubic interpolation (as timm and HF's ``interpolate_pos_encoding`` do); [CLS] is kept.

Every problem is reported at once, by name: unsupported settings, missing / unexpected /
mis-shaped tensors.  Silently skipping a tensor would give a tower that runs and computes
something else.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vlp_jax.convert import hf_clip_vision, hf_vit
from vlp_jax.convert.hf_bert import load_hf_tensors, tensor_problems

FAMILIES = {"vit": hf_vit, "clip": hf_clip_vision}


def _family(model_type: Any) -> str | None:
    for name, module in FAMILIES.items():
        if model_type in module.MODEL_TYPES:
            return name
    return None


def vision_arch(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate an HF config dict (ViT, CLIP vision, or full CLIP) and return our arch dict."""
    family = _family(hf.get("model_type"))
    if family is None:
        supported = [t for m in FAMILIES.values() for t in m.MODEL_TYPES]
        raise ValueError(f"unsupported image checkpoint: model_type={hf.get('model_type')!r} "
                         f"(supported: {supported})")
    module = FAMILIES[family]
    if family == "clip":
        hf = hf_clip_vision.vision_config(hf)
    problems = module.arch_problems(hf)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "patch_size", "image_size")
    missing = [k for k in keys if k not in hf]
    if missing:
        problems.append(f"config.json lacks {missing}")
    else:
        if hf["hidden_size"] % hf["num_attention_heads"]:
            problems.append(f"hidden_size={hf['hidden_size']} not divisible by "
                            f"num_attention_heads={hf['num_attention_heads']}")
        if hf["image_size"] % hf["patch_size"]:
            problems.append(f"image_size={hf['image_size']} not divisible by "
                            f"patch_size={hf['patch_size']}")
    if hf.get("num_channels", 3) != 3:
        problems.append(f"num_channels={hf['num_channels']} (our images are RGB)")
    if problems:
        raise ValueError("unsupported image checkpoint: " + "; ".join(problems))
    pre = preprocessor or {}
    mean = pre.get("image_mean", module.DEFAULT_MEAN) if pre.get("do_normalize", True) else 0.0
    std = pre.get("image_std", module.DEFAULT_STD) if pre.get("do_normalize", True) else 1.0
    mean, std = np.broadcast_to(mean, 3).tolist(), np.broadcast_to(std, 3).tolist()
    if min(std) <= 0:
        raise ValueError(f"preprocessor image_std={std} must be > 0")
    return {
        "family": family,
        "width": int(hf["hidden_size"]),
        "depth": int(hf["num_hidden_layers"]),
        "num_heads": int(hf["num_attention_heads"]),
        "mlp_dim": int(hf["intermediate_size"]),
        "patch_size": int(hf["patch_size"]),
        "grid": int(hf["image_size"]) // int(hf["patch_size"]),
        "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-12 if family == "vit" else 1e-5)),
        "activation": hf.get("hidden_act", "gelu" if family == "vit" else "quick_gelu"),
        "embed_norm": family == "clip",
        "image_mean": [float(v) for v in mean],
        "image_std": [float(v) for v in std],
    }


def read_vision_arch(src: str) -> dict[str, Any]:
    """``vision_arch`` of the folder ``src`` (config.json + optional preprocessor_config.json)."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model.image_init={src!r} has no config.json: not a Hugging Face "
                         "model folder")
    with open(path) as f:
        hf = json.load(f)
    pre_path = os.path.join(src, "preprocessor_config.json")
    pre = None
    if os.path.isfile(pre_path):
        with open(pre_path) as f:
            pre = json.load(f)
    return vision_arch(hf, pre)


def patch_linear(weight: np.ndarray, bias: np.ndarray | None, mean: Any, std: Any
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight [W, C, P, P] (+ bias) -> our (kernel [P*P*C, W], bias [W]), float64,
    with the checkpoint's pixel normalisation folded in (module docstring)."""
    w = np.asarray(weight, np.float64)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scaled = w / (2.0 * std)[None, :, None, None]
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    b = b + np.einsum("ocyx,c->o", w, (0.5 - mean) / std)
    kernel = scaled.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    return kernel, b


def resize_positions(grid_pos: np.ndarray, grid: int) -> np.ndarray:
    """[g0*g0, W] row-major grid positions -> [grid*grid, W] (bicubic; unchanged if equal)."""
    import jax

    g0 = int(round(np.sqrt(grid_pos.shape[0])))
    if g0 * g0 != grid_pos.shape[0]:
        raise ValueError(f"checkpoint positions form no square grid ({grid_pos.shape[0]} rows)")
    if g0 == grid:
        return np.asarray(grid_pos)
    width = grid_pos.shape[1]
    table = np.asarray(grid_pos, np.float32).reshape(g0, g0, width)
    resized = jax.image.resize(table, (grid, grid, width), method="bicubic")
    return np.asarray(resized, np.float32).reshape(grid * grid, width)


def _expected(arch: dict[str, Any], module: Any) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Saved name (no prefix) -> (shape, our path, kind) for the transformer tensors."""
    w, m = arch["width"], arch["mlp_dim"]
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for stem, (path, kind) in module.block_map(arch["depth"]).items():
        if kind == "norm":
            out[f"{stem}.weight"] = ((w,), f"{path}/scale", "copy")
            out[f"{stem}.bias"] = ((w,), f"{path}/bias", "copy")
            continue
        shape = (m, w) if path.endswith("fc1") else (w, m) if path.endswith("fc2") else (w, w)
        out[f"{stem}.weight"] = (shape, f"{path}/kernel", "transpose")
        out[f"{stem}.bias"] = ((shape[0],), f"{path}/bias", "copy")
    return out


def _embedding_shapes(arch: dict[str, Any], family: str) -> dict[str, tuple[int, ...]]:
    w, p, n = arch["width"], arch["patch_size"], arch["grid"] ** 2 + 1
    vit = family == "vit"
    shapes = {
        "patch_weight": (w, 3, p, p),
        "cls": (1, 1, w) if vit else (w,),
        "pos": (1, n, w) if vit else (n, w),
    }
    if vit:
        shapes.update(patch_bias=(w,), mask_token=(1, 1, w))
    return shapes


def map_vision_weights(
    tensors: dict[str, np.ndarray], arch: dict[str, Any], grid: int | None = None
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """HF tensors -> ({"patch_embed": {path: array}, "tower": {path: array}}, ignored names).

    ``grid``: our patch grid side (default: the checkpoint's).  Arrays are float32.  Raises
    ValueError listing every missing, unexpected or wrongly shaped tensor.
    """
    family = arch["family"]
    module = FAMILIES[family]
    tensors = {module.canonical(k): v for k, v in tensors.items()}
    roots = [k[: -len(module.ANCHOR)] for k in tensors if k.endswith(module.ANCHOR)]
    if len(roots) != 1:
        raise ValueError(
            f"expected exactly one '*{module.ANCHOR}' tensor, found {len(roots)} "
            f"({sorted(roots)}); not a {family} checkpoint? first tensors: {sorted(tensors)[:8]}"
        )
    prefix = roots[0]
    blocks = _expected(arch, module)
    roles = module.embedding_names()
    shapes = _embedding_shapes(arch, family)
    by_name = {name: role for role, name in roles.items()}
    tower: dict[str, np.ndarray] = {}
    found: dict[str, np.ndarray] = {}
    ignored, unexpected, bad_shape = [], [], []
    for name in sorted(tensors):
        if not name.startswith(prefix):
            ignored.append(name)  # heads and other halves (classifier, CLIP text model, ...)
            continue
        rest, value = name[len(prefix):], np.asarray(tensors[name])
        if rest in blocks:
            shape, path, kind = blocks[rest]
        elif rest in by_name:
            shape, path, kind = shapes[by_name[rest]], by_name[rest], "embedding"
        else:
            ignorable = rest.startswith(module.IGNORABLE) or rest == "embeddings.position_ids"
            (ignored if ignorable else unexpected).append(name)
            continue
        if tuple(value.shape) != shape:
            bad_shape.append(f"{name}: expected {shape}, got {tuple(value.shape)}")
            continue
        value = value.astype(np.float32)
        if kind == "embedding":
            found[path] = value
        else:
            tower[path] = np.ascontiguousarray(value.T if kind == "transpose" else value)
    required = [prefix + k for k in blocks] + [prefix + roles[r] for r in roles if r in shapes
                                               and r != "mask_token"]
    missing = sorted(n for n in required if n not in tensors)
    problems = tensor_problems(missing, bad_shape, unexpected)
    if problems:
        raise ValueError(
            f"{family} checkpoint does not match its config.json (width {arch['width']}, depth "
            f"{arch['depth']}, heads {arch['num_heads']}, mlp {arch['mlp_dim']}, patch "
            f"{arch['patch_size']}, grid {arch['grid']}): " + "; ".join(problems)
        )
    kernel, bias = patch_linear(found["patch_weight"], found.get("patch_bias"),
                                arch["image_mean"], arch["image_std"])
    pos = found["pos"].reshape(-1, arch["width"])
    patch = {
        "proj/kernel": kernel.astype(np.float32),
        "proj/bias": bias.astype(np.float32),
        "cls_token": found["cls"].reshape(-1),
        "cls_pos": pos[0],
        "pos_embed": resize_positions(pos[1:], grid or arch["grid"]),
    }
    if "mask_token" in found:
        patch["mask_token"] = found["mask_token"].reshape(-1)
    return {"patch_embed": patch, "tower": tower}, ignored


def load_vision_checkpoint(src: str, grid: int | None = None
                           ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], list[str]]:
    """(arch, mapped weights, ignored tensor names) of the HF folder ``src``."""
    arch = read_vision_arch(src)
    mapped, ignored = map_vision_weights(load_hf_tensors(src), arch, grid)
    return arch, mapped, ignored
