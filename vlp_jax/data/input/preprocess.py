"""Pure-numpy preprocessing shared by training, evaluation and serving.

Everything that turns a raw record (text, uint8 image) into model inputs lives here, so the
Grain training pipeline, the eval iterators and the serving code produce *bit-identical* arrays
for the same input.  Nothing here touches JAX: the functions run inside Grain worker processes.

Randomness (MLM and patch masking) is drawn from one ``np.random.Generator`` per record, which
the caller derives from ``(seed, record position)`` with :func:`record_rng`.  Masks therefore do
not depend on the batch a record lands in, the number of processes, or the number of workers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Separates the masking random stream from any other stream derived from the same seed.
_MASKING_STREAM = 0x4D41534B  # "MASK"


def as_str(value: Any) -> str:
    """Return a record text field as ``str`` (TFDS data sources may yield bytes or 0-d arrays)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise ValueError(f"expected a text field (str or bytes), got {type(value).__name__}")
    return value


def query_hash(text: str) -> int:
    """Stable non-negative int32 id of a query text (crc32 of the whitespace/case-folded text).

    Python's ``hash`` is salted per process, so it cannot identify duplicate queries across
    Grain workers or hosts; crc32 is stable everywhere.
    """
    canonical = " ".join(text.casefold().split())
    return zlib.crc32(canonical.encode("utf-8")) & 0x7FFFFFFF


def record_rng(seed: int, position: int) -> np.random.Generator:
    """Per-record generator for masking, a pure function of ``(seed, global record position)``."""
    return np.random.default_rng([int(seed), _MASKING_STREAM, int(position)])


