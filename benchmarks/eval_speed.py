"""Speed of exact top-K retrieval (vlp_jax.eval.chunked_topk) over a large random catalogue.

Random unit vectors stand in for item and query embeddings (the timing does not depend on the
values).  Compile time is measured separately (a warm-up call on one query block), and a few
queries are checked against a numpy brute-force top-K so a fast-but-wrong result cannot pass.

    python benchmarks/eval_speed.py --num_items=1000000 --num_queries=10000

Prints a table and writes ``benchmarks/results/eval_speed.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.eval import chunked_topk  # noqa: E402

flags.DEFINE_integer("num_items", 1_000_000, "Catalogue size N.")
flags.DEFINE_integer("num_queries", 10_000, "Number of queries Q.")
flags.DEFINE_integer("dim", 128, "Embedding size d.")
flags.DEFINE_integer("k", 100, "Top-K retrieved per query.")
flags.DEFINE_integer("chunk_size", 8192, "Items scored per scan step.")
flags.DEFINE_integer("query_block", 1024, "Queries per jitted call.")
flags.DEFINE_integer("check_queries", 8, "Queries verified against numpy brute force.")
flags.DEFINE_string("out", "benchmarks/results/eval_speed.json", "JSON output path.")
FLAGS = flags.FLAGS


def unit_vectors(rng: np.random.Generator, n: int, d: int, block: int = 65536) -> np.ndarray:
    """float32 random unit vectors, generated in blocks to keep float64 temporaries small."""
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        x = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main(argv):
    del argv
    n, q, d, k = FLAGS.num_items, FLAGS.num_queries, FLAGS.dim, FLAGS.k
    rng = np.random.default_rng(0)
    items, queries = unit_vectors(rng, n, d), unit_vectors(rng, q, d)
    kw = dict(chunk_size=FLAGS.chunk_size, query_block=FLAGS.query_block)

    t0 = time.perf_counter()
    chunked_topk(queries[: min(q, FLAGS.query_block)], items, k, **kw)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, indices = chunked_topk(queries, items, k, **kw)
    total = time.perf_counter() - t0

    c = min(FLAGS.check_queries, q)
    ref = queries[:c] @ items.T
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    exact = bool(np.array_equal(np.sort(indices[:c], 1), np.sort(ref_idx, 1)))
    exact = exact and bool(np.allclose(scores[:c], np.take_along_axis(ref, ref_idx, 1),
                                       atol=1e-5))

    result = {
        "num_items": n, "num_queries": q, "dim": d, "k": k, **kw,
        "warmup_compile_plus_one_block_s": round(warmup, 3),
        "total_s": round(total, 3),
        "queries_per_s": round(q / total, 1),
        "score_gflops_per_s": round(2.0 * n * q * d / total / 1e9, 2),
        "matches_numpy_brute_force": exact,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    width = max(len(key) for key in result)
    print("\n".join(f"{key:<{width}}  {value}" for key, value in result.items()))
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if not exact:
        raise SystemExit("chunked_topk disagrees with numpy brute force")


if __name__ == "__main__":
    app.run(main)
