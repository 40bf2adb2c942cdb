"""Relevance oracle of the built-in catalog, for training diagnostics of false negatives.

On the built-in catalog every query is an attribute combination and an item is relevant to it iff
it has all the combination's attributes (``catalog.queries``).  A click gives one positive per
query, so the other relevant items that land among the contrastive loss's candidates (in the
batch, or in the memory bank) are *false negatives*.  These tables let the train step measure,
per query, how many such items it scores as negatives and how much softmax mass lands on them —
the quantity that explains when a larger candidate set (MBNS) helps and when it hurts.

Real catalogs have no such oracle; the false-negative *controls*
(``losses.qic.false_negatives``) use only what real data has. The oracle mask
(``negatives.oracle_fn_mask``) exists to measure how much a perfect control would recover,
never as a training recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlp_jax.data import catalog
from vlp_jax.data.catalog import queries, text
from vlp_jax.data.input import preprocess
from vlp_jax.runtime import fs

NUM_FIELDS = len(queries.FIELDS)
MAX_ITEMS = 500_000  # the tables become constants of the compiled step: keep them small


@dataclasses.dataclass(frozen=True)
class RelevanceTables:
    """``query_hashes`` [Q] sorted int32 (``preprocess.query_hash`` of every combination's
    query); ``constraints`` [Q, 5] int32 attribute codes, -1 = any; ``item_attrs`` [N, 5] int32
    attribute codes of the dataset's item rows (``item_index`` order)."""

    query_hashes: np.ndarray
    constraints: np.ndarray
    item_attrs: np.ndarray


def builtin_info(catalog_dir: str) -> dict[str, Any] | None:
    """``catalog_info.json`` of a built-in catalog, or None for a user catalog."""
    path = fs.join(catalog_dir, "catalog_info.json")
    if not fs.exists(path):
        return None
    info = fs.read_json(path)
    return info if info.get("generator") == "vlp_jax.data.catalog" else None


def relevance_tables(catalog_dir: str, item_ids: list[str]) -> RelevanceTables | None:
    """Tables for a built-in catalog whose dataset rows hold ``item_ids``; None otherwise
    (user catalog, or too large to embed in the step)."""
    info = builtin_info(catalog_dir)
    if info is None or len(item_ids) > MAX_ITEMS:
        return None
    attrs = catalog.item_attributes(int(info["seed"]), int(info["num_items"]),
                                    str(info.get("text_noise", "none"))).astype(np.int32)
    lang = str(info["lang"])
    hashes, constraints = [], []
    for template in range(len(text.TEMPLATES)):
        for key in np.unique(queries.combo_keys(attrs, template)).tolist():
            _, codes = queries.decode_key(key)
            row = np.full(NUM_FIELDS, -1, np.int32)
            for field, code in codes.items():
                row[queries.FIELDS.index(field)] = code
            hashes.append(preprocess.query_hash(queries.query_for_key(key, lang)))
            constraints.append(row)
    order = np.argsort(np.asarray(hashes, np.int64), kind="stable")
    rows = np.asarray([int(str(i).lstrip("P")) for i in item_ids], np.int64)
    return RelevanceTables(
        query_hashes=np.asarray(hashes, np.int32)[order],
        constraints=np.stack(constraints)[order],
        item_attrs=attrs[rows],
    )


def constraints_for(tables: RelevanceTables, query_ids):
    """[B, 5] constraints of a batch's ``query_id`` values (jnp; an unknown hash gets a row
    that matches nothing)."""
    hashes = jnp.asarray(tables.query_hashes)
    pos = jnp.clip(jnp.searchsorted(hashes, query_ids), 0, hashes.shape[0] - 1)
    found = hashes[pos] == query_ids
    cons = jnp.asarray(tables.constraints)[pos]
    return jnp.where(found[:, None], cons, -2)  # -2 never equals an attribute code


def is_relevant(constraints, attrs):
    """[Q, 5] constraints × [C, 5] attributes → [Q, C] bool (every constrained field equal)."""
    ok = (constraints[:, None, :] == -1) | (constraints[:, None, :] == attrs[None, :, :])
    return jnp.all(ok, axis=-1)
