"""Retrieval evaluation on embeddings: exact chunked top-k, Recall@K per slice, reports."""

from vlp_jax.eval.report import write_report
from vlp_jax.eval.retrieval import (
    RECALL_DEFINITION,
    QuerySet,
    chunked_topk,
    evaluate,
    group_queries,
    recall_at_k,
    summarize,
)

__all__ = [
    "RECALL_DEFINITION",
    "QuerySet",
    "chunked_topk",
    "evaluate",
    "group_queries",
    "recall_at_k",
    "summarize",
    "write_report",
]
