"""Incremental index updates: adding new catalog lines and removing delisted ids gives the same
index a full rebuild gives, while embedding only the new and changed items."""

import json
import os

import numpy as np
import pytest
import serve_fixtures

from vlp_jax.indexing import ann, index, update
from vlp_jax.serve import load_bundle, search_index


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache_dir):
    return serve_fixtures.serving_run(tmp_path_factory, data_cache_dir)


@pytest.fixture(scope="module")
def bundle(run):
    return load_bundle(run.bundle_dir, num_devices=1, buckets=(64,))


def _catalog(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def catalogs(run, tmp_path_factory):
    """v1 lacks items 0-29 (added later); v2 delists 100-119 and retitles 200 and 201."""
    root = tmp_path_factory.mktemp("catalogs")
    items = run.items
    v1 = items[30:]
    v2 = [dict(x) for i, x in enumerate(items) if not 100 <= i < 120]
    for x in v2:
        if x["item_id"] in (items[200]["item_id"], items[201]["item_id"]):
            x["title"] = "limited edition " + x["title"]
    return _catalog(root / "v1.jsonl", v1), _catalog(root / "v2.jsonl", v2)


def _build(bundle, items_path, out, kind, run):
    return index.build_index_dir(bundle, items_path, str(out), ann_kind=kind,
                                 base_dir=run.catalog_dir, batch_size=64, chunk_size=128,
                                 progress=False)


def _rows(directory):
    return [{k: r[k] for k in ("item_id", "title", "image", "source")}
            for r in ann.read_rows(directory)]


def _same_results(a_dir, b_dir, kind, queries, k=10):
    a, b = search_index.SearchIndex(a_dir, kind), search_index.SearchIndex(b_dir, kind)
    (sa, la), (sb, lb) = a.search(queries, k), b.search(queries, k)
    ids_a = [[a.item(x).item_id for x in row] for row in la]
    ids_b = [[b.item(x).item_id for x in row] for row in lb]
    assert ids_a == ids_b
    np.testing.assert_allclose(sa, sb, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_update_equals_full_rebuild(run, bundle, catalogs, tmp_path, kind):
    v1_items, v2_items = catalogs
    v1 = tmp_path / "v1"
    _build(bundle, v1_items, v1, kind, run)
    info = update.update_index_dir(bundle, v2_items, str(v1), str(tmp_path / "v2"),
                                   base_dir=run.catalog_dir, batch_size=64, progress=False)
    assert info["update"] == {"kept": 248, "added": 30, "changed": 2, "removed": 22,
                              "embedded": 32, "embed_failed": 0, "rebuilt": []}
    assert info["version"] == 2 and info["num_items"] == 280 and info["next_id"] == 270 + 32
    full = tmp_path / "full"
    _build(bundle, v2_items, full, kind, run)
    # Same items in the same (catalog) order, same embeddings; only the faiss labels differ.
    assert _rows(tmp_path / "v2") == _rows(full)
    np.testing.assert_allclose(np.load(tmp_path / "v2" / "embeddings.npy"),
                               np.load(full / "embeddings.npy"), atol=2e-6)
    queries = bundle.encode_queries(["red dress", "leather bag", "striped shirt", "black hat",
                                     "limited edition", "cotton socks"])
    for k in ("flat", kind):
        _same_results(tmp_path / "v2", full, k, queries)
    if kind == "hnsw":  # removed labels stay in the graph as tombstones, filtered in search
        assert len(ann.read_tombstones(str(tmp_path / "v2"), "hnsw")) == 22
        # Past max_deleted_fraction the graph is rebuilt from stored embeddings instead.
        info = update.update_index_dir(bundle, v2_items, str(v1), str(tmp_path / "v2b"),
                                       base_dir=run.catalog_dir, max_deleted_fraction=0.0,
                                       progress=False)
        assert info["update"]["rebuilt"] == ["hnsw"]
        assert len(ann.read_tombstones(str(tmp_path / "v2b"), "hnsw")) == 0
        _same_results(tmp_path / "v2b", full, "hnsw", queries)
    # An unchanged catalog is a no-op update: nothing embedded, nothing removed.
    info = update.update_index_dir(bundle, v2_items, str(tmp_path / "v2"), str(tmp_path / "v3"),
                                   base_dir=run.catalog_dir, progress=False)
    assert (info["update"]["embedded"], info["update"]["removed"]) == (0, 0)


def test_update_reads_format_1_and_refuses_unsafe_inputs(run, bundle, catalogs, tmp_path):
    v1_items, v2_items = catalogs
    # A format-1 directory (before labels): unwrapped faiss index, rows without ids.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    emb = np.load(os.path.join(run.index_dir, "embeddings.npy"))
    np.save(legacy / "embeddings.npy", emb)
    rows = ann.read_rows(run.index_dir)
    with open(legacy / "items.jsonl", "w") as f:
        f.writelines(json.dumps({"row": r, "item_id": x["item_id"], "title": x["title"],
                                 "image": x["image"]}) + "\n" for r, x in enumerate(rows))
    import faiss

    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    ann.write_index(flat, str(legacy / "index_flat.faiss"))
    with open(legacy / "index_info.json", "w") as f:
        json.dump({"indexes": ["flat"], "base_dir": run.catalog_dir,
                   "bundle_step": serve_fixtures.NUM_STEPS}, f)
    old = search_index.SearchIndex(str(legacy))
    assert old.version == 1 and old.item(7).item_id == rows[7]["item_id"]
    info = update.update_index_dir(bundle, v2_items, str(legacy), str(tmp_path / "new"),
                                   base_dir=run.catalog_dir, progress=False)
    assert info["update"]["embedded"] == 2 and info["update"]["rebuilt"] == ["flat"]
    assert info["format_version"] == 2
    with pytest.raises(ValueError, match="must differ"):
        update.update_index_dir(bundle, v2_items, str(legacy), str(legacy))
    with pytest.raises(ValueError, match="base_dir changed"):
        update.update_index_dir(bundle, v2_items, str(legacy), str(tmp_path / "x"),
                                base_dir=str(tmp_path))
    with open(legacy / "index_info.json", "w") as f:
        json.dump({"indexes": ["flat"], "base_dir": run.catalog_dir, "bundle_step": 3}, f)
    with pytest.raises(ValueError, match="another bundle"):
        update.update_index_dir(bundle, v2_items, str(legacy), str(tmp_path / "x"),
                                base_dir=run.catalog_dir)
