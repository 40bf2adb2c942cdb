"""Embed the item corpus and a split's queries with the model, sharded over the ``data`` mesh.

The retrieval maths (chunked top-k, Recall@K, report) lives in ``retrieval``/``report`` and never
sees the model; this module is the bridge.  Every process walks the same batches and feeds only
its own rows, and the embeddings come back replicated, so multi-process eval needs no extra
communication code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlp_jax.data.input import pipeline
from vlp_jax.eval import report, retrieval
from vlp_jax.parallel import mesh as mesh_lib


def make_encode_fns(model: nn.Module, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jitted item and query encoders: batch sharded on ``data``, embeddings replicated."""
    rep = mesh_lib.replicated(mesh)

    def encode_items(params, batch):
        out = model.apply(
            {"params": params}, batch["title_tokens"], batch["title_mask"], batch["patches"],
            method=model.encode_item,
        )
        return out["embedding"]

    def encode_queries(params, batch):
        out = model.apply(
            {"params": params}, batch["query_tokens"], batch["query_mask"],
            method=model.encode_query,
        )
        return out["embedding"]

    return jax.jit(encode_items, out_shardings=rep), jax.jit(encode_queries, out_shardings=rep)


def _process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of a host batch that every process holds in full."""
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}


def embed_batches(
    encode_fn: Callable, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh,
    keys: tuple[str, ...],
) -> np.ndarray:
    """Run ``encode_fn`` over padded batches; drop padding rows (``valid`` False)."""
    outputs = []
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        local = _process_rows({k: batch[k] for k in keys})
        emb = encode_fn(params, mesh_lib.shard_host_batch(local, mesh))
        outputs.append(np.asarray(jax.device_get(emb))[valid])
    return np.concatenate(outputs, axis=0).astype(np.float32)


def evaluate_model(
    model: nn.Module,
    params: Any,
    handle: Any,
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    out_dir: str,
    step: int,
    encode_fns: tuple[Callable, Callable] | None = None,
) -> dict[str, Any]:
    """Full-corpus Recall@K of ``config.eval.split`` queries; writes recall.json/report.md/plot."""
    start = time.perf_counter()
    encode_items, encode_queries = encode_fns or make_encode_fns(model, mesh)
    batch_size = config.eval.batch_size
    mesh_lib.check_batch_divisible(batch_size, mesh)
    item_batches = pipeline.iterate_item_batches(
        handle.sources["items"], tokenizer, config.data, batch_size,
        patch_size=config.model.patch_size,
    )
    item_emb = embed_batches(
        encode_items, params, item_batches, mesh, ("title_tokens", "title_mask", "patches")
    )
    query_set = retrieval.group_queries(handle.sources[config.eval.split])
    if config.eval.max_queries:
        query_set = query_set.subset(config.eval.max_queries)
    query_batches = pipeline.iterate_query_batches(
        query_set.queries, tokenizer, config.data, batch_size
    )
    query_emb = embed_batches(
        encode_queries, params, query_batches, mesh, ("query_tokens", "query_mask")
    )
    results = retrieval.evaluate(
        query_emb, item_emb, query_set, ks=tuple(config.eval.ks), chunk_size=config.eval.chunk_size
    )
    results["step"] = step
    results["split"] = config.eval.split
    results["seconds"] = time.perf_counter() - start
    if jax.process_index() == 0:
        report.write_report(results, out_dir, title=f"Retrieval at step {step}")
    logging.info(
        "eval step %d (%s, %d queries x %d items, %.1fs): %s", step, config.eval.split,
        len(query_set.queries), item_emb.shape[0], results["seconds"], results["overall"],
    )
    return results