# ----------------------------------------------------------------------------- text


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(cls, sep, pad) ids, with a clear error when the tokenizer lacks one of them."""
    ids = {}
    for name in ("cls", "sep", "pad"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is None:
            raise ValueError(
                f"tokenizer has no [{name.upper()}] token; a BERT-style vocab is needed")
        ids[name] = int(value)
    return ids["cls"], ids["sep"], ids["pad"]


def encode_texts(
    tokenizer: Any, texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``texts`` to ``[CLS] ids… [SEP]`` padded/truncated to exactly ``max_len``.

    Returns ``(tokens int32 [B, max_len], mask bool [B, max_len])`` where ``mask`` marks
    non-padding positions.  Truncation and padding are done here rather than by the tokenizer
    call so the fast tokenizer's internal state is never mutated (mutating it from Grain's reader
    threads raises "Already borrowed").
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
    texts = [as_str(t) for t in texts]
    cls_id, sep_id, pad_id = _special_ids(tokenizer)
    tokens = np.full((len(texts), max_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    if not texts:
        return tokens, mask
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: the same ids as the call below (which runs this
        # ``encode_batch`` after clearing truncation and padding, unset here anyway), without
        # transformers' per-text Python around it — half the cost of a serving batch's
        # tokenisation.
        encoded = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        encoded = tokenizer(
            list(texts), add_special_tokens=False, truncation=False, padding=False,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
    for row, ids in enumerate(encoded):
        ids = ids[: max_len - 2]
        n = len(ids) + 2
        tokens[row, 0] = cls_id
        tokens[row, 1 : n - 1] = ids
        tokens[row, n - 1] = sep_id
        mask[row, :n] = True
    return tokens, mask


def mlm_vocab(tokenizer: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """``(mask_id, special_ids, replacement_ids)`` for :func:`mlm_mask`.

    Replacement ids (BERT's "10% random token") exclude special tokens so the model is never asked
    to recover an original word from a spurious [CLS]/[SEP]/[PAD].
    """
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("tokenizer has no [MASK] token; MLM masking needs one")
    special = np.asarray(sorted(set(int(i) for i in tokenizer.all_special_ids)), dtype=np.int32)
    replacement = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int32), special)
    if replacement.size == 0:
        raise ValueError("tokenizer vocabulary has no non-special tokens")
    return int(mask_id), special, replacement


def mlm_max_predictions(length: int, max_fraction: float) -> int:
    """Cap on MLM predictions per sequence: ``ceil(max_fraction * length)``, in [1, length].

    BERT's ``max_predictions_per_seq``: with a static cap the model computes vocabulary logits
    at the (at most) ``cap`` selected positions only, instead of at every position — the
    [B, L, V] logits and their softmax were the largest tensors of the train step.
    """
    if not 0.0 < max_fraction <= 1.0:
        raise ValueError(f"MLM max fraction must be in (0, 1], got {max_fraction}")
    return max(1, min(length, math.ceil(max_fraction * length - 1e-9)))


def mlm_mask(
    tokens: np.ndarray,
    mask: np.ndarray,
    rngs: Sequence[np.random.Generator],
    *,
    mlm_prob: float,
    mask_id: int,
    special_ids: np.ndarray,
    replacement_ids: np.ndarray,
    max_predictions: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking of a token batch, one generator per row.

    Each non-special, non-padding token is selected independently with probability ``mlm_prob``;
    a selected token becomes [MASK] with prob. 0.8, a random non-special token with prob. 0.1 and
    stays unchanged with prob. 0.1.  With ``max_predictions`` a row keeps at most that many
    selections (those with the smallest selection draws; the others stay untouched and
    unweighted), so the model may gather a fixed number of positions per row.  Returns
    ``(mlm_tokens int32, targets int32, weights float32)`` with ``targets`` = the original ids
    everywhere and ``weights`` = 1.0 at selected positions.
    """
    if not 0.0 <= mlm_prob <= 1.0:
        raise ValueError(f"mlm_prob must be in [0, 1], got {mlm_prob}")
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim != 2 or tokens.shape != np.shape(mask):
        raise ValueError(f"tokens and mask must be [B, L] of equal shape, got {tokens.shape}, "
                         f"{np.shape(mask)}")
    if len(rngs) != tokens.shape[0]:
        raise ValueError(
            f"need one generator per row: {len(rngs)} generators, {tokens.shape[0]} rows")
    batch, length = tokens.shape
    uniforms = np.empty((batch, 2, length), dtype=np.float64)
    picks = np.empty((batch, length), dtype=np.int64)
    for row, rng in enumerate(rngs):
        uniforms[row] = rng.random((2, length))
        picks[row] = rng.integers(0, replacement_ids.size, size=length)
    eligible = np.asarray(mask, dtype=bool) & ~np.isin(tokens, special_ids)
    selected = eligible & (uniforms[:, 0] < mlm_prob)
    if max_predictions is not None and max_predictions < length:
        draws = np.where(selected, uniforms[:, 0], np.inf)
        rank = np.argsort(np.argsort(draws, axis=1, kind="stable"), axis=1, kind="stable")
        selected &= rank < max_predictions
    action = uniforms[:, 1]
    out = tokens.copy()
    out[selected & (action < 0.8)] = mask_id
    randomise = selected & (action >= 0.8) & (action < 0.9)
    out[randomise] = replacement_ids[picks[randomise]]
    return out, tokens.copy(), selected.astype(np.float32)


# ----------------------------------------------------------------------------- images

# (x/255 - 0.5)/0.5 for every uint8 value, computed in float64 and rounded once to float32.
_PIXEL_LUT = ((np.arange(256, dtype=np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)


def image_to_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 images ``[B, S, S, 3]`` → normalised float32 patches ``[B, N, P*P*3]``.

    Pixels become ``(x/255 - 0.5)/0.5`` in [-1, 1]; patches are ordered row-major over the
    ``S/P × S/P`` grid and each is flattened in ``(py, px, channel)`` order, matching
    :func:`patches_to_images`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [B, S, S, 3], got shape {images.shape}")
    size = images.shape[1]
    if patch_size <= 0 or size % patch_size:
        raise ValueError(f"image size {size} is not divisible by patch_size {patch_size}")
    grid = size // patch_size
    batch = images.shape[0]
    x = images.reshape(batch, grid, patch_size, grid, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, grid * grid, patch_size * patch_size * 3)
    return _PIXEL_LUT[x]  # rearranging uint8 first, then one gather: ~2x faster than float math


def patches_to_images(patches: np.ndarray, patch_size: int) -> np.ndarray:
    """Inverse of :func:`image_to_patches` (without de-normalising): ``[B, S, S, 3]`` float32."""
    patches = np.asarray(patches)
    if patches.ndim != 3 or patches.shape[2] != patch_size * patch_size * 3:
        raise ValueError(f"patches must be [B, N, {patch_size * patch_size * 3}], "
                         f"got {patches.shape}")
    batch, num = patches.shape[:2]
    grid = int(round(num**0.5))
    if grid * grid != num:
        raise ValueError(f"number of patches {num} is not a square")
    x = patches.reshape(batch, grid, grid, patch_size, patch_size, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid * patch_size, grid * patch_size, 3)


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """``round(ratio * num_patches)``, validated so at least one patch stays visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"patch_mask_ratio must be in [0, 1), got {ratio}")
    count = int(round(ratio * num_patches))
    if count >= num_patches:
        raise ValueError(f"patch_mask_ratio {ratio} masks all {num_patches} patches")
    return count


MASK_SHAPES = ("random", "block")


def patch_mask(
    num_patches: int, ratio: float, rngs: Sequence[np.random.Generator], shape: str = "random"
) -> np.ndarray:
    """bool ``[B, N]`` with exactly ``round(ratio * N)`` True per row.

    ``shape="random"``: positions uniform per row.  ``shape="block"``: BEiT's blockwise masking
    on the ``sqrt(N) x sqrt(N)`` grid — rectangles of random area and aspect ratio until the
    count is reached — so a masked patch's neighbours are mostly masked too and cannot simply
    give its content away (with random masking of a small grid most masked patches have a
    visible neighbour).  The count stays exact in both cases: the MPM_R loss gathers exactly
    that many patches per image.
    """
    if shape not in MASK_SHAPES:
        raise ValueError(f"patch mask shape must be one of {MASK_SHAPES}, got {shape!r}")
    count = num_masked_patches(num_patches, ratio)
    out = np.zeros((len(rngs), num_patches), dtype=bool)
    if count == 0:
        return out
    if shape == "block":
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"block masking needs a square patch grid, got {num_patches} patches")
        for row, rng in enumerate(rngs):
            out[row] = _block_mask(side, count, rng).reshape(-1)
        return out
    for row, rng in enumerate(rngs):
        out[row, np.argpartition(rng.random(num_patches), count - 1)[:count]] = True
    return out


def _block_mask(side: int, count: int, rng: np.random.Generator,
                min_area: int = 2, max_aspect: float = 3.0) -> np.ndarray:
    """``[side, side]`` bool with exactly ``count`` True cells, grown from random rectangles.

    Each rectangle has an area drawn uniformly in [min_area, remaining] and a log-uniform aspect
    ratio in [1/max_aspect, max_aspect] (BEiT, Bao et al. 2022, Algorithm 1); its cells not yet
    masked are added in raster order, stopping at ``count``.
    """
    grid = np.zeros((side, side), dtype=bool)
    masked = 0
    for _ in range(100 * count):  # each draw almost always adds a cell; bounded regardless
        if masked == count:
            return grid
        remaining = count - masked
        area = rng.uniform(min(min_area, remaining), remaining)
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        h = min(side, max(1, int(round(math.sqrt(area * aspect)))))
        w = min(side, max(1, int(round(math.sqrt(area / aspect)))))
        top, left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
        block = ~grid[top:top + h, left:left + w]
        free = np.argwhere(block)[:remaining]
        grid[top + free[:, 0], left + free[:, 1]] = True
        masked += len(free)
    free = np.flatnonzero(~grid.reshape(-1))[: count - masked]  # unreachable in practice
    grid.reshape(-1)[free] = True
    return grid
