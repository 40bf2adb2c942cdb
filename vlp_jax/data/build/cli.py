"""Command line of the dataset build: build (or reuse) a catalog's TFDS dataset ahead of
training, on Apache Beam or in-process.  Run as ``python -m vlp_jax.data.build``.

    # the dataset configs/base.py trains on, built by 2 local Beam worker processes; `make
    # train` then finds it in data.cache_dir and skips its own build
    python -m vlp_jax.data.build --config=configs/base.py --runner=DirectRunner -- \
        --direct_num_workers=2 --direct_running_mode=multi_processing

    # your catalog, on a cluster runner (docs/beam.md for Dataflow, Flink and Spark options)
    python -m vlp_jax.data.build --catalog_dir=/mnt/catalog --data_dir=/mnt/tfds \
        --runner=FlinkRunner -- --flink_master=HOST:8081 --environment_type=LOOPBACK

``--catalog_dir``, ``--data_dir`` and ``--tokenizer`` may be gs:// or s3:// URIs; the in-process
build then publishes the build to the store with a commit marker (docs/pods_data.md).

Everything after ``--`` is passed to Beam as pipeline options.  ``--runner=`` (empty) builds in
this process with ``tfds_builder.build_dataset``.  With ``--config`` the catalog, cache folder,
image size and vocabulary come from the config (``--config.data.*`` overrides), so training
with that config reuses the build.  Prints a JSON summary.
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from vlp_jax.runtime import fs

FLAGS = flags.FLAGS


def _define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Training config: take the catalog, data.cache_dir, image size and "
        "tokenizer settings from it (its built-in catalog is generated if needed).")
    flags.DEFINE_string("catalog_dir", "", "Catalog directory (items.jsonl, images/, pairs).")
    flags.DEFINE_string("data_dir", "", "TFDS data directory (with --config: "
                        "<data.cache_dir>/tfds).")
    flags.DEFINE_integer("image_size", 64, "Image side in pixels (without --config).")
    flags.DEFINE_string("tokenizer", "", "HF tokenizer folder; empty = train WordPiece "
                        "(without --config).")
    flags.DEFINE_integer("vocab_size", 4000, "WordPiece vocabulary size (without --config).")
    flags.DEFINE_string("runner", "DirectRunner", "Beam runner (DirectRunner, DataflowRunner, "
                        "FlinkRunner, SparkRunner, ...); empty = build in this process.")
    flags.DEFINE_float("chunk_mb", 4.0, "MB of a catalog file per read range / decode block.")


def _settings() -> dict:
    config = FLAGS.config
    if config is None:
        if not FLAGS.catalog_dir or not FLAGS.data_dir:
            raise app.UsageError("give --config, or both --catalog_dir and --data_dir")
        return {"catalog_dir": FLAGS.catalog_dir, "data_dir": FLAGS.data_dir,
                "image_size": FLAGS.image_size, "tokenizer": FLAGS.tokenizer,
                "vocab_size": FLAGS.vocab_size}
    from vlp_jax.data.build import from_config

    data = config.data
    return {"catalog_dir": FLAGS.catalog_dir or data.catalog_dir
            or from_config.builtin_catalog_dir(data),
            "data_dir": FLAGS.data_dir or fs.join(from_config.cache_root(data), "tfds"),
            "image_size": data.image_size, "tokenizer": data.tokenizer,
            "vocab_size": data.vocab_size}


def _main(argv: list[str]) -> None:
    pipeline_args = argv[1:]
    settings = _settings()
    if not FLAGS.runner:
        if pipeline_args:
            raise app.UsageError(f"pipeline options {pipeline_args} need a --runner")
        from vlp_jax.data.build import from_config, tfds_builder

        staging_dir = from_config.staging_dir(FLAGS.config.data) if FLAGS.config else ""
        handle = tfds_builder.build_dataset(**settings, staging_dir=staging_dir)
    else:
        try:
            from vlp_jax.data.build import beam_pipeline
        except ImportError as e:
            raise SystemExit(
                f"the Beam build needs Apache Beam: pip install -e '.[beam]' ({e})") from e
        handle = beam_pipeline.build_dataset_beam(
            **settings, runner=FLAGS.runner, pipeline_args=pipeline_args,
            chunk_bytes=max(1, int(FLAGS.chunk_mb * (1 << 20))))
    report = handle.report
    print(json.dumps({
        "dataset_dir": handle.location, "cache_hit": handle.cache_hit,
        "splits": {k: v["kept"] for k, v in report["splits"].items()},
        "total_skipped": report["total_skipped"], "build_seconds": report["build_seconds"],
        "items_per_sec": report["items_per_sec"], "beam": report.get("beam")}, indent=2))

