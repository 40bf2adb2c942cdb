"""Serving speed: faiss ANN recall vs exact search, build time, ms/query, end-to-end latency.

For each catalogue size N, random unit vectors stand in for item embeddings (index speed does
not depend on what the vectors mean; random data is the *hardest* case for ANN recall, real
embeddings are clustered).  Per index kind it reports the build time, single-query search
latency (one query per call, as the service does), batched ms/query, and Recall@k of the ANN
top-k against the exact ``IndexFlatIP`` top-k.

End to end = encode one query with a real bundle's query tower (1 device, as the service) +
search the ANN index of N items; p50/p99 over ``--e2e_queries`` different query strings.
``--bundle=RUN/export`` uses a trained bundle; without it, an untrained ``configs/base.py``
model is exported to a temporary bundle (same shapes, so the same latency).

    python benchmarks/serving.py --sizes=100000,1000000

Prints a table and writes ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.indexing import ann  # noqa: E402
from vlp_jax.serve import search_index  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags of the command line only: other benchmarks import this module's helpers."""
    flags.DEFINE_list("sizes", ["100000", "1000000"], "Catalogue sizes N.")
    flags.DEFINE_list("kinds", ["hnsw", "ivf"], "Approximate index kinds to measure.")
    flags.DEFINE_integer("dim", 128, "Embedding size d (a --bundle's embed_dim overrides it).")
    flags.DEFINE_integer("k", 100, "Top-k for recall.")
    flags.DEFINE_integer("num_queries", 200, "Queries for recall and ms/query.")
    flags.DEFINE_integer("hnsw_m", 32, "HNSW M.")
    flags.DEFINE_integer("hnsw_ef_construction", 80, "HNSW efConstruction.")
    flags.DEFINE_integer("hnsw_ef_search", 128, "HNSW efSearch.")
    flags.DEFINE_integer("ivf_nlist", 0, "IVF cells (0 = 4*sqrt(N)).")
    flags.DEFINE_integer("ivf_nprobe", 16, "IVF cells probed.")
    flags.DEFINE_list("hnsw_ef_search_sweep", ["32", "128", "512"], "efSearch values measured.")
    flags.DEFINE_list("ivf_nprobe_sweep", ["16", "64", "256"], "nprobe values measured.")
    flags.DEFINE_enum("data", "random", ["random", "clustered"], "random unit vectors, or a "
                      "mixture of 1000 clusters (closer to embeddings).")
    flags.DEFINE_string("bundle", "", "Serving bundle for end-to-end latency "
                        "('' = untrained base).")
    flags.DEFINE_integer("e2e_queries", 300, "Queries timed end to end (0 = skip).")
    flags.DEFINE_string("out", "benchmarks/results/serving.json", "JSON output path.")


def unit_vectors(rng: np.random.Generator, n: int, d: int, block: int = 65536) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clustered_vectors(rng: np.random.Generator, n: int, d: int, block: int = 65536,
                      num_clusters: int = 1000, noise: float = 0.35) -> np.ndarray:
    """Unit vectors scattered around ``num_clusters`` random unit centres."""
    centres = unit_vectors(np.random.default_rng(12345), num_clusters, d)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = centres[rng.integers(0, num_clusters, m)]
        x = x + noise / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def single_query_ms(index, queries: np.ndarray, k: int) -> list[float]:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return times


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def untrained_bundle(out_dir: str) -> str:
    """Export a randomly initialised configs/base.py model (shapes = a real base bundle)."""
    import jax

    from configs import base
    from vlp_jax.data import tokenizer
    from vlp_jax.data.catalog import vocab as catalog_vocab
    from vlp_jax.indexing import export
    from vlp_jax.models import init_params

    config = base.get_config()
    words = [w for ws in catalog_vocab.word_lists("en").values() for w in ws]
    tok = tokenizer.train_wordpiece([" ".join(words)] * 4, config.data.vocab_size,
                                    os.path.join(out_dir, "tok"))
    model = export.serving_model(config, len(tok))
    params = init_params(model, config, jax.random.key(0))
    return export.export_bundle(os.path.join(out_dir, "export"), params=params, config=config,
                                tokenizer=tok, step=0)


