"""The offline item-embedding job on Apache Beam: the index job's output, computed by many workers.

    python -m vlp_jax.indexing.beam_embed --bundle=RUN/export --items=CATALOG/items.jsonl \
        --out=DIR --ann=ivf --runner=DirectRunner \
        -- --direct_num_workers=2 --direct_running_mode=multi_processing

Same output directory as ``python -m vlp_jax.indexing.index`` (``ann.py`` describes it), built in
two steps, neither of which holds the catalog in the driver:

1. **Embed (Beam).**  Workers read items.jsonl in byte ranges and apply the builder's text
   rules (``beam_stages``: the first valid line of an id wins, by byte offset); the candidates
   are counted per range, so each one's position in the file — its *candidate row*, what the
   single-process job numbers items by — is the rows of the ranges before it plus its rank in
   its own.  Candidates are grouped into chunks of ``--chunk_size`` rows; one task per chunk
   loads the serving bundle once per worker (``DoFn.setup``: params restore and one compile),
   decodes and encodes the chunk with ``item_embed.embed_metas`` and writes ``chunk_N.npz``:
   the single-process job's chunk file plus the kept rows' ``items.jsonl`` fields.  Either job
   resumes the other's chunks (a chunk already there is not recomputed); a changed bundle or
   items file is refused unless ``--overwrite``.  Text-level skip counts are summed by one
   ``CombinePerKey``.
2. **Index (driver).**  ``beam_index`` streams the chunk files in order into the flat index and
   the ``--ann`` index (``ivf`` trained on the single-process job's sample rows first) and
   writes the directory, ``index_info.json`` last.

Items, images, the bundle and the output may be local, ``gs://`` or ``s3://`` (``beam_io``);
options such as ``--s3_endpoint_url`` go after ``--`` and reach the driver and every worker.
Embeddings, rows and counts equal the single-process job's (tests/test_beam_embed.py,
tests/test_beam_object_store.py).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from absl import app, flags, logging

from vlp_jax.data import records
from vlp_jax.data.build import beam_io
from vlp_jax.data.build import beam_stages as stages
from vlp_jax.indexing import ann, beam_index, index, item_embed
from vlp_jax.indexing import bundle as bundle_lib

RANGE_BYTES = 4 << 20  # bytes of items.jsonl per read range
SUMMARY_FILE = "beam_chunks.json"  # per chunk: (chunk, kept, skipped, fixed, computed)
STATS_FILE = "beam_stats.json"  # summed text-level counts


class _NoBar:
    def update(self, n: int) -> None:
        del n


class RankRange(beam.DoFn):
    """One byte range's candidates → ``(chunk, (row, item_id, title, paths))``: the row is the
    candidates of all earlier ranges (side input: candidates per range) plus the rank here."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def process(self, element: tuple[int, Iterable[tuple]],
                per_range: dict[int, int]) -> Iterator[tuple[int, tuple]]:
        rng, lines = element
        before = sum(n for r, n in per_range.items() if r < rng)
        for i, (_, item_id, title, paths) in enumerate(sorted(lines, key=lambda x: x[0])):
            row = before + i
            yield row // self.chunk_size, (row, item_id, title, list(paths))


def _local_bundle(bundle_loc: str) -> str:
    """A bundle folder on a store is copied to local disk first (Orbax restores and the
    tokenizer load read local files); a local folder is used as it is."""
    if not beam_io.is_remote(bundle_loc):
        return bundle_loc
    return beam_io.download_tree(bundle_loc, tempfile.mkdtemp(prefix="vlp-bundle-"))


