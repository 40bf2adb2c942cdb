"""Produce the ViT / CLIP-vision parity data: two tiny random checkpoints and their outputs.

Run ONCE, with the reference implementation (torch + transformers), in an environment separate
from the project's (the project and its tests never need torch)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/torchenv/bin/python tests/data/make_vision_reference.py

Writes, under tests/data/:

* ``vit_tiny/`` — ``ViTModel`` (with ``mask_token``) saved by ``save_pretrained``, plus a
  ``preprocessor_config.json`` with ImageNet mean/std (as DeiT uses), so the import must fold a
  normalisation that is not ours into the patch layer;
* ``clip_vision_tiny/`` — ``CLIPVisionModel`` (quick_gelu, pre-/post-LayerNorm) without a
  preprocessor file, so the importer's CLIP default mean/std are exercised;
* ``vision_reference.npz`` — fixed uint8 images and, per model, ``last_hidden_state`` and
  ``pooler_output`` from the eager forward pass (and, for CLIP, ``post_layernorm`` applied to
  every token, which is what the imported tower's ``final_norm`` computes).

Every parameter (LayerNorms included) is randomised with a fixed seed: HF's init leaves the
norms at 1/0 and biases at 0, which would hide a wrong mapping of exactly those tensors.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE, PATCH = 32, 8
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: LayerNorm scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if name in norms else 0.3 * noise)


def _pixels(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the checkpoint's normalised NCHW float32 input."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=HERE)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = {"images": images}

    vit_cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu", layer_norm_eps=1e-12,
    )
    vit = transformers.ViTModel(vit_cfg, use_mask_token=True).eval()
    _randomise(vit, 1)
    vit_dir = os.path.join(args.out_dir, "vit_tiny")
    vit.save_pretrained(vit_dir)
    with open(os.path.join(vit_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_normalize": True,
                   "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}, f, indent=2)
    with torch.no_grad():
        res = vit(pixel_values=_pixels(images, IMAGENET_MEAN, IMAGENET_STD))
    out["vit_hidden"] = res.last_hidden_state.numpy()
    out["vit_pooled"] = res.pooler_output.numpy()

    clip_cfg = transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    clip = transformers.CLIPVisionModel(clip_cfg).eval()
    _randomise(clip, 2)
    clip_dir = os.path.join(args.out_dir, "clip_vision_tiny")
    clip.save_pretrained(clip_dir)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # processor defaults

    with torch.no_grad():
        res = clip(pixel_values=_pixels(images, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)))
        normed = clip.post_layernorm(res.last_hidden_state)
    out["clip_hidden"] = res.last_hidden_state.numpy()
    out["clip_pooled"] = res.pooler_output.numpy()
    out["clip_hidden_post_ln"] = normed.numpy()
    out["versions"] = np.asarray([f"torch {torch.__version__}",
                                  f"transformers {transformers.__version__}"])
    path = os.path.join(args.out_dir, "vision_reference.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {vit_dir}, {clip_dir}, {path}")


if __name__ == "__main__":
    main()
