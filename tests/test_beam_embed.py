"""The Beam item-embedding job equals the single-process index job (embeddings to 1e-6, same
rows, same skip counts, same flat and IVF search results) on 2 DirectRunner worker processes
reading items.jsonl in 256-byte ranges, and resumes a single-process job's partial chunks,
computing only the missing ones."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="Beam is the optional extra: pip install -e '.[beam]'")

import jax  # noqa: E402
from test_builder import S, make_catalog  # noqa: E402

from configs import tiny  # noqa: E402
from vlp_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from vlp_jax.indexing import ann, beam_embed, export, index  # noqa: E402
from vlp_jax.models import init_params  # noqa: E402
from vlp_jax.serve import load_bundle, search_index  # noqa: E402

TWO_WORKERS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
# The engine whose multi-process mode the options above select, named: "DirectRunner" first
# tries Prism for some pipelines, which fetches a binary over the network on first use.
RUNNER = "FnApiRunner"
BATCH, CHUNK = 4, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The builder tests' catalog (bad records included) and an untrained tiny bundle for it:
    equality needs the same weights in both jobs, not good ones."""
    root = tmp_path_factory.mktemp("beam_embed")
    catalog = make_catalog(str(root / "catalog"))
    config = tiny.get_config()
    config.data.image_size, config.data.title_len, config.data.query_len = S, 8, 8
    config.model.update(dict(width=16, depth=1, query_depth=1, num_heads=2, embed_dim=8,
                             patch_size=4))
    tok_dir = str(root / "tok")
    titles = ["red striped t-shirt", "green cotton dress", "grey socks", "palette hat"]
    tok = tokenizer_lib.train_wordpiece(titles, 60, tok_dir)
    model = export.serving_model(config, len(tok))
    params = jax.jit(lambda key: init_params(model, config, key))(jax.random.key(0))
    bundle_dir = export.export_bundle(str(root / "export"), params=params, config=config,
                                      tokenizer=tok_dir, step=1)
    bundle = load_bundle(bundle_dir, towers=("item",), num_devices=1, buckets=(BATCH,))
    return catalog, bundle


def test_beam_embedding_equals_single_process_and_resumes(setup, tmp_path):
    catalog, bundle = setup
    items = os.path.join(catalog, "items.jsonl")
    single = index.build_index_dir(bundle, items, str(tmp_path / "single"), ann_kind="ivf",
                                   batch_size=BATCH, chunk_size=CHUNK, progress=False)
    # A single-process job interrupted after one chunk, finished by the Beam job.
    out = str(tmp_path / "beam")
    part = index.build_index_dir(bundle, items, out, ann_kind="ivf", batch_size=BATCH,
                                 chunk_size=CHUNK, progress=False, max_chunks=1)
    assert part["complete"] is False
    info = beam_embed.build_index_dir_beam(
        bundle, items, out, ann_kind="ivf", batch_size=BATCH, chunk_size=CHUNK,
        runner=RUNNER, pipeline_args=TWO_WORKERS, num_devices=1, range_bytes=256)
    assert info["beam"]["chunks_computed"] == info["beam"]["num_chunks"] - 1 >= 2
    assert info["counts"] == single["counts"] and info["num_items"] == single["num_items"] == 11
    assert ann.read_rows(out) == ann.read_rows(str(tmp_path / "single"))
    np.testing.assert_allclose(np.load(os.path.join(out, ann.EMBEDDINGS_FILE)),
                               np.load(tmp_path / "single" / ann.EMBEDDINGS_FILE), atol=1e-6)
    assert info["indexes"] == ["flat", "ivf"] and not os.path.exists(os.path.join(out, "chunks"))
    # The driver streamed the chunk files into the indexes: same answers as the single job's.
    queries = np.load(os.path.join(out, ann.EMBEDDINGS_FILE))
    for kind in ("flat", "ivf"):
        got = search_index.SearchIndex(out, kind).search(queries, 5)
        want = search_index.SearchIndex(str(tmp_path / "single"), kind).search(queries, 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)


def test_ivf_training_rows_are_the_single_jobs_sample(tmp_path):
    """Gathered chunk by chunk, in ``ann.build_index``'s order: the same trained quantizer."""
    from vlp_jax.indexing import beam_index

    rng = np.random.default_rng(3)
    x = rng.normal(size=(23, 4)).astype(np.float32)
    sizes, paths, start = [5, 0, 7, 11], [], 0
    for c, n in enumerate(sizes):
        path = str(tmp_path / f"c{c}.npz")
        with open(path, "wb") as f:
            f.write(beam_index.chunk_bytes({"emb": x[start:start + n], "rows": np.arange(n),
                                            "skipped": {}, "fixed": {}}, [{}] * n))
        paths.append(path)
        start += n
    for sample in (6, 23, 50):
        params = ann.AnnParams(train_sample=sample)
        got = beam_index._ivf_training_rows(paths, sizes, params)
        want = x if len(x) <= sample else x[np.random.default_rng(0).choice(len(x), sample,
                                                                            False)]
        np.testing.assert_array_equal(got, want)
