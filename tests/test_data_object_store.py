"""The dataset on object storage (GCS emulator and SeaweedFS S3 on 127.0.0.1): catalog and cache
on gs:// and s3:// give the same records as the local build; the build is published with a
commit marker and read through a verified local copy; damage in the store is named by URI;
racing builders commit exactly one build; the staged copy is reused while current."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

from vlp_jax.data import shard_check, store_commit
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import from_config
from vlp_jax.data.input import dataset_reader
from vlp_jax.runtime import fs, staging


def _records(handle: dataset_reader.DatasetHandle) -> dict[str, list]:
    def plain(record):
        return {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in record.items()}

    return {split: [plain(r) for r in source] for split, source in handle.sources.items()}


@pytest.fixture(scope="module")
def local_build(make_tiny_config):
    """The tests' tiny catalog and its local build (shared with the rest of the suite)."""
    config = make_tiny_config()
    handle = from_config.prepare_dataset(config.data)
    return handle, from_config.builtin_catalog_dir(config.data), _records(handle)


@pytest.fixture(scope="module", params=["gcs", "s3"])
def remote_run(request, local_build, make_tiny_config, tmp_path_factory):
    """Catalog and cache on the store, built once per store (process 0's part of a pod run):
    on gs:// the built-in catalog generated into the cache, on s3:// a user catalog uploaded."""
    store = request.getfixturevalue(request.param)
    config = make_tiny_config()
    config.data.cache_dir = store.uri("cache")
    if store.scheme == "s3":
        config.data.catalog_dir = store.uri("catalog")
        store_commit.upload_tree(local_build[1], config.data.catalog_dir, last=("items.jsonl",))
    config.data.staging_dir = str(tmp_path_factory.mktemp(f"staged_{store.scheme}"))
    return store, config, from_config.prepare_dataset(config.data)


def test_build_on_a_store_holds_the_local_records(remote_run, local_build):
    store, config, handle = remote_run
    local_handle, _, local_records = local_build
    assert not handle.cache_hit
    assert handle.location.startswith(f"{store.scheme}://") and handle.location.endswith("1.0.0")
    marker = store_commit.read_marker(handle.location)
    assert handle.files_at == fs.join(handle.location, marker["attempt"])
    assert handle.dataset_dir.startswith(config.data.staging_dir)  # read from local disk
    assert _records(handle) == local_records
    assert handle.report["splits"] == local_handle.report["splits"]
    catalog_dir = config.data.catalog_dir or from_config.builtin_catalog_dir(config.data)
    assert handle.report["catalog_dir"] == catalog_dir
    assert catalog_dir.startswith(config.data.catalog_dir or config.data.cache_dir)
    local_vocab = tokenizer_lib.load_tokenizer(local_handle.tokenizer_dir).get_vocab()
    assert tokenizer_lib.load_tokenizer(handle.tokenizer_dir).get_vocab() == local_vocab
    # The store holds exactly the marker and one attempt with every file the builder wrote.
    assert fs.listdir(handle.location) == sorted([store_commit.MARKER, marker["attempt"]])
    assert staging.listing(handle.files_at).keys() == marker["files"].keys()


def test_another_host_stages_the_committed_build_and_reuses_its_copy(remote_run, local_build,
                                                                     tmp_path):
    _, config, first = remote_run
    config.data.staging_dir = str(tmp_path / "host1")
    other = from_config.prepare_dataset(config.data)  # a second host: finds the marker, stages
    assert other.cache_hit and other.location == first.location
    assert other.dataset_dir.startswith(str(tmp_path / "host1"))
    assert _records(other) == local_build[2]
    shard = shard_check.shard_files(other.dataset_dir)[0][0]
    inode = os.stat(shard).st_ino
    again = from_config.prepare_dataset(config.data)
    assert again.dataset_dir == other.dataset_dir and os.stat(shard).st_ino == inode  # reused
    # A new version of an object in the store invalidates the copy: it is staged again.
    report_uri = fs.join(first.files_at, dataset_reader.REPORT_FILE)
    text = fs.read_text(report_uri)
    fs.write_text(report_uri, text.replace('"image_encoding": "uint8', '"image_encoding": "UINT8'))
    third = from_config.prepare_dataset(config.data)
    assert third.report["image_encoding"].startswith("UINT8")
    assert os.stat(shard).st_ino != inode
    assert _records(third) == local_build[2]
    fs.write_text(report_uri, text)  # leave the module's build as it was


