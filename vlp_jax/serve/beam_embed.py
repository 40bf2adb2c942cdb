"""The offline item-embedding job on Apache Beam: the index job's chunks, computed by many workers.

    python -m vlp_jax.serve.beam_embed --bundle=RUN/export --items=CATALOG/items.jsonl \
        --out=DIR --ann=ivf --runner=DirectRunner \
        -- --direct_num_workers=2 --direct_running_mode=multi_processing

Same output directory as ``python -m vlp_jax.serve.index`` (``ann.py`` describes it), built in
two steps:

1. **Embed (Beam).**  The driver parses items.jsonl with the builder's text rules (as
   ``index.embed_catalog``) and writes each unfinished chunk's candidate items to
   ``DIR/chunks/todo_N.jsonl``.  One Beam task per chunk: each worker loads the serving bundle
   once (``DoFn.setup``: params restore and one compile per bucket, not per chunk), decodes and
   encodes the chunk in batches of the bundle's bucket, and writes ``chunk_N.npz`` — embeddings,
   the kept candidate rows (hence item ids) and skip counts — atomically.  These are exactly the
   files the single-process job writes, so either job resumes the other's work: a rerun (any
   engine) recomputes only missing chunks, and a changed bundle or items file is refused
   unless ``--overwrite``.
2. **Index (driver).**  ``index.build_index_dir`` finds every chunk finished and builds the
   flat (exact) index and the ``--ann`` index from them: ``ivf`` trains its k-means on a
   ``AnnParams.train_sample`` subset (docs/beam.md: recall against exact).

Embeddings equal the single-process job's: both encode every chunk with ``item_embed.embed_metas``
and the same batch size (tests/test_beam_embed.py).  Workers need the bundle, items and images on
a filesystem they all see (docs/beam.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from absl import app, flags, logging
from apache_beam.options.pipeline_options import PipelineOptions

from vlp_jax.data import records
from vlp_jax.serve import ann, index, item_embed
from vlp_jax.serve import bundle as bundle_lib

TODO_FILE = "todo_{chunk:06d}.jsonl"


class _NoBar:
    def update(self, n: int) -> None:
        del n


class EmbedChunk(beam.DoFn):
    """Chunk number → ``chunk_N.npz`` beside it; the bundle is loaded once per worker."""

    def __init__(self, bundle_dir: str, chunks_dir: str, base_dir: str, batch_size: int,
                 chunk_size: int, num_devices: int | None):
        self.bundle_dir, self.chunks_dir, self.base_dir = bundle_dir, chunks_dir, base_dir
        self.batch_size, self.chunk_size, self.num_devices = batch_size, chunk_size, num_devices

    def setup(self) -> None:
        self.bundle = bundle_lib.load_bundle(self.bundle_dir, towers=("item",),
                                             num_devices=self.num_devices,
                                             buckets=(self.batch_size,))
        self.pool = item_embed.worker_pool()

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()

    def process(self, chunk: int) -> Iterator[tuple[int, int, float]]:
        path = index._chunk_path(self.chunks_dir, chunk)
        if os.path.isfile(path):  # a retried or duplicated task: the chunk is already written
            return
        start = time.perf_counter()
        with open(os.path.join(self.chunks_dir, TODO_FILE.format(chunk=chunk)),
                  encoding="utf-8") as f:
            metas = [records.ItemMeta(**json.loads(line)) for line in f]
        result = item_embed.embed_metas(self.bundle, metas, chunk * self.chunk_size,
                                        self.base_dir, self.bundle.buckets[-1], self.pool,
                                        _NoBar())
        index._save_chunk(path, result)
        yield chunk, len(metas), time.perf_counter() - start


def embed_chunks_beam(bundle: bundle_lib.Bundle, items_path: str, out_dir: str, *,
                      base_dir: str | None = None, batch_size: int = 256,
                      chunk_size: int = 8192, overwrite: bool = False,
                      runner: str = "DirectRunner", pipeline_args: Sequence[str] = (),
                      num_devices: int | None = None) -> dict[str, Any]:
    """Step 1: compute every missing chunk of ``out_dir/chunks`` on Beam; returns counts."""
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if not os.path.isfile(items_path):
        raise ValueError(f"items file {items_path!r} does not exist")
    base_dir = os.path.abspath(base_dir or os.path.dirname(os.path.abspath(items_path)))
    metas, _ = records.parse_items(items_path, records.SplitStats())
    identity = index._job_identity(bundle, items_path, base_dir, chunk_size)
    chunks_dir = os.path.abspath(index._prepare_out(out_dir, identity, overwrite))
    num_chunks = -(-len(metas) // chunk_size)
    todo = [c for c in range(num_chunks) if not os.path.isfile(index._chunk_path(chunks_dir, c))]
    for c in todo:
        path = os.path.join(chunks_dir, TODO_FILE.format(chunk=c))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for meta in metas[c * chunk_size:(c + 1) * chunk_size]:
                f.write(json.dumps({"item_id": meta.item_id, "title": meta.title,
                                    "image_paths": meta.image_paths}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
    start = time.perf_counter()
    if todo:
        fn = EmbedChunk(bundle.path, chunks_dir, base_dir, batch_size, chunk_size, num_devices)
        with beam.Pipeline(runner=runner, options=PipelineOptions(list(pipeline_args))) as p:
            _ = (p | "Chunks" >> beam.Create(todo)
                 | "Spread" >> beam.Reshuffle()
                 | "Embed" >> beam.ParDo(fn))
    seconds = time.perf_counter() - start
    for c in todo:
        os.remove(os.path.join(chunks_dir, TODO_FILE.format(chunk=c)))
    logging.info("beam embed: %d of %d chunks computed in %.1fs", len(todo), num_chunks, seconds)
    return {"num_chunks": num_chunks, "chunks_computed": len(todo),
            "chunks_reused": num_chunks - len(todo), "candidates": len(metas),
            "embed_seconds": round(seconds, 3),
            "items_per_sec": round(len(metas) / seconds, 1) if todo and seconds > 0 else None}


def build_index_dir_beam(bundle: bundle_lib.Bundle, items_path: str, out_dir: str, *,
                         ann_kind: str = "hnsw", ann_params: ann.AnnParams | None = None,
                         keep_chunks: bool = False, **embed_kwargs: Any) -> dict[str, Any]:
    """Steps 1 and 2: the index directory of ``index.build_index_dir``, embedded on Beam;
    returns its ``index_info.json`` dict plus a ``beam`` section."""
    beam_info = embed_chunks_beam(bundle, items_path, out_dir, **embed_kwargs)
    keep = {k: embed_kwargs[k] for k in ("base_dir", "batch_size", "chunk_size")
            if k in embed_kwargs}
    info = index.build_index_dir(bundle, items_path, out_dir, ann_kind=ann_kind,
                                 ann_params=ann_params, keep_chunks=keep_chunks,
                                 progress=False, **keep)
    return {**info, "beam": beam_info}


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The index job's flags (same meaning), plus the runner; options after ``--`` go to Beam."""
    index._define_flags()
    flags.DEFINE_string("runner", "DirectRunner", "Beam runner.")


