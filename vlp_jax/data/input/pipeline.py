"""Grain input pipeline: train batches (shuffle, shard, join, tokenise, mask) and eval iterators.

Training order.  Pair indices are shuffled with Grain's index shuffle, re-seeded every epoch
(``seed + epoch``).  Each epoch holds ``len(pairs) // global_batch_size`` global batches (the
remainder is dropped; a different remainder every epoch).  Global batch ``s`` is the records at
epoch positions ``[s*G, (s+1)*G)``; process ``k`` of ``K`` takes the contiguous block
``[k*G/K, (k+1)*G/K)`` of it.  Hence the union of all processes' batch ``s`` is exactly the
single-process global batch ``s`` and the training stream does not depend on the process count.

Randomness.  MLM and patch masks for a record come from ``preprocess.record_rng(seed,
position)`` where ``position = epoch * len(pairs) + index in the epoch``: the same record gets new
masks each epoch, and the masks do not depend on batch layout, process count or worker count.

Checkpointing.  ``make_train_iterator`` returns a Grain ``DatasetIterator``; ``get_state()`` is a
small JSON-able dict and ``set_state(state)`` resumes at exactly the next batch.  With Orbax, save
it beside the train state using Grain's registered checkpoint args (one JSON file per process)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data_iter=grain.checkpoint.CheckpointSave(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(it)))   # restores `it` in place

(:func:`iterator_checkpoint_args` returns those two args.)  A state saved with ``worker_count=0``
is only valid for an iterator built with the same worker count, process count and batch size.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from vlp_jax.data.input import preprocess

TRAIN_KEYS = (
    "query_tokens", "query_mask", "query_mlm_tokens", "query_mlm_targets", "query_mlm_weights",
    "title_tokens", "title_mask", "title_mlm_tokens", "title_mlm_targets", "title_mlm_weights",
    "patches", "patch_mask", "item_index", "query_id",
)


def _validate_data_cfg(data_cfg: Any, patch_size: int | None) -> None:
    """Fail early with a named field instead of deep inside a Grain worker."""
    for name in ("query_len", "title_len"):
        if int(getattr(data_cfg, name)) < 2:
            raise ValueError(f"data.{name} must be >= 2 (room for [CLS] and [SEP])")
    if patch_size is not None:
        if patch_size <= 0 or data_cfg.image_size % patch_size:
            raise ValueError(f"data.image_size={data_cfg.image_size} is not divisible by "
                             f"patch_size={patch_size}")
        num_patches = (data_cfg.image_size // patch_size) ** 2
        preprocess.num_masked_patches(num_patches, float(data_cfg.patch_mask_ratio))
    if not 0.0 <= float(data_cfg.mlm_prob) <= 1.0:
        raise ValueError(f"data.mlm_prob must be in [0, 1], got {data_cfg.mlm_prob}")
    if int(data_cfg.worker_count) < 0 or int(data_cfg.prefetch) < 0:
        raise ValueError("data.worker_count and data.prefetch must be >= 0")


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only needed for the defaults; keeps the data package JAX-free otherwise

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return int(shard_index), int(shard_count)


class TrainOrder(grain.MapDataset):
    """Local record ``j`` of one process → ``{"position", "pair_index"}`` (see module docstring)."""

    def __init__(self, num_pairs: int, *, global_batch_size: int, shard_index: int,
                 shard_count: int, seed: int, num_epochs: int | None = None):
        if global_batch_size <= 0 or global_batch_size % shard_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                             f"{shard_count} processes")
        if num_pairs < global_batch_size:
            raise ValueError(f"{num_pairs} training pairs cannot fill one global batch of "
                             f"{global_batch_size}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        shuffled = grain.MapDataset.range(num_pairs).shuffle(seed=seed).repeat()
        super().__init__(shuffled)
        self._num_pairs = num_pairs
        self._global = global_batch_size
        self._local = global_batch_size // shard_count
        self._offset = shard_index * self._local
        self.steps_per_epoch = num_pairs // global_batch_size
        epochs_len = None if num_epochs is None else num_epochs * self.steps_per_epoch * self._local
        self._length = sys.maxsize if epochs_len is None else epochs_len

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"TrainOrder(global_batch={self._global}, local={self._local})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._local)
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        position = epoch * self._num_pairs + step_in_epoch * self._global + self._offset + row
        return {"position": position, "pair_index": int(self._parents[0][position])}


class JoinPairWithItem(grain.transforms.Map):
    """Fetch the pair and its item; keep only the fields the batch needs."""

    def __init__(self, pairs_source: Any, items_source: Any):
        self._pairs = pairs_source
        self._items = items_source

    def map(self, element: dict[str, int]) -> dict[str, Any]:
        pair = self._pairs[element["pair_index"]]
        item_index = int(pair["item_index"])
        if not 0 <= item_index < len(self._items):
            raise ValueError(f"pair {element['pair_index']} has item_index {item_index} outside "
                             f"the {len(self._items)} items")
        item = self._items[item_index]
        if "item_id" in pair and "item_id" in item:
            if preprocess.as_str(pair["item_id"]) != preprocess.as_str(item["item_id"]):
                raise ValueError(f"pair {element['pair_index']} item_id {pair['item_id']!r} does "
                                 f"not match items[{item_index}] id {item['item_id']!r}")
        return {"position": element["position"], "item_index": item_index,
                "query": preprocess.as_str(pair["query"]),
                "title": preprocess.as_str(item["title"]), "image": item["image"]}


def stack_images(images: Sequence[Any], image_size: int) -> np.ndarray:
    """Stack per-record images after checking each is uint8 [S, S, 3] with S = image_size."""
    arrays = [np.asarray(im) for im in images]
    for im in arrays:
        if im.shape != (image_size, image_size, 3) or im.dtype != np.uint8:
            raise ValueError(f"expected uint8 images of shape {(image_size, image_size, 3)} "
                             f"(data.image_size), got {im.dtype} {im.shape}")
    return np.stack(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.uint8)


class PreprocessBatch(grain.transforms.Map):
    """List of joined records → the train batch dict of docs/architecture.md "Batches"."""

    def __init__(self, tokenizer: Any, data_cfg: Any, *, patch_size: int, seed: int):
        self._tokenizer = tokenizer
        self._query_len = int(data_cfg.query_len)
        self._title_len = int(data_cfg.title_len)
        self._image_size = int(data_cfg.image_size)
        self._mlm_prob = float(data_cfg.mlm_prob)
        self._mlm_max_fraction = float(data_cfg.mlm_max_fraction)
        self._ratio = float(data_cfg.patch_mask_ratio)
        self._mask_shape = str(data_cfg.patch_mask_shape)
        self._patch_size = int(patch_size)
        self._num_patches = (self._image_size // self._patch_size) ** 2
        self._seed = int(seed)
        self._mask_id, self._special, self._replacement = preprocess.mlm_vocab(tokenizer)
        preprocess.encode_texts(tokenizer, ["warm up"], 2)  # fix tokenizer state before threads

    def _mlm(self, tokens, mask, rngs):
        cap = preprocess.mlm_max_predictions(tokens.shape[1], self._mlm_max_fraction)
        return preprocess.mlm_mask(tokens, mask, rngs, mlm_prob=self._mlm_prob,
                                   mask_id=self._mask_id, special_ids=self._special,
                                   replacement_ids=self._replacement, max_predictions=cap)

    def map(self, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        rngs = [preprocess.record_rng(self._seed, r["position"]) for r in records]
        queries = [r["query"] for r in records]
        q_tok, q_mask = preprocess.encode_texts(self._tokenizer, queries, self._query_len)
        t_tok, t_mask = preprocess.encode_texts(
            self._tokenizer, [r["title"] for r in records], self._title_len)
        # Draw order per record is fixed: query MLM, title MLM, patch mask.
        q_mlm, q_tgt, q_w = self._mlm(q_tok, q_mask, rngs)
        t_mlm, t_tgt, t_w = self._mlm(t_tok, t_mask, rngs)
        patch_mask = preprocess.patch_mask(self._num_patches, self._ratio, rngs,
                                              self._mask_shape)
        images = stack_images([r["image"] for r in records], self._image_size)
        return {
            "query_tokens": q_tok, "query_mask": q_mask, "query_mlm_tokens": q_mlm,
            "query_mlm_targets": q_tgt, "query_mlm_weights": q_w,
            "title_tokens": t_tok, "title_mask": t_mask, "title_mlm_tokens": t_mlm,
            "title_mlm_targets": t_tgt, "title_mlm_weights": t_w,
            "patches": preprocess.image_to_patches(images, self._patch_size),
            "patch_mask": patch_mask,
            "item_index": np.asarray([r["item_index"] for r in records], dtype=np.int32),
            "query_id": np.asarray([preprocess.query_hash(q) for q in queries], dtype=np.int32),
        }


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker start-up reads absl flags and raises if they were never parsed, which is
    the case outside ``absl.app`` (pytest, notebooks, benchmarks) — google/grain#1355, fixed
    upstream after 0.2.18.  Marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(pairs_source: Any, items_source: Any, tokenizer: Any, data_cfg: Any, *,
                       global_batch_size: int, patch_size: int, seed: int,
                       shard_index: int | None = None, shard_count: int | None = None,
                       num_epochs: int | None = None) -> grain.IterDataset:
    """The train pipeline as a Grain ``IterDataset`` (see :func:`make_train_iterator`)."""
    _validate_data_cfg(data_cfg, patch_size)
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    order = TrainOrder(len(pairs_source), global_batch_size=global_batch_size,
                       shard_index=shard_index, shard_count=shard_count, seed=seed,
                       num_epochs=num_epochs)
    ds = (order.map(JoinPairWithItem(pairs_source, items_source))
          .batch(global_batch_size // shard_count, drop_remainder=True, batch_fn=list)
          .map(PreprocessBatch(tokenizer, data_cfg, patch_size=patch_size, seed=seed)))
    prefetch = int(data_cfg.prefetch)
    workers = int(data_cfg.worker_count)
    # Reader threads overlap tokenisation (releases the GIL) with numpy work of other batches.
    read = grain.ReadOptions(num_threads=min(prefetch, 4) if workers == 0 else 1,
                             prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if workers > 0:
        _ensure_absl_flags_parsed()
        # Workers take every `workers`-th batch and Grain interleaves them back in order,
        # so the stream is identical to the in-process one.
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
    return it_ds


def make_train_iterator(pairs_source: Any, items_source: Any, tokenizer: Any, data_cfg: Any, *,
                        global_batch_size: int, patch_size: int, seed: int,
                        shard_index: int | None = None, shard_count: int | None = None,
                        num_epochs: int | None = None) -> grain.DatasetIterator:
    """Endless (or ``num_epochs``) iterator of this process's train batches.

    ``pairs_source`` / ``items_source``: random-access sources (``__len__``/``__getitem__``) of
    the TFDS ``train`` and ``items`` records.  Each batch holds ``global_batch_size //
    shard_count`` rows; shards default to ``jax.process_index()`` / ``jax.process_count()``.
    The returned iterator has ``get_state()`` / ``set_state(state)`` for exact resume.
    """
    return iter(make_train_dataset(
        pairs_source, items_source, tokenizer, data_cfg, global_batch_size=global_batch_size,
        patch_size=patch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
        num_epochs=num_epochs))


def iterator_checkpoint_args(iterator: grain.DatasetIterator) -> tuple[Any, Any]:
    """``(save_args, restore_args)`` for putting ``iterator`` into an Orbax ``Composite``."""
    return grain.checkpoint.CheckpointSave(iterator), grain.checkpoint.CheckpointRestore(iterator)


# ----------------------------------------------------------------------------- eval


def _padded_chunks(total: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices padded to batch_size by repeating the last row, valid mask) per batch."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, total, batch_size):
        rows = np.arange(start, min(start + batch_size, total))
        valid = np.zeros(batch_size, dtype=bool)
        valid[: rows.size] = True
        yield np.concatenate([rows, np.full(batch_size - rows.size, rows[-1])]), valid


def iterate_item_batches(items_source: Any, tokenizer: Any, data_cfg: Any, batch_size: int, *,
                         patch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All items once, in source order: ``title_tokens, title_mask, patches, item_index, valid``.

    The last batch is padded to ``batch_size`` with copies of its last real row (so pooled
    embeddings stay finite) marked ``valid=False`` and ``item_index=-1``.  Not sharded.
    """
    _validate_data_cfg(data_cfg, patch_size)
    for rows, valid in _padded_chunks(len(items_source), batch_size):
        records = [items_source[int(i)] for i in rows]
        tokens, mask = preprocess.encode_texts(
            tokenizer, [r["title"] for r in records], int(data_cfg.title_len))
        images = stack_images([r["image"] for r in records], int(data_cfg.image_size))
        item_index = np.asarray([int(r["item_index"]) for r in records], dtype=np.int32)
        yield {"title_tokens": tokens, "title_mask": mask,
               "patches": preprocess.image_to_patches(images, patch_size),
               "item_index": np.where(valid, item_index, -1).astype(np.int32), "valid": valid}


def iterate_query_batches(queries: Sequence[str], tokenizer: Any, data_cfg: Any,
                          batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All queries once, in order: ``query_tokens, query_mask, valid`` (last batch padded)."""
    _validate_data_cfg(data_cfg, None)
    for rows, valid in _padded_chunks(len(queries), batch_size):
        tokens, mask = preprocess.encode_texts(
            tokenizer, [queries[int(i)] for i in rows], int(data_cfg.query_len))
        yield {"query_tokens": tokens, "query_mask": mask, "valid": valid}
