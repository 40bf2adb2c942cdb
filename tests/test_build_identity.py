"""What a dataset build is known by must not move with the code: the cache key, the TFDS name,
version and file names, and the module a build recorded.

Training finds its build by ``data_dir/vlp_catalog/s{size}_{fingerprint}/1.0.0``; a changed key
silently rebuilds every cached dataset, a changed name or version orphans them.  A build also
records in ``dataset_info.json`` the module of the builder that made it (``moduleName``); builds
made while that was ``vlp_jax.data.builder`` must still open, since readers go by the files.
"""

from __future__ import annotations

import json
import os

import pytest
from test_builder import S, make_catalog

from vlp_jax.data.build import fingerprint, tfds_builder
from vlp_jax.data.input import dataset_reader

FORMER_MODULE = "vlp_jax.data.builder"


def _fixed_catalog(d: str) -> str:
    """Two items and a pair; the "images" are fixed bytes with a fixed mtime: the cache key
    reads their size and mtime, not their pixels."""
    os.makedirs(os.path.join(d, "images"))
    with open(os.path.join(d, "items.jsonl"), "w") as f:
        f.write('{"item_id": "a", "title": "red shirt", "image": "images/a.png"}\n'
                '{"item_id": "b", "title": "blue mug", "image": "images/b.png"}\n')
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        f.write('{"query": "shirt", "item_id": "a"}\n')
    for name, size in (("a", 100), ("b", 200)):
        path = os.path.join(d, "images", f"{name}.png")
        with open(path, "wb") as f:
            f.write(b"x" * size)
        os.utime(path, ns=(10**18, 10**18))
    return d


def test_cache_key_of_a_fixed_catalog_is_pinned(tmp_path):
    """Computed by the code that made the existing caches; a change here must be deliberate
    (``fingerprint.BUILD_FORMAT`` or the tokenizer recipe), never a side effect of a move."""
    catalog = _fixed_catalog(str(tmp_path / "catalog"))
    assert fingerprint.catalog_fingerprint(catalog, 64, "", 4000) == "0eeee48981710ce5e856"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    catalog = make_catalog(str(root / "catalog"))
    return catalog, tfds_builder.build_dataset(catalog, str(root / "tfds"), image_size=S,
                                               vocab_size=300)


def test_registered_name_version_and_files(build):
    catalog, handle = build
    assert (tfds_builder.VLPCatalog.name, str(tfds_builder.VLPCatalog.VERSION)) == (
        "vlp_catalog", "1.0.0")
    key = fingerprint.catalog_fingerprint(catalog, S, "", 300)
    parts = handle.dataset_dir.split(os.sep)
    assert parts[-3:] == ["vlp_catalog", f"s{S}_{key}", "1.0.0"]
    info = json.load(open(os.path.join(handle.dataset_dir, "dataset_info.json")))
    assert (info["name"], info["version"], info["fileFormat"]) == (
        "vlp_catalog", "1.0.0", "array_record")
    files = sorted(os.listdir(handle.dataset_dir))
    assert files == ["build_report.json", "dataset_info.json", "features.json", "tokenizer",
                     "vlp_catalog-items.array_record-00000-of-00001",
                     "vlp_catalog-train.array_record-00000-of-00001",
                     "vlp_catalog-valid.array_record-00000-of-00001"]


def test_a_build_recording_the_former_builder_module_still_opens(build, tmp_path):
    _, handle = build
    old = str(tmp_path / "old_build")
    os.makedirs(old)
    for name in os.listdir(handle.dataset_dir):
        src = os.path.join(handle.dataset_dir, name)
        if os.path.isfile(src):
            os.link(src, os.path.join(old, name))
        else:
            os.symlink(src, os.path.join(old, name))
    info_path = os.path.join(old, "dataset_info.json")
    info = json.load(open(info_path))
    os.remove(info_path)  # a hard link: rewrite a copy, not the fixture's file
    info["moduleName"] = FORMER_MODULE
    with open(info_path, "w") as f:
        json.dump(info, f)
    opened = dataset_reader.load_dataset(old)
    assert opened.report == handle.report
    for split, source in handle.sources.items():
        for a, b in zip(opened.sources[split], source, strict=True):
            assert a.keys() == b.keys()
            assert all((a[k] == b[k]).all() if k == "image" else a[k] == b[k] for k in a)