def _main(argv: list[str]) -> None:
    if FLAGS.update_from:
        raise app.UsageError("--update_from is the single-process job's: python -m "
                             "vlp_jax.serve.index (an update embeds only the changed items)")
    from vlp_jax.runtime import devices as runtime

    runtime.quiet_library_logs()
    bundle = bundle_lib.load_bundle(FLAGS.bundle, towers=("item",), num_devices=1,
                                    buckets=(FLAGS.batch_size,))
    params = ann.AnnParams(
        hnsw_m=FLAGS.hnsw_m, hnsw_ef_construction=FLAGS.hnsw_ef_construction,
        hnsw_ef_search=FLAGS.hnsw_ef_search, ivf_nlist=FLAGS.ivf_nlist,
        ivf_nprobe=FLAGS.ivf_nprobe)
    info = build_index_dir_beam(
        bundle, FLAGS.items, FLAGS.out, ann_kind=FLAGS.ann, ann_params=params,
        keep_chunks=FLAGS.keep_chunks, base_dir=FLAGS.base_dir or None,
        batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size, overwrite=FLAGS.overwrite,
        runner=FLAGS.runner, pipeline_args=argv[1:], num_devices=FLAGS.num_devices or None)
    print(json.dumps({k: info[k] for k in ("num_items", "counts", "build_seconds", "beam")},
                     indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
