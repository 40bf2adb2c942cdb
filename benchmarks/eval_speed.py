"""Speed and memory of exact top-K retrieval (vlp_jax.eval.chunked_topk) over a large catalogue.

Random unit vectors stand in for item and query embeddings (the timing does not depend on the
values).  Compile time is measured separately (a warm-up call on one query block), and a few
queries are checked against a numpy brute-force top-K so a fast-but-wrong result cannot pass.
Memory: the process's peak RSS (``ru_maxrss``) is reported next to the size of the inputs; the
search itself holds the permuted item copy plus per-block buffers, independent of Q.

    python benchmarks/eval_speed.py                 # 1,000,000 items x 10,000 queries, d=128
    python benchmarks/eval_speed.py --small         # 100,000 x 1,000 (a quick check)

Prints a table and writes ``benchmarks/results/eval_speed.json`` (``eval_speed_small.json``
with ``--small``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.eval import chunked_topk  # noqa: E402
from vlp_jax.eval.retrieval import auto_group_size  # noqa: E402

flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size N.")
flags.DEFINE_integer("num_queries", 10_000, "Number of queries Q.")
flags.DEFINE_bool("small", False, "Quick check: 100,000 items x 1,000 queries.")
flags.DEFINE_integer("dim", 128, "Embedding size d.")
flags.DEFINE_integer("k", 100, "Top-K retrieved per query.")
flags.DEFINE_integer("chunk_size", 2048, "Items scored per scan step.")
flags.DEFINE_integer("query_block", 512, "Queries per jitted call.")
flags.DEFINE_integer("group_size", 0, "Items per group of the two-stage top-k (0 = auto).")
flags.DEFINE_integer("repeats", 1, "Timed runs over all queries (best and median reported).")
flags.DEFINE_integer("check_queries", 8, "Queries verified against numpy brute force.")
flags.DEFINE_string("out", "", "JSON output path ('' = benchmarks/results/eval_speed*.json).")
FLAGS = flags.FLAGS

MB = 2**20


def unit_vectors(rng: np.random.Generator, n: int, d: int, block: int = 65536) -> np.ndarray:
    """float32 random unit vectors, generated in blocks to keep float64 temporaries small."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv):
    del argv
    n, q = (100_000, 1_000) if FLAGS.small else (FLAGS.num_items, FLAGS.num_queries)
    d, k = FLAGS.dim, FLAGS.k
    rng = np.random.default_rng(0)
    items, queries = unit_vectors(rng, n, d), unit_vectors(rng, q, d)
    rss_inputs = _peak_rss()
    kw = dict(chunk_size=FLAGS.chunk_size, query_block=FLAGS.query_block,
              group_size=FLAGS.group_size)

    t0 = time.perf_counter()
    chunked_topk(queries[: min(q, FLAGS.query_block)], items, k, **kw)
    warmup = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(FLAGS.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        scores, indices = chunked_topk(queries, items, k, **kw)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)

    c = min(FLAGS.check_queries, q)
    ref = queries[:c] @ items.T
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    exact = bool(np.array_equal(indices[:c], ref_idx))
    exact = exact and bool(np.allclose(scores[:c], np.take_along_axis(ref, ref_idx, 1),
                                       atol=1e-5))
    best = min(walls)
    load = os.getloadavg()
    result = {
        "num_items": n, "num_queries": q, "dim": d, "k": k, **kw,
        "group_size_used": FLAGS.group_size or auto_group_size(n, k),
        "warmup_compile_plus_one_block_s": round(warmup, 3),
        "total_s_best": round(best, 3),
        "total_s_median": round(float(np.median(walls)), 3),
        "total_s_runs": [round(w, 3) for w in walls],
        "cpu_s_runs": [round(x, 2) for x in cpus],
        "queries_per_s": round(q / best, 1),
        "score_gflops_per_s": round(2.0 * n * q * d / best / 1e9, 2),
        "inputs_mb": round((items.nbytes + queries.nbytes) / MB, 1),
        "peak_rss_mb_after_inputs": round(rss_inputs / MB, 1),
        "peak_rss_mb": round(_peak_rss() / MB, 1),
        "matches_numpy_brute_force": exact,
        "load_average_1_5_15": [round(x, 2) for x in load],
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    width = max(len(key) for key in result)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in result.items()))
    out = FLAGS.out or ("benchmarks/results/eval_speed_small.json" if FLAGS.small
                        else "benchmarks/results/eval_speed.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if not exact:
        raise SystemExit("chunked_topk disagrees with numpy brute force")


if __name__ == "__main__":
    app.run(main)
