"""TFDS builder: catalog directory (user data format) → array_record splits + tokenizer + report.

Splits (see docs/architecture.md "TFDS records"):

- ``items``: one record per kept item, in items.jsonl order; ``item_index`` = row number.
- ``train`` / ``valid`` / ``test``: one record per kept (query, item) pair.

Images are decoded, converted to RGB and resized once here and stored as raw uint8 [S, S, 3]
bytes (``TextSource`` reshapes them; pair records carry ``b""``): at 64×64 a PNG decode costs
~130–230 µs against ~1 µs for ``np.frombuffer``, and array_record's compression keeps disk small.

The build lives in ``data_dir/vlp_catalog/<s{size}_{fingerprint}>/1.0.0``; the fingerprint
covers the catalog files (content), the images (size + mtime), the image size and tokenizer
settings (with a trained vocab's recipe), so unchanged inputs reuse the build.  It holds
``tokenizer/`` and ``build_report.json``; written to a temporary folder renamed when complete.

The catalog, the tokenizer folder and ``data_dir`` may each be local or on gs:// / s3://.  With
``data_dir`` on a store the build is made on local disk and published whole with a commit
marker, and it is read through a verified local copy (``store_commit`` says why and how).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from vlp_jax.data import records, store_commit
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build.fingerprint import BUILD_FORMAT, catalog_fingerprint
from vlp_jax.data.input.dataset_reader import (
    REPORT_FILE,
    SPLITS,
    TOKENIZER_DIR,
    DatasetHandle,
    load_dataset,
    open_local,
    staging_root,
)
from vlp_jax.runtime import fs

_IMAGE_BLOCK = 256  # images decoded per thread-pool round (bounds memory of in-flight arrays)


def catalog_features() -> tfds.features.FeaturesDict:
    """The records' features; also what Beam workers serialize with (``beam_write``)."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
        {
            # Union of the item and pair layouts (TFDS has one feature spec per builder);
            # each split leaves the fields it does not use empty.  The image is raw bytes of
            # uint8 [S, S, 3] (b"" in pair splits), reshaped by TextSource: TFDS cannot decode
            # a BYTES tensor with two unknown dims.
            "item_index": np.int64,
            "item_id": text,
            "title": text,
            "query": text,
            "slice": text,
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        }
    )


@dataclasses.dataclass
class VLPCatalogConfig(tfds.core.BuilderConfig):
    """Where the catalog is and how to build it; ``name`` carries the input fingerprint."""

    catalog_dir: str = ""
    image_size: int = 64
    tokenizer: str = ""  # "" = train WordPiece on the catalog; else an HF tokenizer folder
    vocab_size: int = 4000
    num_workers: int = 0  # image-decoding threads (0 = min(8, cpu count))


