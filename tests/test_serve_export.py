"""Serving bundle export/load and the offline index job, on one tiny trained run."""

import json
import os
import shutil
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import serve_fixtures
from checkpoint_helpers import saved_state
from PIL import Image

from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import from_config
from vlp_jax.data.input import preprocess
from vlp_jax.indexing import ann, export, index
from vlp_jax.models import init_params, make_model
from vlp_jax.serve import load_bundle, search_index
from vlp_jax.train import export_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache_dir):
    return serve_fixtures.serving_run(tmp_path_factory, data_cache_dir)


@pytest.fixture(scope="module")
def bundle(run):
    return load_bundle(run.bundle_dir)


@pytest.fixture(scope="module")
def training_params(run):
    """(dataset handle, tokenizer, training model, params of the final checkpoint, step)."""
    state, step = saved_state(run.workdir)
    handle = from_config.prepare_dataset(run.config.data)
    tok = tokenizer_lib.load_tokenizer(handle.tokenizer_dir)
    model = make_model(run.config, len(tok))
    return types.SimpleNamespace(data=handle, tokenizer=tok, model=model), \
        state["params"], step


def _jit_apply(model, method):
    """The training model's encoder, jitted (eager flax apply is slow on 2 cores)."""
    return jax.jit(lambda params, *args: model.apply(
        {"params": params}, *args, method=getattr(model, method))["embedding"])


def test_export_layout_manifest_and_params_only(run, training_params):
    r, params, step = training_params
    names = sorted(os.listdir(run.bundle_dir))
    assert names == ["config.json", "item_tower", "manifest.json", "preprocessing.json",
                     "query_tower", "tokenizer"]
    assert not [n for n in os.listdir(run.workdir) if n.startswith(".export")]  # no temp dirs
    manifest = json.load(open(os.path.join(run.bundle_dir, "manifest.json")))
    assert manifest["step"] == step == serve_fixtures.NUM_STEPS
    assert manifest["embed_dim"] == run.config.model.embed_dim
    assert manifest["vocab_size"] == len(r.tokenizer)
    assert manifest["versions"]["jax"] == jax.__version__
    assert manifest["towers"]["query"]["subtrees"] == ["query_encoder", "query_proj"]
    assert manifest["towers"]["item"]["subtrees"] == ["item_encoder", "item_proj", "patch_embed"]
    # The checkpoints hold exactly those subtrees, values equal to the training params, and
    # none of the training-only parts (heads, temperature, optimizer) of the full state.
    ckptr = ocp.StandardCheckpointer()
    for tower in ("query", "item"):
        saved = ckptr.restore(os.path.join(run.bundle_dir, f"{tower}_tower"))
        assert sorted(saved) == manifest["towers"][tower]["subtrees"]
        want = {k: params[k] for k in saved}
        jax.tree_util.tree_map(np.testing.assert_array_equal, saved, want)
        count = sum(np.size(x) for x in jax.tree_util.tree_leaves(saved))
        assert manifest["towers"][tower]["param_count"] == count
    ckptr.close()
    assert {"mlm_head", "mpm_head", "logit_scale"} <= set(params)  # present in training only
    prep = json.load(open(os.path.join(run.bundle_dir, "preprocessing.json")))
    assert (prep["image_size"], prep["patch_size"], prep["query_len"]) == (32, 8, 12)


