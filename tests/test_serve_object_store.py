"""Serving from object storage (issue 34, scenario 3), against the GCS emulator and SeaweedFS's
S3 started by the suite: the export and the index job write to gs:// and s3://, the server
stages bundle and index from there (verified) and serves them, and reloads an object-store
index."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import serve_fixtures

from vlp_jax.indexing import ann, index_files, locations
from vlp_jax.runtime import fs
from vlp_jax.serve import server, swap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache_dir):
    return serve_fixtures.serving_run(tmp_path_factory, data_cache_dir)


def index_job(*args, cache):
    cmd = [sys.executable, "-m", "vlp_jax.indexing.index", *args, "--batch_size=64",
           "--chunk_size=128", "--progress=false", f"--cache_dir={cache}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_export_index_job_and_server_through_an_object_store(run, store, request, tmp_path):
    from vlp_jax.train import export_checkpoint

    objects = request.getfixturevalue(store)
    root = objects.uri()
    bundle_uri, v1_uri, v2_uri = (fs.join(root, name) for name in ("export", "v1", "v2"))
    export_checkpoint.export_from_checkpoint(run.config, run.workdir, out_dir=bundle_uri)
    assert fs.exists(fs.join(bundle_uri, "manifest.json"))
    items = os.path.join(run.catalog_dir, "items.jsonl")
    index_job(f"--bundle={bundle_uri}", f"--items={items}", f"--out={v1_uri}", "--ann=none",
              cache=tmp_path / "job")
    assert fs.read_json(fs.join(v1_uri, ann.INFO_FILE))["num_items"] == 300

    cache = str(tmp_path / "serve")
    service = server.load_service(bundle_uri, v1_uri, buckets=(1, 4), index_root=root,
                                  cache_dir=cache)
    try:
        local = service.holder.current.index.directory
        assert local.startswith(cache) and service.holder.current.index.source == v1_uri
        # Same checkpoint, same catalog: the object-store index holds the local run's vectors.
        emb = np.load(os.path.join(local, ann.EMBEDDINGS_FILE))
        np.testing.assert_allclose(emb, np.load(os.path.join(run.index_dir,
                                                             ann.EMBEDDINGS_FILE)), atol=2e-6)
        query = service.bundle.encode_queries(["black leather handbag"])[0]
        want = [run.items[i]["item_id"] for i in np.argsort(-(emb @ query))[:10]]
        got = [r["item_id"] for r in service.search("black leather handbag", 10)["results"]]
        assert got == want

        # Another index on the store (v1 minus 50 items, published as the index job does).
        v2 = tmp_path / "v2"
        shutil.copytree(local, v2, ignore=shutil.ignore_patterns("_staged.json"))
        info = json.loads((v2 / ann.INFO_FILE).read_text())
        rows = ann.read_rows(str(v2))[:250]
        index_files.write_index_dir(
            str(v2), embeddings=emb[:250], ids=np.arange(250), rows=rows,
            indexes=index_files.build_indexes(emb[:250], np.arange(250), ["flat"],
                                              ann.AnnParams())[0],
            tombstones={}, info={**info, "version": 2})
        locations.publish_dir(str(v2), v2_uri, last=ann.INFO_FILE)
        out = service.holder.reload(v2_uri)
        assert (out["serving"]["source"], out["serving"]["items"]) == (v2_uri, 250)
        assert service.search("hat", 5)["index_version"] == 2
        out = service.holder.reload()  # without a target: the configured --index URI again
        assert (out["serving"]["source"], out["serving"]["items"]) == (v1_uri, 300)

        # A staged copy that no longer matches its recorded checksums is refused.
        flat = os.path.join(service.holder.current.index.directory, ann.index_file("flat"))
        with open(flat, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 1]))
        with pytest.raises(swap.ReloadError, match="does not match its recorded SHA-256"):
            service.holder.reload()
        assert service.holder.current.index.source == v1_uri  # still serving
    finally:
        service.close()