class VLPCatalog(tfds.core.GeneratorBasedBuilder):
    """Catalog → array_record splits.  Parsing/validation rules live in ``records``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "items/train/valid/test splits, raw uint8 images."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources`, which the current etils no longer pulls
        # in (ModuleNotFoundError at build time); only download checksums use this path.
        return epath.Path(__file__)

    def __init__(self, *, config: VLPCatalogConfig, **kwargs: Any):
        super().__init__(config=config, **kwargs)
        self._stats: dict[str, records.SplitStats] = {}
        self._kept: list[records.ItemMeta] = []
        self._pairs: dict[str, list[records.Pair]] = {}
        self._images: np.ndarray | None = None
        self._stage_dir = ""
        self._tokenizer_report: dict = {}
        self._report_extra: dict = {}  # how the build ran, when not in this process (Beam)
        self.staging_dir = ""  # local copies of a gs:// / s3:// tokenizer folder ("" = default)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"vlp_jax catalog {self.builder_config.catalog_dir}",
            features=catalog_features(),
            disable_shuffling=True,  # items row i must be item_index i
        )

    # ------------------------------------------------------------------ generation
    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        cfg = self.builder_config
        t0 = time.perf_counter()
        items_path = fs.join(cfg.catalog_dir, "items.jsonl")
        self._stats = {name: records.SplitStats() for name in SPLITS}
        candidates, seen_ids = records.parse_items(items_path, self._stats["items"])
        self._decode_images(candidates)
        index_of = {item.item_id: i for i, item in enumerate(self._kept)}
        for split in records.PAIR_SPLITS:
            path = fs.join(cfg.catalog_dir, f"{split}.jsonl")
            self._pairs[split] = records.parse_pairs(path, index_of, seen_ids, self._stats[split])
        if not self._kept:
            raise ValueError(
                f"catalog {cfg.catalog_dir!r} has no usable item: {self._stats['items'].as_dict()}"
            )
        self._prepare_tokenizer([item.title for item in self._kept],
                                [p.query for p in self._pairs["train"]])
        logging.info("catalog parsed and images decoded in %.1fs", time.perf_counter() - t0)
        # TFDS cannot write an empty split; load_dataset gives such a split an empty source.
        return {
            split: self._generate_examples(split)
            for split in SPLITS
            if split == "items" or self._pairs[split]
        }

    def _decode_images(self, candidates: list[records.ItemMeta]) -> None:
        """Decode every candidate image once (threads) into a disk-backed staging array."""
        cfg = self.builder_config
        s, stats = cfg.image_size, self._stats["items"]
        self._stage_dir = tempfile.mkdtemp(prefix="stage-", dir=os.fspath(self.data_dir))
        self._images = np.lib.format.open_memmap(
            os.path.join(self._stage_dir, "images.npy"),
            mode="w+", dtype=np.uint8, shape=(max(len(candidates), 1), s, s, 3),
        )
        workers = cfg.num_workers or min(8, os.cpu_count() or 1)

        def load(item: records.ItemMeta, fetched: dict[str, bytes]
                 ) -> tuple[np.ndarray | None, list[str]]:
            try:
                return records.load_item_image(cfg.catalog_dir, item, s, fetched)
            except records.BadRecord as e:
                return None, [e.reason]

        self._kept = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(candidates), _IMAGE_BLOCK):
                block = candidates[start : start + _IMAGE_BLOCK]
                # A store's images come in one concurrent fetch per block ({} for local files).
                fetched = records.fetch_images(cfg.catalog_dir, block)
                loaded = pool.map(functools.partial(load, fetched=fetched), block)
                for item, (arr, notes) in zip(block, loaded, strict=True):
                    if arr is None:
                        stats.skipped[notes[0]] += 1
                        continue
                    stats.fixed.update(notes)
                    self._images[len(self._kept)] = arr
                    self._kept.append(item)
        stats.kept = len(self._kept)

    def _prepare_tokenizer(self, titles: list[str], train_queries: list[str]) -> None:
        """Train (kept titles + kept train queries only: no eval leakage) or copy the given
        tokenizer."""
        cfg = self.builder_config
        out = os.path.join(os.fspath(self.data_dir), TOKENIZER_DIR)
        if cfg.tokenizer:
            tok = tokenizer_lib.load_tokenizer(cfg.tokenizer, self.staging_dir)
            tok.save_pretrained(out)
            source = fs.normalize(cfg.tokenizer)
        else:
            texts = titles + train_queries
            tok = tokenizer_lib.train_wordpiece(texts, cfg.vocab_size, out)
            source = f"wordpiece trained on {len(texts)} texts (item titles + train queries)"
        self._tokenizer_report = {
            "source": source,
            "vocab_size": len(tok),
            "unk_fraction_titles": round(tokenizer_lib.unk_fraction(tok, titles[:2000]), 6),
        }

    def _generate_examples(self, split: str):
        if split == "items":
            assert self._images is not None
            for i, item in enumerate(self._kept):
                yield i, {
                    "item_index": i, "item_id": item.item_id, "title": item.title,
                    "query": "", "slice": "", "image": self._images[i].tobytes(),
                }
            return
        for i, pair in enumerate(self._pairs[split]):
            yield i, {
                "item_index": pair.item_index, "item_id": pair.item_id, "title": "",
                "query": pair.query, "slice": pair.slice, "image": b"",
            }

    def _download_and_prepare(self, dl_manager: Any, download_config: Any) -> None:
        t0 = time.perf_counter()
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            self._images = None
            if self._stage_dir:
                shutil.rmtree(self._stage_dir, ignore_errors=True)
        seconds = time.perf_counter() - t0
        cfg = self.builder_config
        report = records.build_report(
            self._stats,
            seconds,
            build_format=BUILD_FORMAT,
            catalog_dir=fs.normalize(cfg.catalog_dir),
            config_name=cfg.name,
            image_size=cfg.image_size,
            image_encoding="uint8 [S, S, 3] raw bytes (tfds Tensor(shape=(), dtype=object))",
            tokenizer=self._tokenizer_report,
            **self._report_extra,
        )
        fs.write_text(os.path.join(os.fspath(self.data_dir), REPORT_FILE),  # local: see module doc
                      json.dumps(report, indent=1, ensure_ascii=False))
        records.log_report(report)


# ---------------------------------------------------------------------- public entry point
def build_dataset(
    catalog_dir: str,
    data_dir: str,
    image_size: int = 64,
    tokenizer: str = "",
    vocab_size: int = 4000,
    *,
    num_workers: int = 0,
    builder_cls: Callable[..., VLPCatalog] | None = None,
    beam_runner: Any = None,
    beam_options: Any = None,
    staging_dir: str = "",
) -> DatasetHandle:
    """Build (or reuse) the TFDS dataset of ``catalog_dir`` under ``data_dir``.

    ``builder_cls``/``beam_runner``/``beam_options``: the Beam build (``beam_pipeline``), which
    writes the same dataset folder, so either build is the other's cache hit.
    ``staging_dir``: local folder for copies of object-store data ("" = ~/.cache/vlp_jax/staged).
    """
    if not fs.exists(fs.join(catalog_dir, "items.jsonl")):
        raise ValueError(f"catalog {catalog_dir!r} has no items.jsonl")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if tokenizer:  # fail before decoding thousands of images
        tokenizer_lib.load_tokenizer(tokenizer, staging_root(staging_dir))
    fingerprint = catalog_fingerprint(catalog_dir, image_size, tokenizer, vocab_size)
    config = VLPCatalogConfig(
        name=f"s{image_size}_{fingerprint}",
        description=f"catalog {fs.normalize(catalog_dir)}",
        catalog_dir=fs.normalize(catalog_dir),
        image_size=image_size,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        num_workers=num_workers,
    )
    # A finished build folder appears only by atomic rename (on a store: only with its commit
    # marker), so its existence means "complete"; checking it first skips constructing a
    # builder (and TFDS's custom-config warning).
    dataset_dir = fs.join(data_dir, VLPCatalog.name, config.name, str(VLPCatalog.VERSION))
    make = functools.partial(_prepare, config, builder_cls, beam_runner, beam_options,
                             staging_root(staging_dir))
    if fs.is_remote(dataset_dir):
        return _build_remote(dataset_dir, make, staging_root(staging_dir))
    if os.path.isfile(os.path.join(dataset_dir, REPORT_FILE)):
        return load_dataset(dataset_dir, cache_hit=True)
    with store_commit.host_lock(data_dir, config.name):
        cache_hit = make(data_dir)
    return load_dataset(dataset_dir, cache_hit=cache_hit)


def _prepare(config: VLPCatalogConfig, builder_cls: Any, beam_runner: Any, beam_options: Any,
             staging_dir: str, data_dir: str) -> bool:
    """Run TFDS's build into local ``data_dir`` unless it is there; True if it was there."""
    builder = (builder_cls or VLPCatalog)(config=config, data_dir=data_dir)
    builder.staging_dir = staging_dir
    if builder.data_path.exists():  # another process may have built it meanwhile
        return True
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False, beam_runner=beam_runner, beam_options=beam_options),
    )
    return False


def _build_remote(location: str, make: Callable[[str], bool], staging_dir: str) -> DatasetHandle:
    """Build on local disk, publish to ``location`` with its marker, open the verified copy."""
    with store_commit.host_lock(staging_dir, location):
        staged = store_commit.stage_build(location, staging_dir)
        cache_hit = staged is not None
        if staged is None:
            tmp = tempfile.mkdtemp(prefix="build-", dir=staging_dir)
            try:
                make(tmp)
                # TFDS lays a build out as <data_dir>/<name>/<config>/<version>, as in the store
                local = os.path.join(tmp, *location.split("/")[-3:])
                attempt = store_commit.publish(local, location, staging_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            staged = store_commit.stage_build(location, staging_dir)
            if staged is None or staged[1] != attempt:
                raise RuntimeError(f"dataset build {location}: committed {attempt}, but the "
                                   f"store now shows {staged and staged[1]}")
    return open_local(staged[0], cache_hit, location, staged[1])