def synthetic_index_dir(out: str, bundle, catalog: list[dict], base_dir: str,
                        rng: np.random.Generator, legacy_copy: str = "",
                        ann_kind: str = "hnsw") -> None:
    """An index directory (flat + ``ann_kind``, the one servers search by default) of
    ``catalog`` records with clustered random embeddings, as the index job writes it;
    ``legacy_copy`` also writes a format-1 copy (unlabelled faiss indexes), the only kind the
    pre-ASGI server can read."""
    import faiss

    from vlp_jax.data import records
    from vlp_jax.indexing import index_files, item_embed, provenance

    n, params = len(catalog), ann.AnnParams()
    emb = clustered_vectors(rng, n, bundle.embed_dim)
    rows = [item_embed.item_row(records.ItemMeta(x["item_id"], x["title"], [x["image"]]),
                                base_dir, bundle.image_size) for x in catalog]
    ids = np.arange(n, dtype=np.int64)
    indexes, seconds = index_files.build_indexes(emb, ids, ["flat", ann_kind], params)
    index_files.write_index_dir(out, embeddings=emb, ids=ids, rows=rows, indexes=indexes,
                                tombstones={}, info={
        "complete": True, "version": 1, "next_id": n, "ann_trained_items": n,
        "ann_params": dict(vars(params)), "base_dir": base_dir, "bundle": bundle.path,
        "bundle_step": bundle.step, "bundle_created_at": bundle.manifest.get("created_at"),
        "bundle_fingerprint": provenance.bundle_fingerprint(bundle.manifest),
        "build_seconds": seconds, "synthetic_embeddings": "clustered"})
    if legacy_copy:
        os.makedirs(legacy_copy, exist_ok=True)
        for name in (ann.EMBEDDINGS_FILE, ann.ITEMS_FILE, ann.INFO_FILE):
            shutil.copy(os.path.join(out, name), os.path.join(legacy_copy, name))
        for kind, index in indexes.items():
            inner = (faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap)
                     else index)  # IVF holds its ids (= positions here) itself
            ann.write_index(inner, os.path.join(legacy_copy, ann.index_file(kind)))


def query_strings(n: int, seed: int = 0) -> list[str]:
    from vlp_jax.data.catalog import vocab as catalog_vocab

    words = catalog_vocab.word_lists("en")
    rng = np.random.default_rng(seed)
    fields = ["color", "pattern", "brand", "material"]
    out = []
    for _ in range(n):
        picked = rng.choice(fields, size=rng.integers(1, 3), replace=False)
        parts = [str(rng.choice(words[f])) for f in picked]
        out.append(" ".join(parts + [str(rng.choice(words["category"]))]))
    return out


