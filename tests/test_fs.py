"""The storage layer (vlp_jax.runtime.fs, object_store, staging) on local disk and on both
object-store servers: atomic writes, create-if-absent races, compare-and-swap, staging checks."""

import os
import threading

import pytest

from vlp_jax.runtime import fs, object_store, staging


@pytest.mark.parametrize("bad", ["gs:/bucket/x", "s3:bucket", "http://host/x", "gs://",
                                 "gs://b/x/../run", "gs://b//run", "s3://b/./run",
                                 "gs://b/run "])
def test_refuses_malformed_locations(bad):
    with pytest.raises(fs.StorageAccessError):
        fs.normalize(bad)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fs.normalize("run") == str(tmp_path / "run")
    assert fs.join("gs://b/run/", "checkpoints", "5") == "gs://b/run/checkpoints/5"
    assert fs.parent("s3://b/run/x.json") == "s3://b/run"
    assert fs.bucket_and_key("gs://b/run/x") == ("b", "run/x")


@pytest.fixture(params=["local", "gs", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "loc")
    return request.getfixturevalue("gcs" if request.param == "gs" else "s3").uri()


def test_round_trip_and_listing(location):
    fs.write_json(fs.join(location, "a.json"), {"x": 1})
    fs.write_bytes(fs.join(location, "sub", "b.bin"), b"\0" * 5)
    assert fs.read_json(fs.join(location, "a.json")) == {"x": 1}
    assert fs.listdir(location) == ["a.json", "sub"]
    assert fs.size(fs.join(location, "sub", "b.bin")) == 5
    fs.rmtree(location)
    assert not fs.exists(fs.join(location, "a.json"))


def test_create_exclusive_has_one_winner(location):
    target = fs.join(location, "lock")
    wins = []
    barrier = threading.Barrier(4)

    def racer(i):
        barrier.wait()
        wins.append(fs.create_exclusive(target, str(i).encode()))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert fs.read_text(target) in {"0", "1", "2", "3"}


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_replace_if_unchanged_refuses_a_stale_version(store, request):
    loc = request.getfixturevalue(store).uri("lock")
    assert fs.create_exclusive(loc, b"first")
    data, token = object_store.read_versioned(loc)
    assert data == b"first"
    assert object_store.replace_if_unchanged(loc, b"second", token)
    assert not object_store.replace_if_unchanged(loc, b"third", token)  # token is stale now
    assert fs.read_bytes(loc) == b"second"
    assert object_store.read_versioned(fs.join(fs.parent(loc), "absent")) is None


def test_missing_bucket_and_refused_credentials_are_named(s3, gcs, monkeypatch):
    with pytest.raises(fs.StorageAccessError, match="s3://no-such-bucket.*does not exist"):
        fs.check_access("s3://no-such-bucket/run", "workdir")
    with pytest.raises(fs.StorageAccessError, match="gs://no-such-bucket.*does not exist"):
        fs.check_access("gs://no-such-bucket/run", "workdir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    object_store.reset_clients()
    try:
        with pytest.raises(fs.StorageAccessError, match="access to s3://.* refused"):
            fs.check_access(s3.uri(), "workdir")
    finally:
        monkeypatch.undo()
        object_store.reset_clients()


def test_staging_copies_verifies_and_reuses(location, tmp_path):
    fs.write_bytes(fs.join(location, "a.bin"), os.urandom(3000))
    fs.write_bytes(fs.join(location, "d", "b.bin"), b"b" * 10)
    local = staging.stage(location, str(tmp_path / "cache"))
    if not fs.is_remote(location):
        assert local == fs.normalize(location)
        return
    assert open(os.path.join(local, "d", "b.bin"), "rb").read() == b"b" * 10
    assert staging.stage(location, str(tmp_path / "cache")) == local  # current: reused
    fs.write_bytes(fs.join(location, "d", "b.bin"), b"c" * 12)  # the source changed
    again = staging.stage(location, str(tmp_path / "cache"))
    assert open(os.path.join(again, "d", "b.bin"), "rb").read() == b"c" * 12
    assert not [n for n in os.listdir(tmp_path / "cache") if ".partial-" in n]


def test_staging_refuses_an_empty_source(s3, tmp_path):
    with pytest.raises(staging.StagingError, match="holds no files"):
        staging.stage(s3.uri("empty"), str(tmp_path))


def test_image_init_from_an_object_store_equals_the_local_folder(s3, tmp_path):
    """``model.image_init=s3://…``: the HF folder is staged (verified) and imported exactly as
    the local folder is."""
    import jax
    import numpy as np
    import vision_helpers as vh

    remote = s3.uri("vit_tiny")
    for name in os.listdir(vh.VIT_DIR):
        with open(os.path.join(vh.VIT_DIR, name), "rb") as f:
            fs.write_bytes(fs.join(remote, name), f.read())
    config = vh.image_config(remote)
    config.data.staging_dir = str(tmp_path / "staged")
    got_config, _, got = vh.imported(config)
    assert got_config.model.image_init.startswith(str(tmp_path / "staged"))
    _, _, want = vh.imported(vh.image_config(vh.VIT_DIR))
    jax.tree_util.tree_map(np.testing.assert_array_equal, want, got)


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_listings_see_what_another_process_wrote(store, request):
    """No per-process listing cache: a prefix listed once shows a later write from elsewhere."""
    import subprocess
    import sys

    loc = request.getfixturevalue(store).uri()
    fs.write_text(fs.join(loc, "a"), "1")
    assert fs.listdir(loc) == ["a"]
    code = (f"from vlp_jax.runtime import fs; fs.write_text({fs.join(loc, 'b')!r}, '2')")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    assert fs.listdir(loc) == ["a", "b"]
    assert fs.exists(fs.join(loc, "b"))
