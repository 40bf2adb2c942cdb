"""Beam jobs with no shared disk: the dataset build and the embedding job read their inputs from
and write their outputs to s3:// (the SeaweedFS server the suite starts, credentials enforced,
endpoint and keys given as Beam's own ``--s3_*`` pipeline options; ``VLP_BEAM_STORES=gcs,s3``
adds the GCS emulator) on 2 DirectRunner worker processes, and give what the local
single-process build and index job give: the same records split by split, the same vocabulary
byte for byte, the same report counts, the same embeddings (1e-6), rows and skip counts, and an
index the search code loads."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="Beam is the optional extra: pip install -e '.[beam]'")

from test_beam_build import TIMING, _records, catalog  # noqa: E402,F401 (module fixture)
from test_beam_embed import BATCH, CHUNK, setup  # noqa: E402,F401 (module fixture)
from test_builder import S  # noqa: E402

from vlp_jax.data import store_commit  # noqa: E402
from vlp_jax.data.build import beam_io, beam_pipeline, tfds_builder  # noqa: E402
from vlp_jax.data.input import dataset_reader  # noqa: E402
from vlp_jax.indexing import ann, beam_embed, index  # noqa: E402
from vlp_jax.runtime.uri import StorageAccessError  # noqa: E402
from vlp_jax.serve import search_index  # noqa: E402

RUNNER = "FnApiRunner"


# The stores the two pipeline tests run on: SeaweedFS's S3 in the suite; add the GCS emulator
# with VLP_BEAM_STORES=gcs,s3 (same code above the file layer, tested on both stores below).
PIPELINE_STORES = os.environ.get("VLP_BEAM_STORES", "s3").split(",")


def _options(store) -> list[str]:
    if store.scheme == "gs":  # the emulator: STORAGE_EMULATOR_HOST, no credentials
        return ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    return [f"--s3_endpoint_url={store.endpoint}",
            f"--s3_access_key_id={store.env['AWS_ACCESS_KEY_ID']}",
            f"--s3_secret_access_key={store.env['AWS_SECRET_ACCESS_KEY']}",
            "--s3_region_name=us-east-1",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _report_counts(report: dict) -> dict:
    """The report without timings and the two fields that name locations."""
    return {k: v for k, v in report.items()
            if k not in TIMING + ("catalog_dir", "config_name")}


@pytest.mark.parametrize("store_name", ["gcs", "s3"])
def test_beam_io_on_both_stores(store_name, request, tmp_path):
    """The file layer the workers use, on the GCS emulator and on SeaweedFS: whole writes,
    ranged reads, listing, rename, deletes, and a missing object reads as FileNotFoundError
    (which the image decoder counts as image_missing) — not as an empty file."""
    store = request.getfixturevalue(store_name)
    beam_io.configure(_options(store))
    root = store.uri()
    beam_io.write_bytes(f"{root}/a/x.jsonl", b"first\nsecond line\n")
    assert beam_io.exists(f"{root}/a/x.jsonl") and beam_io.size(f"{root}/a/x.jsonl") == 18
    with beam_io.open_read(f"{root}/a/x.jsonl") as f:
        f.seek(6)
        assert f.readline() == b"second line\n"
    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "m.bin").write_bytes(b"\0" * 70_000)
    (local / "last.json").write_text("{}")
    beam_io.upload_tree(str(local), f"{root}/t", last=("last.json",))
    assert beam_io.glob(f"{root}/**") == [f"{root}/a/x.jsonl", f"{root}/t/last.json",
                                         f"{root}/t/sub/m.bin"]
    beam_io.rename(f"{root}/a/x.jsonl", f"{root}/a/y.jsonl")
    assert beam_io.glob(f"{root}/a/*") == [f"{root}/a/y.jsonl"]
    assert beam_io.read_bytes(f"{root}/a/y.jsonl") == b"first\nsecond line\n"
    with pytest.raises(FileNotFoundError):
        beam_io.read_bytes(f"{root}/a/x.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        beam_io.size(f"{root}/nothing")
    beam_io.delete_tree(root)
    assert beam_io.glob(f"{root}/**") == [] and not beam_io.exists(f"{root}/a/y.jsonl")


def test_refused_key_is_one_message_naming_the_uri_before_any_pipeline(s3, tmp_path):
    args = [a if not a.startswith("--s3_secret_access_key=") else
            "--s3_secret_access_key=wrong" for a in _options(s3)]
    where = s3.uri("catalog")
    try:
        with pytest.raises(StorageAccessError, match=f"catalog {where}/items.jsonl: the "
                           r"object store refused .*--s3_secret_access_key"):
            beam_pipeline.build_dataset_beam(where, str(tmp_path / "data"), runner=RUNNER,
                                             pipeline_args=args)
    finally:
        beam_io.configure(_options(s3))  # later callers must not inherit the wrong key
    assert not os.path.exists(tmp_path / "data")


@pytest.mark.parametrize("store_name", PIPELINE_STORES)
def test_beam_build_on_a_store_equals_local_build(store_name, request, catalog,  # noqa: F811
                                                   tmp_path):
    store = request.getfixturevalue(store_name)
    args = _options(store)
    beam_io.configure(args)
    root = store.uri()
    beam_io.upload_tree(catalog, f"{root}/catalog")
    single = tfds_builder.build_dataset(catalog, str(tmp_path / "single"), image_size=S,
                                        vocab_size=300)
    remote = beam_pipeline.build_dataset_beam(f"{root}/catalog", f"{root}/data", image_size=S,
                                              vocab_size=300, runner=RUNNER, pipeline_args=args,
                                              chunk_bytes=512, staging_dir=str(tmp_path / "st"))
    assert not remote.cache_hit and remote.location.startswith(f"{root}/data/vlp_catalog/")
    assert remote.report["beam"]["item_blocks"] >= 2  # really split between tasks
    # On the store: the committed attempt and its marker only (no stage folder, no temporary
    # shard), in the single-process build's layout.
    left = sorted(p[len(remote.location) + 1:] for p in beam_io.glob(f"{root}/data/**"))
    assert left[0] == store_commit.MARKER and all(
        p.startswith(remote.files_at[len(remote.location) + 1:] + "/") for p in left[1:]), left
    assert not [p for p in left if "/shard-" in p or ".tmp" in p], left
    # Read back as training reads it: staged, verified against the marker, counts checked.
    got = dataset_reader.load_dataset(remote.location, staging_dir=str(tmp_path / "st"))
    assert _records(got) == _records(single)
    assert _report_counts(got.report) == _report_counts(single.report)
    assert got.report["catalog_dir"] == f"{root}/catalog"
    for name in sorted(os.listdir(single.tokenizer_dir)):
        with open(os.path.join(single.tokenizer_dir, name), "rb") as f:
            assert beam_io.read_bytes(f"{remote.tokenizer_dir}/{name}") == f.read(), name
    # Either engine finds the other's committed build: the single-process entry point too.
    again = tfds_builder.build_dataset(f"{root}/catalog", f"{root}/data", image_size=S,
                                       vocab_size=300, staging_dir=str(tmp_path / "st"))
    assert again.cache_hit and again.location == remote.location
    assert again.files_at == remote.files_at


@pytest.mark.parametrize("store_name", PIPELINE_STORES)
def test_beam_embedding_on_a_store_equals_local_index_job(store_name, request,
                                                           setup, tmp_path):  # noqa: F811
    catalog_dir, bundle = setup
    store = request.getfixturevalue(store_name)
    args = _options(store)
    beam_io.configure(args)
    root = store.uri()
    beam_io.upload_tree(catalog_dir, f"{root}/catalog")
    beam_io.upload_tree(bundle.path, f"{root}/export")
    single = index.build_index_dir(bundle, os.path.join(catalog_dir, "items.jsonl"),
                                   str(tmp_path / "single"), ann_kind="ivf", batch_size=BATCH,
                                   chunk_size=CHUNK, progress=False)
    info = beam_embed.build_index_dir_beam(
        bundle, f"{root}/catalog/items.jsonl", f"{root}/index", ann_kind="ivf",
        bundle_loc=f"{root}/export", batch_size=BATCH, chunk_size=CHUNK, runner=RUNNER,
        pipeline_args=args, num_devices=1, range_bytes=512)
    assert info["beam"]["chunks_computed"] == info["beam"]["num_chunks"] >= 2
    assert info["counts"] == single["counts"] and info["num_items"] == single["num_items"]
    assert info["base_dir"] == f"{root}/catalog" and info["bundle"] == f"{root}/export"
    local = beam_io.download_tree(f"{root}/index", str(tmp_path / "copy"))
    assert sorted(os.listdir(local)) == sorted(
        [ann.EMBEDDINGS_FILE, ann.ITEMS_FILE, ann.INFO_FILE, "index_flat.faiss",
         "index_ivf.faiss"])  # the chunks are gone
    for name, want in info["files"].items():  # what a server checks after staging the index
        with open(os.path.join(local, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == want["sha256"], name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"}  # noqa: E731
                          for r in rows]
    assert strip(ann.read_rows(local)) == strip(ann.read_rows(str(tmp_path / "single")))
    emb = np.load(os.path.join(local, ann.EMBEDDINGS_FILE))
    np.testing.assert_allclose(emb, np.load(tmp_path / "single" / ann.EMBEDDINGS_FILE),
                               atol=1e-6)
    got = search_index.SearchIndex(local, "ivf").search(emb, 5)
    want = search_index.SearchIndex(str(tmp_path / "single"), "ivf").search(emb, 5)
    np.testing.assert_array_equal(got[1], want[1])