class EmbedChunk(beam.DoFn):
    """``(chunk, candidates)`` → ``chunk_N.npz`` in ``chunks_dir``; emits the chunk's summary
    ``(chunk, kept, skipped, fixed, computed)``.  The bundle is loaded once per worker."""

    def __init__(self, bundle_loc: str, chunks_dir: str, base_dir: str, batch_size: int,
                 chunk_size: int, num_devices: int | None):
        self.bundle_loc, self.chunks_dir, self.base_dir = bundle_loc, chunks_dir, base_dir
        self.batch_size, self.chunk_size, self.num_devices = batch_size, chunk_size, num_devices

    def setup(self) -> None:
        local = _local_bundle(self.bundle_loc)
        self._copy = local if local != self.bundle_loc else None  # this worker's download
        self.bundle = bundle_lib.load_bundle(local, towers=("item",),
                                             num_devices=self.num_devices,
                                             buckets=(self.batch_size,))
        self.pool = item_embed.worker_pool()

    def teardown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()
        if getattr(self, "_copy", None):
            shutil.rmtree(self._copy, ignore_errors=True)

    def process(self, element: tuple[int, Iterable[tuple]]) -> Iterator[tuple]:
        chunk, members = element
        members = sorted(members)
        start = chunk * self.chunk_size
        if [m[0] for m in members] != list(range(start, start + len(members))):
            raise RuntimeError(f"chunk {chunk}: rows are not {start}..: {[m[0] for m in members]}")
        metas = [records.ItemMeta(item_id, title, list(paths))
                 for _, item_id, title, paths in members]
        path = beam_io.join(self.chunks_dir, beam_index.CHUNK_FILE.format(chunk=chunk))
        old = beam_index.read_chunk(path) if beam_io.exists(path) else None
        if old is not None and old["items"] is not None:  # a retried task, or a resumed job
            yield chunk, len(old["rows"]), old["skipped"], old["fixed"], False
            return
        with tempfile.TemporaryDirectory(prefix="vlp-embed-") as tmp:
            base, local = self._local_images(metas, tmp)
            if old is None:
                result = item_embed.embed_metas(self.bundle, local, start, base,
                                                self.bundle.buckets[-1], self.pool, _NoBar())
            else:  # the single-process job's chunk: embeddings there, item rows to add
                result = old
            items = [self._item_row(metas[r - start], local[r - start], base)
                     for r in result["rows"].tolist()]
        beam_io.write_bytes(path, beam_index.chunk_bytes(result, items))
        yield chunk, len(items), result["skipped"], result["fixed"], old is None

    def _local_images(self, metas: list[records.ItemMeta],
                      tmp: str) -> tuple[str, list[records.ItemMeta]]:
        """Where the decoder reads the chunk's images: the catalog folder itself, or a local
        copy of each remote item's images (``beam_stages.localize_images``)."""
        if not beam_io.is_remote(self.base_dir):
            return self.base_dir, metas
        with concurrent.futures.ThreadPoolExecutor(stages.REMOTE_THREADS) as pool:
            return tmp, list(pool.map(
                lambda k: stages.localize_images(self.base_dir, metas[k], tmp, f"{k}-"),
                range(len(metas))))

    def _item_row(self, meta: records.ItemMeta, local: records.ItemMeta,
                  base: str) -> dict[str, Any]:
        """The index's ``items.jsonl`` fields: ``item_embed.item_row`` for a local catalog;
        for a remote one the same fields, with ``source`` hashed from the images' bytes."""
        if base == self.base_dir:
            return item_embed.item_row(meta, base, self.bundle.image_size)
        shown = item_embed.shown_image(local, base, self.bundle.image_size)
        h = hashlib.sha256(meta.title.encode("utf-8"))
        for rel, name in zip(meta.image_paths, local.image_paths, strict=True):
            h.update(b"\0" + rel.encode("utf-8", "surrogatepass"))
            at = os.path.join(base, name)
            if os.path.isfile(at):
                with open(at, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            else:
                h.update(b"\0missing")
        return {"item_id": meta.item_id, "title": meta.title,
                "image": meta.image_paths[local.image_paths.index(shown)],
                "source": h.hexdigest()[:32]}


def _identity(bundle: bundle_lib.Bundle, bundle_loc: str, items_path: str, base_dir: str,
              chunk_size: int) -> dict[str, Any]:
    """What must not change between an interrupted run and its resumption: the single-process
    job's identity for a local items file (so each resumes the other), else the object's
    size and modification time (the driver does not read the catalog)."""
    if not beam_io.is_remote(items_path):
        return {**index._job_identity(bundle, items_path, base_dir, chunk_size),
                "bundle": beam_io.normalize(bundle_loc)}
    meta = beam_io.listing(items_path)[0]
    return {"bundle": bundle_loc, "bundle_created_at": bundle.manifest.get("created_at"),
            "bundle_step": bundle.step, "items": items_path,
            "items_size": int(meta.size_in_bytes),
            "items_updated": meta.last_updated_in_seconds, "base_dir": base_dir,
            "chunk_size": int(chunk_size)}


def _prepare_chunks(out_dir: str, identity: dict[str, Any], overwrite: bool) -> str:
    """``out_dir/chunks`` holding this job's ``job.json`` (``index._prepare_out``'s rules)."""
    chunks = beam_io.join(out_dir, index.CHUNKS_DIR)
    job = beam_io.join(chunks, index.JOB_FILE)
    if beam_io.exists(job):
        previous = beam_io.read_json(job)
        if previous != identity:
            if not overwrite:
                changed = sorted(k for k in identity if previous.get(k) != identity[k])
                raise ValueError(
                    f"{chunks} holds partial results of a different job (changed: {changed}); "
                    "pass --overwrite to discard them")
            beam_io.delete_tree(chunks)
    if not beam_io.exists(job):
        beam_io.write_bytes(job, json.dumps(identity, indent=2, sort_keys=True).encode())
    return chunks


def embed_chunks_beam(bundle: bundle_lib.Bundle, items_path: str, out_dir: str, *,
                      bundle_loc: str | None = None, base_dir: str | None = None,
                      batch_size: int = 256, chunk_size: int = 8192, overwrite: bool = False,
                      runner: str = "DirectRunner", pipeline_args: Sequence[str] = (),
                      num_devices: int | None = None,
                      range_bytes: int = RANGE_BYTES) -> dict[str, Any]:
    """Step 1: every chunk of ``out_dir/chunks`` on Beam (module docstring); returns counts.

    ``bundle`` is the driver's loaded bundle (manifest, identity); workers load
    ``bundle_loc`` (default: ``bundle.path``), which may be on a store."""
    if batch_size < 1 or chunk_size < 1 or range_bytes < 1:
        raise ValueError("batch_size, chunk_size and range_bytes must be >= 1, got "
                         f"{batch_size}, {chunk_size}, {range_bytes}")
    options = beam_io.configure(pipeline_args)
    items_path = beam_io.normalize(items_path)
    if not beam_io.check_exists(items_path, "items file"):
        raise ValueError(f"items file {items_path!r} does not exist")
    base_dir = beam_io.normalize(base_dir or index_parent(items_path))
    bundle_loc = bundle_loc or bundle.path
    chunks_dir = _prepare_chunks(out_dir, _identity(bundle, bundle_loc, items_path, base_dir,
                                                    chunk_size), overwrite)
    start = time.perf_counter()
    with beam.Pipeline(runner=runner, options=options) as p:
        parsed = (p | "Ranges" >> beam.Create(stages.byte_ranges(items_path, range_bytes))
                  | "Spread" >> beam.Reshuffle()
                  | "Read" >> beam.ParDo(stages.ReadLines())
                  | "Parse" >> beam.ParDo(stages.ParseItems()).with_outputs(
                      stages.STATS, stages.SEEN, main="candidates"))
        firsts = (parsed.candidates | "ById" >> beam.GroupByKey()
                  | "FirstOfId" >> beam.ParDo(stages.FirstOfId(range_bytes)).with_outputs(
                      stages.STATS, main="winners"))
        per_range = (firsts.winners | "One" >> beam.Map(lambda kv: (kv[0], 1))
                     | "PerRange" >> beam.CombinePerKey(sum))
        summary = (firsts.winners | "ByRange" >> beam.GroupByKey()
                   | "Rank" >> beam.ParDo(RankRange(chunk_size), beam.pvalue.AsDict(per_range))
                   | "ByChunk" >> beam.GroupByKey()
                   | "Embed" >> beam.ParDo(EmbedChunk(bundle_loc, chunks_dir, base_dir,
                                                      batch_size, chunk_size, num_devices)))
        _save_list(summary, "Summary", beam_io.join(chunks_dir, SUMMARY_FILE))
        _save_list((parsed[stages.STATS], firsts[stages.STATS]) | "AllStats" >> beam.Flatten()
                   | "SumStats" >> beam.CombinePerKey(sum), "Stats",
                   beam_io.join(chunks_dir, STATS_FILE))
    seconds = time.perf_counter() - start
    rows = beam_io.read_json(beam_io.join(chunks_dir, SUMMARY_FILE))
    stats = stages.merge_stats([(tuple(k), n) for k, n in beam_io.read_json(
        beam_io.join(chunks_dir, STATS_FILE))], ["items"])["items"]
    for _, _, skipped, fixed, _ in rows:
        stats.skipped.update(skipped)
        stats.fixed.update(fixed)
    stats.kept = sum(row[1] for row in rows)
    computed = sum(1 for row in rows if row[4])
    logging.info("beam embed: %d of %d chunks computed in %.1fs", computed, len(rows), seconds)
    return {"num_chunks": len(rows), "chunks_computed": computed,
            "chunks_reused": len(rows) - computed, "embed_seconds": round(seconds, 3),
            "items_per_sec": round(stats.kept / seconds, 1) if computed and seconds > 0
            else None, "chunks_dir": chunks_dir, "base_dir": base_dir,
            "chunk_rows": [(row[0], row[1]) for row in rows], "stats": stats}


def index_parent(items_path: str) -> str:
    """The folder image paths are relative to by default: the items file's own."""
    return beam_io.normalize(items_path).rsplit("/", 1)[0] if beam_io.is_remote(items_path) \
        else os.path.dirname(beam_io.normalize(items_path))


def _save_list(pcoll: beam.PCollection, label: str, path: str) -> None:
    _ = (pcoll | f"{label}List" >> beam.combiners.ToList()
         | f"Save{label}" >> beam.Map(lambda rows, at: beam_io.write_json(at, sorted(rows)),
                                      path))


def build_index_dir_beam(bundle: bundle_lib.Bundle, items_path: str, out_dir: str, *,
                         ann_kind: str = "hnsw", ann_params: ann.AnnParams | None = None,
                         keep_chunks: bool = False, **embed_kwargs: Any) -> dict[str, Any]:
    """Steps 1 and 2: the index directory of ``index.build_index_dir``, embedded on Beam;
    returns its ``index_info.json`` dict plus a ``beam`` section."""
    if ann_kind not in ("none", "hnsw", "ivf"):
        raise ValueError(f"ann must be 'none', 'hnsw' or 'ivf', got {ann_kind!r}")
    ann_params = ann_params or ann.AnnParams()
    ann_params.validate()
    beam_io.configure(embed_kwargs.get("pipeline_args", ()))
    out_dir = beam_io.normalize(out_dir)
    info_at = beam_io.join(out_dir, ann.INFO_FILE)
    if beam_io.exists(info_at):  # "unfinished" again until the new index is complete
        beam_io.delete([info_at])
    res = embed_chunks_beam(bundle, items_path, out_dir, **embed_kwargs)
    stats = res.pop("stats")
    counts = {**stats.as_dict(), "total_skipped": int(sum(stats.skipped.values()))}
    if stats.skipped:
        logging.warning("index: %d of %d item lines skipped: %s", counts["total_skipped"],
                        stats.lines, counts["skipped"])
    if not stats.kept:
        raise ValueError(f"no usable item in {items_path}: skipped {counts['skipped']}")
    chunks_dir, chunk_rows = res.pop("chunks_dir"), res.pop("chunk_rows")
    paths = [beam_io.join(chunks_dir, beam_index.CHUNK_FILE.format(chunk=c))
             for c, _ in chunk_rows]
    kinds = ["flat"] + ([] if ann_kind == "none" else [ann_kind])
    info = beam_index.build_from_chunks(
        paths, [kept for _, kept in chunk_rows], bundle.embed_dim, out_dir, kinds=kinds,
        params=ann_params, info={
            "complete": True, "version": 1, "next_id": stats.kept,
            "ann_params": dict(vars(ann_params)), "ann_trained_items": stats.kept,
            "base_dir": res.pop("base_dir"), "items_path": beam_io.normalize(items_path),
            "bundle": beam_io.normalize(embed_kwargs.get("bundle_loc") or bundle.path),
            "bundle_step": bundle.step, "bundle_created_at": bundle.manifest.get("created_at"),
            "counts": counts, "chunks_computed": res["chunks_computed"],
            "chunks_reused": res["chunks_reused"], "embed_seconds": res["embed_seconds"],
            "items_per_sec": res["items_per_sec"]})
    if not keep_chunks:
        beam_io.delete_tree(chunks_dir)
    return {**info, "beam": res}


# ----------------------------------------------------------------------------- command line
FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The index job's flags (same meaning), plus the runner; options after ``--`` go to Beam."""
    index._define_flags()
    flags.DEFINE_string("runner", "DirectRunner", "Beam runner.")


def _main(argv: list[str]) -> None:
    if FLAGS.update_from:
        raise app.UsageError("--update_from is the single-process job's: python -m "
                             "vlp_jax.indexing.index (an update embeds only the changed items)")
    from vlp_jax.runtime import devices as runtime

    runtime.quiet_library_logs()
    beam_io.configure(argv[1:])  # the bundle may be on a store the options point at
    bundle = bundle_lib.load_bundle(_local_bundle(FLAGS.bundle), towers=("item",),
                                    num_devices=1, buckets=(FLAGS.batch_size,))
    params = ann.AnnParams(
        hnsw_m=FLAGS.hnsw_m, hnsw_ef_construction=FLAGS.hnsw_ef_construction,
        hnsw_ef_search=FLAGS.hnsw_ef_search, ivf_nlist=FLAGS.ivf_nlist,
        ivf_nprobe=FLAGS.ivf_nprobe)
    info = build_index_dir_beam(
        bundle, FLAGS.items, FLAGS.out, ann_kind=FLAGS.ann, ann_params=params,
        keep_chunks=FLAGS.keep_chunks, bundle_loc=FLAGS.bundle,
        base_dir=FLAGS.base_dir or None, batch_size=FLAGS.batch_size,
        chunk_size=FLAGS.chunk_size, overwrite=FLAGS.overwrite, runner=FLAGS.runner,
        pipeline_args=argv[1:], num_devices=FLAGS.num_devices or None)
    print(json.dumps({k: info[k] for k in ("num_items", "counts", "build_seconds", "beam")},
                     indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(_main)