@pytest.fixture(params=["gcs", "s3"])
def published(request, local_build, tmp_path):
    """A private copy of the local build published to a fresh location of the store."""
    store = request.getfixturevalue(request.param)
    copy = str(tmp_path / "build")
    shutil.copytree(local_build[0].dataset_dir, copy)
    location = store.uri("tfds", "vlp_catalog", "s32_x", "1.0.0")
    attempt = store_commit.publish(copy, location, str(tmp_path / "staged"))
    return location, attempt, str(tmp_path / "staged2")


def _shard_uri(attempt: str, split: str) -> str:
    return fs.join(attempt, f"vlp_catalog-{split}.array_record-00000-of-00001")


def test_truncated_or_missing_shard_in_the_store_is_named(published):
    location, attempt, staging_dir = published
    train = _shard_uri(attempt, "train")
    data = fs.read_bytes(train)
    fs.write_bytes(train, data[: len(data) // 2])
    with pytest.raises(shard_check.DatasetCorruptError) as err:
        dataset_reader.load_dataset(location, staging_dir=staging_dir)
    assert str(err.value).startswith(
        f"dataset build {location} is damaged: {train} holds {len(data) // 2} bytes, the build "
        f"wrote {len(data)} (truncated or replaced). Rebuild it: rerun the same command with "
        "--rebuild_data")
    assert err.value.dataset_dir == location  # what --rebuild_data deletes
    fs.remove(_shard_uri(attempt, "items"))
    with pytest.raises(shard_check.DatasetCorruptError,
                       match=f"{_shard_uri(attempt, 'items')} is missing"):
        dataset_reader.load_dataset(location, staging_dir=staging_dir)
    dataset_reader.delete_build(location)
    assert not fs.exists(fs.join(location, store_commit.MARKER))
    assert staging.listing(location) == {}


def test_a_shard_short_of_records_is_refused(published, local_build):
    """The staged copy's shards are opened and counted against dataset_info.json: a build whose
    metadata claims one record more than its shard holds never trains."""
    location, attempt, staging_dir = published
    good = dataset_reader.load_dataset(location, staging_dir=staging_dir)
    assert len(good.sources["train"]) == len(local_build[2]["train"])
    info_uri = fs.join(attempt, shard_check.INFO_FILE)
    info = fs.read_json(info_uri)
    n = next(s for s in info["splits"] if s["name"] == "train")["shardLengths"][0]
    assert len(str(int(n) + 1)) == len(str(n))  # same byte size: the marker's sizes still match
    fs.write_text(info_uri, fs.read_text(info_uri).replace(f'"{n}"', f'"{int(n) + 1}"'))
    train = _shard_uri(attempt, "train")
    with pytest.raises(shard_check.DatasetCorruptError,
                       match=f"{train} holds {n} records, {int(n) + 1} expected"):
        dataset_reader.load_dataset(location, staging_dir=staging_dir)


def test_split_length_is_checked_against_the_build_report(local_build, tmp_path):
    copy = str(tmp_path / "build")
    shutil.copytree(local_build[0].dataset_dir, copy)
    report_path = os.path.join(copy, dataset_reader.REPORT_FILE)
    report = json.load(open(report_path))
    report["splits"]["valid"]["kept"] += 1
    with open(report_path, "w") as f:
        json.dump(report, f)
    with pytest.raises(shard_check.DatasetCorruptError,
                       match=r"its valid split reads \d+ records where build_report.json records"):
        dataset_reader.load_dataset(copy)


def test_a_build_without_its_marker_is_absent(gcs, local_build, tmp_path):
    location = gcs.uri("tfds", "1.0.0")
    store_commit.upload_tree(local_build[0].dataset_dir, fs.join(location, "attempt-x"))
    assert store_commit.stage_build(location, str(tmp_path)) is None
    with pytest.raises(ValueError, match="holds no committed vlp_jax dataset build"):
        dataset_reader.load_dataset(location, staging_dir=str(tmp_path))
    with pytest.raises(ValueError, match="reads a local copy"):
        shard_check.check_build(fs.join(location, "attempt-x"))


def test_racing_builders_commit_exactly_one_build(s3, local_build, tmp_path):
    location = s3.uri("tfds", "1.0.0")
    copies = []
    for i in range(3):
        copies.append(str(tmp_path / f"b{i}"))
        shutil.copytree(local_build[0].dataset_dir, copies[-1])
    results, barrier = [], threading.Barrier(3)

    def build(i: int) -> None:
        barrier.wait()
        results.append(store_commit.publish(copies[i], location, str(tmp_path / f"staged{i}")))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    marker = store_commit.read_marker(location)
    assert results == [fs.join(location, marker["attempt"])] * 3
    # No leftovers: the losers deleted their uploads (listed as files: SeaweedFS keeps empty
    # folders).
    tops = {rel.split("/")[0] for rel in staging.listing(location)}
    assert tops == {store_commit.MARKER, marker["attempt"]}
    handle = dataset_reader.load_dataset(location, staging_dir=str(tmp_path / "reader"))
    assert _records(handle) == local_build[2]


def test_rebuild_data_replaces_a_damaged_build_in_the_store(remote_run, local_build):
    store, config, first = remote_run
    if store.scheme == "gs":
        pytest.skip("store-agnostic (delete_build + build); run on s3 only to save a build")
    fs.remove(_shard_uri(first.files_at, "test"))
    with pytest.raises(shard_check.DatasetCorruptError, match="is missing"):
        from_config.prepare_dataset(config.data)
    handle = from_config.prepare_dataset(config.data, rebuild=True)
    assert handle.location == first.location and handle.files_at != first.files_at
    assert _records(handle) == local_build[2]


def test_tokenizer_folder_on_a_store_is_staged(s3, local_build, tmp_path):
    folder = s3.uri("tok")
    store_commit.upload_tree(local_build[0].tokenizer_dir, folder)
    tok = tokenizer_lib.load_tokenizer(folder, str(tmp_path))
    assert tok.get_vocab() == tokenizer_lib.load_tokenizer(local_build[0].tokenizer_dir).get_vocab()
    with pytest.raises(ValueError, match="tokenizer folder 's3://.*' does not exist"):
        tokenizer_lib.load_tokenizer(s3.uri("absent"), str(tmp_path))


def test_missing_bucket_is_named_before_any_build(s3, make_tiny_config):
    config = make_tiny_config()
    config.data.cache_dir = "s3://no-such-bucket/cache"
    with pytest.raises(fs.StorageAccessError, match="data.cache_dir s3://no-such-bucket/cache"):
        from_config.prepare_dataset(config.data)


def test_remote_images_missing_are_skipped_records_refused_access_aborts(s3, monkeypatch):
    from PIL import Image

    from vlp_jax.data import records
    from vlp_jax.runtime import object_store

    catalog = s3.uri("catalog")
    local = os.path.join(str(s3.workdir), "a.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(local)
    fs.write_bytes(fs.join(catalog, "images", "a.png"), open(local, "rb").read())
    fallback = records.ItemMeta("a", "t", ["images/missing.png", "images/a.png"])
    present = records.ItemMeta("b", "t", ["images/a.png"])
    fetched = records.fetch_images(catalog, [fallback, present])
    assert list(fetched) == [fs.join(catalog, "images", "a.png")]  # the missing one left out
    arr, notes = records.load_item_image(catalog, fallback, 8, fetched)
    assert notes == ["image_fallback"] and arr[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(records.BadRecord, match="image_missing"):
        records.load_item_image(catalog, records.ItemMeta("c", "t", ["images/x.png"]), 8, {})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    object_store.reset_clients()
    try:  # refused credentials: nothing fetched, and the reader's own read must abort
        assert records.fetch_images(catalog, [present]) == {}
    finally:
        monkeypatch.undo()
        object_store.reset_clients()

    def refused(path):  # epath keeps its own client, so the refusal is simulated for the reader
        raise PermissionError(f"403 Forbidden: {path}")

    monkeypatch.setattr(records.fs, "read_bytes", refused)
    with pytest.raises(PermissionError):  # an outage is never counted as a bad image
        records.load_item_image(catalog, present, 8, {})