def test_bundle_matches_training_model(run, bundle, training_params):
    """Bundle embeddings == the training-time model's, from the raw files of the catalog."""
    r, params, _ = training_params
    n = 20
    items_src = r.data.sources["items"]
    records = [items_src[i] for i in range(n)]
    assert [x["item_id"] for x in records] == [x["item_id"] for x in run.items[:n]]
    tok, mask = preprocess.encode_texts(r.tokenizer, [x["title"] for x in records], 24)
    patches = preprocess.image_to_patches(np.stack([x["image"] for x in records]), 8)
    ref_items = _jit_apply(r.model, "encode_item")(params, tok, mask, patches)
    got_items = bundle.encode_items(run.items[:n], base_dir=run.catalog_dir)
    queries = ["red dress", "nordvik cotton t-shirt", "striped umbrella", "bottle", "?"]
    qt, qm = preprocess.encode_texts(r.tokenizer, queries, 12)
    ref_q = _jit_apply(r.model, "encode_query")(params, qt, qm)
    got_q = bundle.encode_queries(queries)
    for got, ref in ((got_items, ref_items), (got_q, ref_q)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, np.asarray(ref), atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bucketed_shapes_compile_once_per_bucket(run):
    b = load_bundle(run.bundle_dir, towers=("query",), num_devices=1, buckets=(1, 4))
    queries = [f"query number {i}" for i in range(11)]
    full = b.encode_queries(queries)  # chunks of 4, 4, 3 (padded to 4)
    assert b.trace_counts["query"] == 1
    for size in (1, 2, 3, 4, 5, 9):
        np.testing.assert_allclose(b.encode_queries(queries[:size]), full[:size], atol=1e-6)
    assert b.trace_counts == {"query": 2, "item": 0}  # buckets 4 and 1, never per size
    assert b.encode_queries([]).shape == (0, b.embed_dim)
    # Length buckets: short queries are cut to 8 tokens (one more program), and cutting the
    # padding columns leaves every embedding as it was at the full 12.
    assert b.query_lens == (8, 12)
    shorts = ["red dress", "bottle", "striped umbrella"]
    tokens, mask = preprocess.encode_texts(b.tokenizer, shorts, 12)
    assert mask.sum(axis=1).max() <= 8
    at_full = b._run_bucketed(b._encode_query, (tokens, mask))  # the (4, 12) program
    np.testing.assert_allclose(b.encode_queries(shorts), at_full, atol=1e-6)
    assert b.trace_counts["query"] == 3
    long = "nordvik striped cotton t-shirt with a long red collar and buttons"
    np.testing.assert_allclose(b.encode_queries([*shorts, long])[:3], at_full, atol=1e-6)
    b.warmup()  # every (batch, length) bucket: 2 x 2 programs
    assert b.trace_counts["query"] == 4


def test_bundle_input_errors_are_clear(run, bundle, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_bundle(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not a serving bundle"):
        load_bundle(str(tmp_path))
    with pytest.raises(ValueError, match="list of strings"):
        bundle.encode_queries("red dress")
    with pytest.raises(ValueError, match="query 1 is a int"):
        bundle.encode_queries(["ok", 3])
    good = dict(run.items[0])
    with pytest.raises(ValueError, match="bad item record 1: empty_title"):
        bundle.encode_items([good, {**good, "title": "  "}], base_dir=run.catalog_dir)
    with pytest.raises(ValueError, match="bad item record 0: image_missing"):
        bundle.encode_items([{**good, "image": "images/none.png"}], base_dir=run.catalog_dir)
    with pytest.raises(ValueError, match="towers"):
        load_bundle(run.bundle_dir, towers=("query",)).encode_items([good])
    with pytest.raises(ValueError, match="towers must be"):
        load_bundle(run.bundle_dir, towers=("ranking",))


def test_shared_query_encoder_bundle_and_atomic_replace(run, tmp_path, monkeypatch):
    """Shared mode: the query bundle alone holds the item tower's text layers it needs."""
    config = serve_fixtures.serving_config(run.config.data.cache_dir)
    config.model.shared_query_encoder = True
    tok_dir = os.path.join(run.bundle_dir, "tokenizer")
    vocab = len(tokenizer_lib.load_tokenizer(tok_dir))
    model = export.serving_model(config, vocab)
    params = jax.jit(lambda key: init_params(model, config, key))(jax.random.key(3))  # no heads
    out = str(tmp_path / "export")
    export.export_bundle(out, params=params, config=config, tokenizer=tok_dir, step=7)
    b = load_bundle(out, towers=("query",), num_devices=1)
    assert sorted(b.params) == ["item_encoder", "query_proj"]
    queries = ["red dress", "leather bag"]
    tokens, mask = preprocess.encode_texts(b.tokenizer, queries, 12)
    ref = _jit_apply(model, "encode_query")(params, tokens, mask)
    np.testing.assert_allclose(b.encode_queries(queries), np.asarray(ref), atol=2e-6)
    # A failing export leaves the previous bundle untouched and no temporary directory.
    before = open(os.path.join(out, "manifest.json")).read()
    config.model.embed_dim = 16  # params no longer match the config
    with pytest.raises(ValueError, match="query tower params do not match"):
        export.export_bundle(out, params=params, config=config, tokenizer=tok_dir, step=8)
    config.model.embed_dim = 32

    def fail(path, tree):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_save_tree", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_bundle(out, params=params, config=config, tokenizer=tok_dir, step=8)
    assert open(os.path.join(out, "manifest.json")).read() == before
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_index_cli_output(run, bundle):
    info = json.load(open(os.path.join(run.index_dir, "index_info.json")))
    assert info["indexes"] == ["flat", "hnsw"]
    assert info["num_items"] == len(run.items) == 300
    assert info["counts"]["total_skipped"] == 0
    assert info["chunks_computed"] == 3  # 300 items in chunks of 128
    emb = np.load(os.path.join(run.index_dir, "embeddings.npy"))
    rows = [json.loads(line) for line in open(os.path.join(run.index_dir, "items.jsonl"))]
    assert [r["item_id"] for r in rows] == [x["item_id"] for x in run.items]
    np.testing.assert_allclose(emb[:8], bundle.encode_items(run.items[:8], run.catalog_dir),
                               atol=2e-6)  # CLI sharded over 8 devices == bundle API
    flat = search_index.SearchIndex(run.index_dir, "flat")
    scores, top = flat.search(emb[:50], 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(50))  # each item finds itself
    assert not os.path.exists(os.path.join(run.index_dir, "chunks"))


def _bad_catalog(run, root):
    """40 good items + one of each bad kind; returns (items path, the records to be kept)."""
    os.makedirs(root / "images")
    good = []
    for item in run.items[:40]:
        shutil.copy(os.path.join(run.catalog_dir, item["image"]), root / "images")
        good.append({**item, "image": "images/" + os.path.basename(item["image"])})
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(root / "images" / "rgba.png")
    rgba = {"item_id": "x5", "title": "red rgba", "image": "images/rgba.png"}
    fallback = {"item_id": "x6", "title": "first image gone",
                "images": ["images/gone.png", good[1]["image"]]}
    bad = [{"item_id": "x2", "image": good[0]["image"]}, {**good[0], "title": "duplicate id"},
           {"item_id": "x3", "title": "gone", "image": "images/gone.png"},
           {"item_id": "x4", "title": "bad", "image": "images/corrupt.png"}]
    lines = [json.dumps(x).encode() for x in good[:20] + bad + [rgba, fallback] + good[20:]]
    lines[20:20] = [b"{not json", b'{"item_id": "x1", "title": "caf\xe9", "image": "i.png"}']
    path = root / "items.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), good[:20] + [rgba, fallback] + good[20:]


def test_index_job_skips_bad_records_and_resumes(run, bundle, tmp_path):
    items_path, kept = _bad_catalog(run, tmp_path / "cat")
    out = str(tmp_path / "index")
    params = ann.AnnParams(ivf_nlist=2, ivf_nprobe=2)
    kwargs = dict(ann_kind="ivf", ann_params=params, batch_size=8, chunk_size=16,
                  progress=False)
    partial = index.build_index_dir(bundle, items_path, out, max_chunks=2, **kwargs)
    assert not partial["complete"] and partial["chunks_computed"] == 2  # "interrupted"
    assert not os.path.exists(os.path.join(out, "index_info.json"))
    info = index.build_index_dir(bundle, items_path, out, **kwargs)
    assert (info["chunks_reused"], info["chunks_computed"]) == (2, 1)  # 44 candidates / 16
    assert info["counts"]["skipped"] == {"duplicate_item_id": 1, "image_missing": 1,
                                         "image_unreadable": 1, "invalid_json": 1,
                                         "missing_key": 1, "non_utf8": 1}
    assert info["counts"]["fixed"] == {"converted_rgba": 1, "image_fallback": 1}
    assert info["counts"]["lines"] == 48 and info["counts"]["kept"] == 42
    rows = [json.loads(line) for line in open(os.path.join(out, "items.jsonl"))]
    assert [r["item_id"] for r in rows] == [x["item_id"] for x in kept]
    assert rows[21]["image"] == kept[21]["images"][1]  # the image actually embedded
    emb = np.load(os.path.join(out, "embeddings.npy"))
    base = os.path.dirname(items_path)
    np.testing.assert_allclose(emb, bundle.encode_items(kept, base_dir=base), atol=2e-6)
    ivf = search_index.SearchIndex(out)
    assert ivf.kind == "ivf" and len(ivf) == 42
    # Leftover chunks of another job are refused, not mixed in.
    os.makedirs(os.path.join(out, "chunks"))
    with open(os.path.join(out, "chunks", "job.json"), "w") as f:
        json.dump({"items_sha256": "other"}, f)
    with pytest.raises(ValueError, match="different job"):
        index.build_index_dir(bundle, items_path, out, **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax read noise
def test_export_skips_an_unreadable_newest_checkpoint(run, bundle, tmp_path, caplog):
    """--mode=export falls back to the newest readable step, like resume and --mode=eval."""
    src = os.path.join(run.workdir, "checkpoints")
    shutil.copytree(src, tmp_path / "checkpoints")
    good = serve_fixtures.NUM_STEPS
    bad = tmp_path / "checkpoints" / str(good + 1)
    shutil.copytree(tmp_path / "checkpoints" / str(good), bad)  # a newer step, then damaged
    data = sorted((bad / "state").rglob("d/*"), key=lambda p: p.stat().st_size)[-1]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with caplog.at_level("WARNING"):
        out = export_checkpoint.export_from_checkpoint(
            run.config, str(tmp_path), out_dir=str(tmp_path / "b"))
    assert any(f"checkpoints/{good + 1} is unusable" in r.getMessage() for r in caplog.records)
    assert json.load(open(os.path.join(out, "manifest.json")))["step"] == good
    texts = ["red cotton shirt", "a"]
    np.testing.assert_array_equal(load_bundle(out).encode_queries(texts),
                                  bundle.encode_queries(texts))