def main(argv):
    del argv
    import faiss

    from vlp_jax.runtime import devices as runtime
    from vlp_jax.serve import load_bundle

    runtime.quiet_library_logs()

    tmp = tempfile.mkdtemp(prefix="vlp_serving_bench_")
    bundle = None
    if FLAGS.e2e_queries:
        bundle = load_bundle(FLAGS.bundle or untrained_bundle(tmp), towers=("query",),
                             num_devices=1)
        bundle.encode_queries(["warm up"])
    d = bundle.embed_dim if bundle else FLAGS.dim
    params = ann.AnnParams(hnsw_m=FLAGS.hnsw_m, hnsw_ef_construction=FLAGS.hnsw_ef_construction,
                           hnsw_ef_search=FLAGS.hnsw_ef_search, ivf_nlist=FLAGS.ivf_nlist,
                           ivf_nprobe=FLAGS.ivf_nprobe)
    rng = np.random.default_rng(0)
    make = unit_vectors if FLAGS.data == "random" else clustered_vectors
    queries = make(rng, FLAGS.num_queries, d)
    sweeps = {"hnsw": ("hnsw_ef_search", [int(v) for v in FLAGS.hnsw_ef_search_sweep]),
              "ivf": ("ivf_nprobe", [int(v) for v in FLAGS.ivf_nprobe_sweep])}
    threads = faiss.omp_get_max_threads()
    rows = []

    def measure(n, kind, index, build_s, exact, setting):
        """Recall + batched ms/query (all threads) + single-query ms (1 thread, as served)."""
        faiss.omp_set_num_threads(threads)
        (_, found), batch_s = ann.timed(index.search, queries, FLAGS.k)
        faiss.omp_set_num_threads(1)
        lat = single_query_ms(index, queries[:100], FLAGS.k)
        row = {"n": n, "kind": kind, "setting": setting, "build_s": round(build_s, 2),
               "recall": 1.0 if exact is None else round(recall_at_k(found, exact), 4),
               "ms_per_query_single": round(float(np.median(lat)), 3),
               "ms_per_query_batched": round(batch_s * 1000 / len(queries), 3)}
        rows.append(row)
        print(row, flush=True)
        return found, row

    for n in [int(s) for s in FLAGS.sizes]:
        items = make(rng, n, d)
        faiss.omp_set_num_threads(threads)
        flat, flat_s = ann.timed(ann.build_index, items, "flat")
        exact, flat_row = measure(n, "flat", flat, flat_s, None, "")
        served = [(flat, flat_row)]
        for kind in FLAGS.kinds:
            faiss.omp_set_num_threads(threads)
            index, build_s = ann.timed(ann.build_index, items, kind, params)
            name, values = sweeps[kind]
            for value in values:
                search_index.configure(index, kind, ann.AnnParams(**{**vars(params), name: value}))
                _, row = measure(n, kind, index, build_s, exact, f"{name}={value}")
                if value == getattr(params, name):
                    served.append((index, row))
            search_index.configure(index, kind, params)
        if bundle is not None:  # encode + search, 1 faiss thread: what one request costs
            faiss.omp_set_num_threads(1)
            texts = query_strings(FLAGS.e2e_queries)
            for index, row in served:
                times = []
                for text in texts:
                    start = time.perf_counter()
                    search_index.search(index, bundle.encode_queries([text]), 10)
                    times.append((time.perf_counter() - start) * 1000)
                row["e2e_p50_ms"] = round(float(np.percentile(times, 50)), 3)
                row["e2e_p99_ms"] = round(float(np.percentile(times, 99)), 3)
        del items, served, flat
    result = {
        "rows": rows, "dim": d, "k": FLAGS.k, "num_queries": FLAGS.num_queries,
        "ann_params": dict(vars(params)), "data": FLAGS.data,
        "bundle": FLAGS.bundle or "untrained configs/base.py", "e2e_k": 10,
        "faiss": faiss.__version__, "faiss_threads_batched": threads,
        "cpu": platform.machine(), "cpu_count": os.cpu_count(),
    }
    header = (f"{'N':>9} {'index':>6} {'setting':>18} {'build s':>8} {'R@' + str(FLAGS.k):>7} "
              f"{'ms/q 1':>8} {'ms/q batch':>10} {'e2e p50':>8} {'e2e p99':>8}")
    print(header)
    nan = float("nan")
    for r in rows:
        print(f"{r['n']:>9} {r['kind']:>6} {r['setting']:>18} {r['build_s']:>8.2f} "
              f"{r['recall']:>7.3f} "
              f"{r['ms_per_query_single']:>8.3f} {r['ms_per_query_batched']:>10.3f} "
              f"{r.get('e2e_p50_ms', nan):>8.2f} {r.get('e2e_p99_ms', nan):>8.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", FLAGS.out)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
