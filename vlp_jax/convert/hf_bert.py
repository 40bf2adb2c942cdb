"""Convert a Hugging Face BERT-family checkpoint folder into our text-encoder format.

Usage::

    python -m vlp_jax.convert.hf_bert --src=HF_MODEL_DIR --out=DIR [--overwrite]

Reads ``config.json`` and ``model.safetensors`` (or a sharded ``model.safetensors.index.json``;
``pytorch_model.bin`` only when torch is importable) with the safetensors *numpy* API, so
conversion needs neither torch nor a GPU.  Writes into ``DIR`` (see ``text_encoder`` for the
layout): Orbax params of :class:`vlp_jax.models.text.TextTransformer` in BERT's post-LN layout,
the tokenizer (``save_pretrained``) and ``text_encoder.json`` with the architecture.  ``DIR`` is
written as a temporary sibling and renamed at the end, so an interrupted conversion never leaves a
folder that looks complete.

Every problem is reported at once, by name: an unsupported architecture (model type, activation,
position embedding type), tensors that are missing, unexpected, or of the wrong shape.  Silently
skipping a tensor would give an encoder that runs and computes the wrong thing.

Mapping (HF ``torch.nn.Linear`` weights are [out, in]; our Dense kernels are [in, out]):

================================================  ======================================
``embeddings.word_embeddings.weight``             ``token_embed/embedding``
``embeddings.position_embeddings.weight``         ``pos_embed``
``embeddings.token_type_embeddings.weight``       ``type_embed``
``embeddings.LayerNorm.{weight,bias}``            ``embed_norm/{scale,bias}``
``encoder.layer.i.attention.self.{q,k,v}``        ``blocks_i/attn/{query,key,value}`` (.T)
``encoder.layer.i.attention.output.dense``        ``blocks_i/attn/out`` (.T)
``encoder.layer.i.attention.output.LayerNorm``    ``blocks_i/attn_norm``
``encoder.layer.i.intermediate.dense``            ``blocks_i/mlp/fc1`` (.T)
``encoder.layer.i.output.dense``                  ``blocks_i/mlp/fc2`` (.T)
``encoder.layer.i.output.LayerNorm``              ``blocks_i/mlp_norm``
================================================  ======================================

The pooler, ``position_ids`` buffers and task heads outside the encoder (``cls.*``, classifiers)
are not part of a text encoder; they are listed under ``ignored_tensors`` in the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np

from vlp_jax.convert import hf_tokenizer
from vlp_jax.convert.text_encoder import (
    ARCH_FILE,
    FORMAT,
    PARAMS_DIR,
    TOKENIZER_DIR,
    TextEncoder,
    load_text_encoder,
    read_arch,
)

__all__ = [
    "TextEncoder", "bert_arch", "convert", "load_hf_tensors", "load_text_encoder",
    "map_bert_weights", "read_arch",
]

SUPPORTED_MODEL_TYPES = ("bert",)
_EMBED_KEY = "embeddings.word_embeddings.weight"
_LAYER_MAP = {  # HF suffix under encoder.layer.i -> (our path under blocks_i, is_linear)
    "attention.self.query": ("attn/query", True),
    "attention.self.key": ("attn/key", True),
    "attention.self.value": ("attn/value", True),
    "attention.output.dense": ("attn/out", True),
    "attention.output.LayerNorm": ("attn_norm", False),
    "intermediate.dense": ("mlp/fc1", True),
    "output.dense": ("mlp/fc2", True),
    "output.LayerNorm": ("mlp_norm", False),
}


# ---------------------------------------------------------------------- architecture
def bert_arch(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Validate an HF ``config.json`` dict and return our architecture dict.

    Raises ValueError naming every unsupported setting (model type, architectures, activation,
    position embeddings, decoder use, head split).
    """
    problems = []
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (supported: {list(SUPPORTED_MODEL_TYPES)})")
    bad_arch = [a for a in hf_config.get("architectures") or [] if not a.startswith("Bert")]
    if bad_arch:
        problems.append(f"architectures {bad_arch} (supported: Bert*)")
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        problems.append(f"hidden_act={act!r} (only exact 'gelu' is implemented)")
    pos = hf_config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        problems.append(f"position_embedding_type={pos!r} (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf_config.get(flag):
            problems.append(f"{flag}=True (encoders only)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf_config]
    if missing:
        problems.append(f"config.json lacks {missing}")
    elif hf_config["hidden_size"] % hf_config["num_attention_heads"]:
        problems.append(f"hidden_size={hf_config['hidden_size']} not divisible by "
                        f"num_attention_heads={hf_config['num_attention_heads']}")
    if problems:
        raise ValueError("unsupported architecture: " + "; ".join(problems))
    return {
        "model_type": model_type,
        "vocab_size": int(hf_config["vocab_size"]),
        "width": int(hf_config["hidden_size"]),
        "depth": int(hf_config["num_hidden_layers"]),
        "num_heads": int(hf_config["num_attention_heads"]),
        "mlp_dim": int(hf_config["intermediate_size"]),
        "max_len": int(hf_config.get("max_position_embeddings", 512)),
        "num_types": int(hf_config.get("type_vocab_size", 2)),
        "layer_norm_eps": float(hf_config.get("layer_norm_eps", 1e-12)),
        "pre_norm": False,
    }


# ---------------------------------------------------------------------- tensors
def tensor_problems(missing: list[str], bad_shape: list[str], unexpected: list[str]
                    ) -> list[str]:
    """The parts of a "checkpoint does not match its config" message (shared by the text and
    image converters), every bad tensor named."""
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if bad_shape:
        problems.append(f"shape mismatches [{'; '.join(bad_shape)}]")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    return problems


def load_hf_tensors(src: str) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in ``src`` as float32/int numpy arrays (no torch needed)."""
    from safetensors.numpy import load_file

    single = os.path.join(src, "model.safetensors")
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(single):
        return dict(load_file(single))
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(load_file(os.path.join(src, shard)))
        return out
    binary = os.path.join(src, "pytorch_model.bin")
    if os.path.isfile(binary):
        try:
            import torch
        except ImportError as e:
            raise ValueError(
                f"{src!r} has only pytorch_model.bin, which needs torch to read; install torch or "
                "save the model as model.safetensors"
            ) from e
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in state.items()}
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                     f"in {src!r}")


def _canonical(name: str) -> str:
    """Old TF-ported checkpoints call LayerNorm params gamma/beta."""
    if ".LayerNorm." in name:
        name = name.replace(".LayerNorm.gamma", ".LayerNorm.weight")
        name = name.replace(".LayerNorm.beta", ".LayerNorm.bias")
    return name


def _expected(arch: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """HF name (without prefix) -> (HF shape, our '/'-path, transpose?)."""
    w, m = arch["width"], arch["mlp_dim"]
    exp = {
        "embeddings.word_embeddings.weight": ((arch["vocab_size"], w), "token_embed/embedding",
                                              False),
        "embeddings.position_embeddings.weight": ((arch["max_len"], w), "pos_embed", False),
        "embeddings.token_type_embeddings.weight": ((arch["num_types"], w), "type_embed", False),
        "embeddings.LayerNorm.weight": ((w,), "embed_norm/scale", False),
        "embeddings.LayerNorm.bias": ((w,), "embed_norm/bias", False),
    }
    out_dims = {"intermediate.dense": m}
    in_dims = {"output.dense": m}
    for i in range(arch["depth"]):
        for suffix, (path, linear) in _LAYER_MAP.items():
            hf = f"encoder.layer.{i}.{suffix}"
            ours = f"blocks_{i}/{path}"
            if linear:
                shape = (out_dims.get(suffix, w), in_dims.get(suffix, w))
                exp[f"{hf}.weight"] = (shape, f"{ours}/kernel", True)
                exp[f"{hf}.bias"] = ((shape[0],), f"{ours}/bias", False)
            else:
                exp[f"{hf}.weight"] = ((w,), f"{ours}/scale", False)
                exp[f"{hf}.bias"] = ((w,), f"{ours}/bias", False)
    return exp


def _is_ignorable(rest: str) -> bool:
    return rest.startswith("pooler.") or rest == "embeddings.position_ids"


def map_bert_weights(
    tensors: dict[str, np.ndarray], arch: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """HF tensors -> (our nested float32 param dict, names of ignored tensors).

    Accepts bare ``BertModel`` names and prefixed ones (``bert.`` in ``BertForMaskedLM`` etc.).
    Raises ValueError listing every missing, unexpected or wrongly shaped tensor.
    """
    tensors = {_canonical(k): v for k, v in tensors.items()}
    roots = [k[: -len(_EMBED_KEY)] for k in tensors if k.endswith(_EMBED_KEY)]
    if len(roots) != 1:
        sample = sorted(tensors)[:8]
        raise ValueError(
            f"expected exactly one '*{_EMBED_KEY}' tensor, found {len(roots)} "
            f"({sorted(roots)}); not a BERT checkpoint? first tensors: {sample}"
        )
    prefix = roots[0]
    expected = _expected(arch)
    params: dict[str, Any] = {}
    ignored, unexpected, bad_shape = [], [], []
    for name in sorted(tensors):
        if not name.startswith(prefix):
            ignored.append(name)  # task heads outside the encoder (cls.*, classifier, ...)
            continue
        rest = name[len(prefix):]
        if rest not in expected:
            (ignored if _is_ignorable(rest) else unexpected).append(name)
            continue
        shape, path, transpose = expected[rest]
        value = np.asarray(tensors[name])
        if tuple(value.shape) != shape:
            bad_shape.append(f"{name}: expected {shape}, got {tuple(value.shape)}")
            continue
        value = value.astype(np.float32)
        node = params
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value.T if transpose else value)
    missing = sorted(prefix + k for k in expected if prefix + k not in tensors)
    problems = tensor_problems(missing, bad_shape, unexpected)
    if problems:
        raise ValueError(
            f"checkpoint does not match its config.json (width {arch['width']}, depth "
            f"{arch['depth']}, heads {arch['num_heads']}, mlp {arch['mlp_dim']}, vocab "
            f"{arch['vocab_size']}): " + "; ".join(problems)
        )
    return params, ignored


# ---------------------------------------------------------------------- writing
def _max_seq_length(src: str, tokenizer: Any, arch: dict[str, Any]) -> int:
    """Truncation length for ``encode``: sentence-transformers' setting when the folder has it."""
    st = os.path.join(src, "sentence_bert_config.json")
    if os.path.isfile(st):
        with open(st) as f:
            value = json.load(f).get("max_seq_length")
        if value:
            return min(int(value), arch["max_len"])
    model_max = getattr(tokenizer, "model_max_length", None) or arch["max_len"]
    return int(min(model_max, arch["max_len"]))


def convert(src: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Convert the HF folder ``src`` into ``out`` (atomically); returns the written arch dict."""
    import orbax.checkpoint as ocp

    src, out = os.path.abspath(src), os.path.abspath(out)
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{src!r} has no config.json: not a Hugging Face model folder")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out!r} already exists; pass --overwrite to replace it")
    with open(config_path) as f:
        arch = bert_arch(json.load(f))
    params, ignored = map_bert_weights(load_hf_tensors(src), arch)
    tok = hf_tokenizer.load_hf_tokenizer(src)
    hf_tokenizer.check_tokenizer(tok, arch["vocab_size"], src)
    arch.update(
        format=FORMAT,
        source=src,
        max_seq_length=_max_seq_length(src, tok, arch),
        pooling="mean",
        normalize=True,
        ignored_tensors=ignored,
    )
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        tok.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        with open(os.path.join(tmp, ARCH_FILE), "w") as f:
            json.dump(arch, f, indent=2)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    flags_ = flags.FLAGS
    if not flags_["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    try:
        arch = convert(flags_.src, flags_.out, overwrite=flags_.overwrite)
    except (ValueError, FileExistsError) as e:  # a user error: the message, not a traceback
        sys.exit(f"error: {e}")
    summary = {k: arch[k] for k in ("vocab_size", "width", "depth", "num_heads", "mlp_dim",
                                    "max_len", "layer_norm_eps", "max_seq_length")}
    print(f"wrote {os.path.abspath(flags_.out)}: {json.dumps(summary)}")
    if arch["ignored_tensors"]:
        print(f"ignored (not part of the encoder): {arch['ignored_tensors']}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("src", None, "Hugging Face model folder (config.json + weights).")
    flags.DEFINE_string("out", None, "Output folder for the converted text encoder.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.mark_flags_as_required(["src", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
