"""TFDS builder on a hand-made catalog holding every kind of bad record.

Each bad line below is annotated with the report reason it must produce; the test asserts the
exact counts, the exact records per split, and pixel values after conversion/resize.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import records
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.data.build import fingerprint, tfds_builder
from vlp_jax.data.input import dataset_reader

S = 16  # image_size of the tests: small and fast


def _save(img: Image.Image, path: str, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)


def _write_images(d: str) -> None:
    im = os.path.join(d, "images")
    _save(Image.new("RGB", (20, 30), (255, 0, 0)), f"{im}/red.png")
    _save(Image.new("RGB", (S, S), (0, 255, 0)), f"{im}/green.png")
    _save(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), f"{im}/cmyk.tiff")
    rgba = Image.new("RGBA", (S, S), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (S // 2, 0, S, S))  # right half fully transparent -> white
    _save(rgba, f"{im}/rgba.png")
    _save(Image.new("L", (40, 40), 100), f"{im}/gray.png")
    pal = Image.new("P", (S, S), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    _save(pal, f"{im}/pal.png")
    _save(Image.new("LA", (S, S), (50, 255)), f"{im}/la.png")
    _save(Image.new("RGB", (1, 1), (10, 20, 30)), f"{im}/tiny.png")
    with open(f"{im}/text.png", "w") as f:
        f.write("not an image")
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    _save(Image.fromarray(noisy), f"{im}/full.png")
    with open(f"{im}/full.png", "rb") as f:
        data = f.read()
    with open(f"{im}/trunc.png", "wb") as f:
        f.write(data[: len(data) // 2])


def _line(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _item(item_id, title, image="images/red.png") -> bytes:
    return _line({"item_id": item_id, "title": title, "image": image})


ITEM_LINES = [
    _item("i1", "Red striped T-shirt"),  # kept
    _item("i2", "Green cotton dress", "images/green.png"),  # kept
    _item("i3", "cmyk jacket", "images/cmyk.tiff"),  # kept, converted_cmyk
    _item("i4", "blue transparent bag", "images/rgba.png"),  # kept, converted_rgba
    _item("i5", "grey socks", "images/gray.png"),  # kept, converted_l
    _item("i6", "palette hat", "images/pal.png"),  # kept, converted_p
    _item("i7", "la scarf", "images/la.png"),  # kept, converted_la
    _item("i8", "tiny ring", "images/tiny.png"),  # kept, tiny_image
    _item("i9", "ghost", "images/missing.png"),  # image_missing
    _item("i10", "text file", "images/text.png"),  # image_unreadable
    _item("i11", "truncated", "images/trunc.png"),  # image_unreadable
    _item("i12", ""),  # empty_title
    _item("i13", "  \t "),  # empty_title
    _item("i14", "long " + "a" * 12_000),  # kept, truncated_title
    b'{"item_id": "i15", "title": \n',  # invalid_json
    b'{"item_id": "i16", "title": "caf\xe9", "image": "images/red.png"}\n',  # non_utf8
    _line({"item_id": "i17", "image": "images/red.png"}),  # missing_key (title)
    _line({"title": "no id", "image": "images/red.png"}),  # missing_key (item_id)
    _item("i1", "duplicate of i1", "images/green.png"),  # duplicate_item_id
    _line({"item_id": "i20", "title": "fallback list",
           "images": ["images/nope.png", "images/green.png"]}),  # kept, image_fallback
    b"   \n",  # blank: ignored, not counted
    b"[1, 2]\n",  # invalid_json (not an object)
    _line({"item_id": "i23", "title": 123, "image": "images/red.png"}),  # bad_type
    _item("i24", "红色条纹T恤 纯棉 男款"),  # kept
]
KEPT_IDS = ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i14", "i20", "i24"]

TRAIN_LINES = [
    _line({"query": "red shirt", "item_id": "i1"}),
    _line({"query": "green dress", "item_id": "i2", "slice": "visual"}),
    _line({"query": "x", "item_id": "nope"}),  # unknown_item
    _line({"query": "x", "item_id": "i9"}),  # skipped_item (its image is missing)
    _line({"query": "x", "item_id": "i12"}),  # skipped_item (empty title)
    _line({"query": "  ", "item_id": "i1"}),  # empty_query
    _line({"item_id": "i1"}),  # missing_key
    b'{"query": "broken"\n',  # invalid_json
    b'{"query": "\xff\xfe", "item_id": "i1"}\n',  # non_utf8
    _line({"query": "红色条纹T恤", "item_id": "i24", "slice": "textual"}),
    _line({"query": "q" * 11_000, "item_id": "i3"}),  # kept, truncated_query
    _line({"query": "blue bag", "item_id": "i4", "slice": None}),  # slice -> ""
]
VALID_LINES = [
    _line({"query": "xylophone grey socks", "item_id": "i5", "slice": "textual"}),
    _line({"query": "tiny ring", "item_id": 8}),  # int id 8 reads as "8": unknown_item
    _line({"query": "palette", "item_id": "i6"}),
]
TEST_LINES = [b"not json\n", _line({"query": "x", "item_id": "i999"})]  # empty split


def make_catalog(d: str) -> str:
    _write_images(d)
    for name, lines in [("items", ITEM_LINES), ("train", TRAIN_LINES),
                        ("valid", VALID_LINES), ("test", TEST_LINES)]:
        with open(os.path.join(d, f"{name}.jsonl"), "wb") as f:
            f.writelines(lines)
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder")
    catalog = make_catalog(str(root / "catalog"))
    handle = tfds_builder.build_dataset(catalog, str(root / "tfds"), image_size=S, vocab_size=300)
    return catalog, str(root / "tfds"), handle


def test_report_counts_every_reason_exactly(built):
    _, _, handle = built
    splits = handle.report["splits"]
    assert splits["items"] == {
        "lines": 23,
        "kept": 11,
        "skipped": {"bad_type": 1, "duplicate_item_id": 1, "empty_title": 2,
                    "image_missing": 1, "image_unreadable": 2, "invalid_json": 2,
                    "missing_key": 2, "non_utf8": 1},
        "fixed": {"converted_cmyk": 1, "converted_l": 1, "converted_la": 1,
                  "converted_p": 1, "converted_rgba": 1, "image_fallback": 1,
                  "tiny_image": 1, "truncated_title": 1},
    }
    assert splits["train"] == {
        "lines": 12,
        "kept": 5,
        "skipped": {"empty_query": 1, "invalid_json": 1, "missing_key": 1, "non_utf8": 1,
                    "skipped_item": 2, "unknown_item": 1},
        "fixed": {"truncated_query": 1},
    }
    assert splits["valid"] == {"lines": 3, "kept": 2, "skipped": {"unknown_item": 1}, "fixed": {}}
    assert splits["test"] == {"lines": 2, "kept": 0,
                              "skipped": {"invalid_json": 1, "unknown_item": 1}, "fixed": {}}
    assert handle.report["total_skipped"] == 12 + 7 + 1 + 2
    assert handle.report["image_size"] == S
    on_disk = json.load(open(os.path.join(handle.dataset_dir, dataset_reader.REPORT_FILE)))
    assert on_disk == handle.report


def test_split_sizes_and_item_round_trip(built):
    _, _, handle = built
    assert {k: len(v) for k, v in handle.sources.items()} == {
        "items": 11, "train": 5, "valid": 2, "test": 0}
    assert handle.num_items == 11
    items = handle.sources["items"]
    rows = [items[i] for i in range(len(items))]
    assert [r["item_id"] for r in rows] == KEPT_IDS  # file order, item_index = row
    assert [r["item_index"] for r in rows] == list(range(11))
    assert set(rows[0]) == {"item_index", "item_id", "title", "image"}
    titles = {r["item_id"]: r["title"] for r in rows}
    assert titles["i1"] == "Red striped T-shirt"
    assert titles["i24"] == "红色条纹T恤 纯棉 男款"
    assert titles["i14"] == ("long " + "a" * 12_000)[: records.MAX_TEXT_CHARS]
    for r in rows:
        assert r["image"].dtype == np.uint8 and r["image"].shape == (S, S, 3)


def _solid(colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (S, S, 3))


def test_pixels_after_resize_and_rgb_conversion(built):
    _, _, handle = built
    items = handle.sources["items"]
    img = {items[i]["item_id"]: items[i]["image"] for i in range(len(items))}
    np.testing.assert_array_equal(img["i1"], _solid((255, 0, 0)))  # 20x30 resized
    np.testing.assert_array_equal(img["i2"], _solid((0, 255, 0)))
    np.testing.assert_array_equal(img["i3"], _solid((255, 0, 0)))  # CMYK (0,255,255,0) = red
    np.testing.assert_array_equal(img["i4"][:, : S // 2], _solid((0, 0, 255))[:, : S // 2])
    np.testing.assert_array_equal(img["i4"][:, S // 2 :], _solid((255, 255, 255))[:, S // 2 :])
    np.testing.assert_array_equal(img["i5"], _solid((100, 100, 100)))  # L, 40x40 resized
    np.testing.assert_array_equal(img["i6"], _solid((200, 100, 50)))  # palette
    np.testing.assert_array_equal(img["i7"], _solid((50, 50, 50)))  # LA
    np.testing.assert_array_equal(img["i8"], _solid((10, 20, 30)))  # 1x1 upscaled
    np.testing.assert_array_equal(img["i20"], _solid((0, 255, 0)))  # second image of the list


def test_pair_round_trip(built):
    _, _, handle = built
    items = handle.sources["items"]
    train = handle.sources["train"]
    pairs = [train[i] for i in range(len(train))]
    assert [(p["query"][:12], p["item_id"], p["slice"]) for p in pairs] == [
        ("red shirt", "i1", ""), ("green dress", "i2", "visual"),
        ("红色条纹T恤", "i24", "textual"), ("q" * 12, "i3", ""), ("blue bag", "i4", "")]
    assert len(pairs[3]["query"]) == records.MAX_TEXT_CHARS
    assert set(pairs[0]) == {"query", "item_id", "item_index", "slice"}
    for p in pairs:
        assert items[p["item_index"]]["item_id"] == p["item_id"]
    valid = handle.sources["valid"]
    assert [valid[i]["item_id"] for i in range(len(valid))] == ["i5", "i6"]


def test_tokenizer_trained_on_titles_and_train_queries_only(built):
    _, _, handle = built
    tok = tokenizer_lib.load_tokenizer(handle.tokenizer_dir)
    ids = tok("红色条纹T恤")["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 2 + 6  # [CLS] 6 chars [SEP]
    assert "xylophone" not in tok.get_vocab()  # only in a valid query: no eval leakage
    items = handle.sources["items"]
    titles = [items[i]["title"] for i in range(len(items))]
    unk = [tok(t, add_special_tokens=False)["input_ids"].count(tok.unk_token_id) for t in titles]
    assert unk == [0] * 8 + [1, 0, 0]  # only i14's 10k-char word (> 100 chars) is [UNK]
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in titles)
    assert handle.report["tokenizer"]["unk_fraction_titles"] == round(1 / n_tokens, 6)
    assert handle.report["tokenizer"]["vocab_size"] == len(tok) <= 300


def test_cache_hit_then_rebuild_on_change(built, tmp_path):
    catalog, _, first = built
    cat = shutil.copytree(catalog, str(tmp_path / "cat"))
    data_dir = str(tmp_path / "tfds")
    a = tfds_builder.build_dataset(cat, data_dir, image_size=S, vocab_size=300)
    assert not a.cache_hit and a.num_items == 11
    info = os.path.join(a.dataset_dir, "dataset_info.json")
    mtime = os.stat(info).st_mtime_ns
    b = tfds_builder.build_dataset(cat, data_dir, image_size=S, vocab_size=300)
    assert b.cache_hit and b.dataset_dir == a.dataset_dir
    assert os.stat(info).st_mtime_ns == mtime  # nothing rewritten
    assert b.report == a.report
    with open(os.path.join(cat, "items.jsonl"), "ab") as f:
        f.write(_item("new", "new green item", "images/green.png"))
    c = tfds_builder.build_dataset(cat, data_dir, image_size=S, vocab_size=300)
    assert not c.cache_hit and c.dataset_dir != a.dataset_dir
    assert c.num_items == 12 and c.sources["items"][11]["item_id"] == "new"
    # A changed image (new size/mtime) must rebuild too.
    _save(Image.new("RGB", (S, S), (1, 2, 3)), os.path.join(cat, "images", "green.png"))
    os.utime(os.path.join(cat, "images", "green.png"), ns=(1, 1))
    d = tfds_builder.build_dataset(cat, data_dir, image_size=S, vocab_size=300)
    assert not d.cache_hit and d.dataset_dir != c.dataset_dir
    np.testing.assert_array_equal(d.sources["items"][1]["image"], _solid((1, 2, 3)))
    e = dataset_reader.load_dataset(d.dataset_dir)
    assert len(e.sources["train"]) == 5 and e.report == d.report


def test_cache_key_follows_the_vocab_training_recipe(built, monkeypatch):
    # A build holds its trained vocab: a new recipe (or tokenizers release) must not reuse it.
    catalog, _, first = built
    trained = fingerprint.catalog_fingerprint(catalog, S, "", 300)
    given = fingerprint.catalog_fingerprint(catalog, S, first.tokenizer_dir, 300)
    monkeypatch.setattr(tokenizer_lib, "WORDPIECE_TRAINER", "another-recipe")
    assert fingerprint.catalog_fingerprint(catalog, S, "", 300) != trained
    assert fingerprint.catalog_fingerprint(catalog, S, first.tokenizer_dir, 300) == given
    assert first.dataset_dir.endswith(f"s{S}_{trained}/1.0.0")


def test_given_tokenizer_is_copied(built, tmp_path):
    catalog, _, first = built
    handle = tfds_builder.build_dataset(
        catalog, str(tmp_path / "tfds"), image_size=S, tokenizer=first.tokenizer_dir)
    a = tokenizer_lib.load_tokenizer(first.tokenizer_dir)
    b = tokenizer_lib.load_tokenizer(handle.tokenizer_dir)
    text = "red striped 红色条纹T恤 dress"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert handle.report["tokenizer"]["source"] == os.path.abspath(first.tokenizer_dir)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="has no items.jsonl"):
        tfds_builder.build_dataset(str(tmp_path), str(tmp_path / "tfds"))
    with open(tmp_path / "items.jsonl", "wb") as f:
        f.writelines([_item("a", ""), b"junk\n"])
    with pytest.raises(ValueError, match="no usable item.*empty_title"):
        tfds_builder.build_dataset(str(tmp_path), str(tmp_path / "tfds"), image_size=S)
    os.makedirs(tmp_path / "emptytok")
    with pytest.raises(ValueError, match="has no tokenizer files"):
        tfds_builder.build_dataset(str(tmp_path), str(tmp_path / "tfds"),
                                   tokenizer=str(tmp_path / "emptytok"))
    with pytest.raises(ValueError, match="not a vlp_jax dataset build"):
        dataset_reader.load_dataset(str(tmp_path))


def test_load_image_sixteen_bit_grey(tmp_path):
    path = str(tmp_path / "g16.png")
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(path)
    arr, notes = records.load_image(path, 2)
    np.testing.assert_array_equal(arr, np.full((2, 2, 3), 255, np.uint8))
    assert notes[0] == "tiny_image" and notes[1].startswith("converted_i")
