"""A converted text encoder on its own: read the folder, embed sentences.

Folder layout written by ``vlp_jax.convert.hf_bert``::

    DIR/text_encoder.json   architecture (vocab_size, width, depth, num_heads, mlp_dim, max_len,
                            num_types, layer_norm_eps, pre_norm, max_seq_length, ...)
    DIR/params/             Orbax checkpoint of the TextTransformer params (float32)
    DIR/tokenizer/          the checkpoint's tokenizer (save_pretrained)

``TextEncoder.encode`` gives what users expect from a sentence-embedding checkpoint: the last
hidden state mean-pooled over real tokens (attention-mask weighted) and L2-normalised, float32.
Shapes are bucketed (batch and length rounded up to powers of two, length capped at
``max_seq_length``) so a stream of differently sized requests compiles a handful of programs,
not one per request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlp_jax.models.text import TextTransformer, l2_normalize, masked_mean_pool

FORMAT = "vlp_jax.text_encoder/1"
ARCH_FILE = "text_encoder.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
_MIN_LEN = 8


def read_arch(directory: str) -> dict[str, Any]:
    """The architecture JSON of a converted folder; ValueError if it is not one."""
    path = os.path.join(directory, ARCH_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"{directory!r} is not a converted text encoder (no {ARCH_FILE}); create one with "
            "`python -m vlp_jax.convert.hf_bert --src=HF_MODEL_DIR --out=DIR`"
        )
    with open(path) as f:
        arch = json.load(f)
    if arch.get("format") != FORMAT:
        raise ValueError(f"{path!r} has format {arch.get('format')!r}, expected {FORMAT!r}")
    return arch


def restore_params(directory: str) -> dict[str, Any]:
    """The converted TextTransformer params as a nested dict of float32 numpy arrays."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(os.path.abspath(os.path.join(directory, PARAMS_DIR)))
    finally:
        checkpointer.close()
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def text_module(arch: dict[str, Any]) -> TextTransformer:
    """The TextTransformer that the converted params belong to."""
    return TextTransformer(
        vocab_size=arch["vocab_size"], width=arch["width"], depth=arch["depth"],
        num_heads=arch["num_heads"], mlp_ratio=max(arch["mlp_dim"] // arch["width"], 1),
        mlp_dim=arch["mlp_dim"], max_len=arch["max_len"], num_types=arch["num_types"],
        pre_norm=arch["pre_norm"], layer_norm_eps=arch["layer_norm_eps"],
    )


def _bucket(n: int, cap: int) -> int:
    return min(max(_MIN_LEN, 1 << max(n - 1, 0).bit_length()), cap)


class TextEncoder:
    """Sentence embeddings from a converted checkpoint (see module docstring)."""

    def __init__(self, directory: str):
        from vlp_jax.data import tokenizer as tokenizer_lib

        self.directory = os.path.abspath(directory)
        self.arch = read_arch(self.directory)
        self.tokenizer = tokenizer_lib.load_tokenizer(os.path.join(self.directory, TOKENIZER_DIR))
        self.max_length = int(self.arch["max_seq_length"])
        self.module = text_module(self.arch)
        self.params = jax.device_put(restore_params(self.directory))

        def hidden(params, tokens, mask):
            return self.module.apply({"params": params}, tokens, mask)

        def embed(params, tokens, mask):
            return l2_normalize(masked_mean_pool(hidden(params, tokens, mask), mask))

        self._hidden, self._embed = jax.jit(hidden), jax.jit(embed)

    @property
    def dim(self) -> int:
        return int(self.arch["width"])

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, bool mask) [n, L]: truncated at ``max_seq_length``, padded to a bucket."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; items {bad[:10]} are not")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        length = _bucket(max((len(x) for x in ids), default=1), self.max_length)
        tokens = np.full((len(ids), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(ids), length), bool)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = x
            mask[row, : len(x)] = True
        return tokens, mask

    def _run(self, fn, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n = tokens.shape[0]
        rows = 1 << max(n - 1, 0).bit_length()  # batch bucket; padding rows are all-padding
        if rows > n:
            tokens = np.concatenate([tokens, np.zeros((rows - n, tokens.shape[1]), np.int32)])
            mask = np.concatenate([mask, np.zeros((rows - n, mask.shape[1]), bool)])
        return np.asarray(fn(self.params, jnp.asarray(tokens), jnp.asarray(mask)), np.float32)[:n]

    def hidden_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(last hidden state float32 [n, L, W], bool mask [n, L]) of one padded batch."""
        tokens, mask = self.tokenize(texts)
        return self._run(self._hidden, tokens, mask), mask

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings, float32 [len(texts), width], in input order.

        Texts are sorted by length before batching so each batch pads to its own bucket.
        """
        if isinstance(texts, str):
            raise ValueError("encode takes a list of strings, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            tokens, mask = self.tokenize([texts[i] for i in rows])
            out[rows] = self._run(self._embed, tokens, mask)
        return out


def load_text_encoder(directory: str) -> TextEncoder:
    """Load a folder written by ``python -m vlp_jax.convert.hf_bert``."""
    return TextEncoder(directory)
