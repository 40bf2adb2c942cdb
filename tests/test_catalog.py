"""Tests of the built-in catalog generator (vlp_jax.data.catalog and its sibling modules).

Small catalogs (a few hundred items) keep the file fast; expectations are computed independently
of the generator's own key machinery (query strings are parsed back with the word lists, relevant
sets are recomputed by brute force from items.jsonl, colours are measured from the PNG pixels).
"""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlp_jax.data import catalog
from vlp_jax.data.catalog import render as catalog_render
from vlp_jax.data.catalog import text as catalog_text
from vlp_jax.data.catalog import vocab as catalog_vocab

N_ITEMS = 600
PROB = 0.3
FILES = ("items.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl", "catalog_info.json")


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def en_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("catalog") / "en")
    stats = catalog.generate_catalog(out, N_ITEMS, seed=7, num_eval_queries=60)
    return out, stats


@pytest.fixture(scope="module")
def zh_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("catalog") / "zh")
    catalog.generate_catalog(out, N_ITEMS, seed=7, lang="zh", num_eval_queries=60)
    return out


def _query_table(lang):
    """Independent parser: every possible query string -> its attribute constraints, built from
    the word lists in the documented word order (brand, color, pattern, material, category)."""
    words = catalog_vocab.word_lists(lang)
    keys = {"category": [c.key for c in catalog_vocab.CATEGORIES],
            "color": [c[0] for c in catalog_vocab.COLORS],
            "pattern": [p[0] for p in catalog_vocab.PATTERNS],
            "brand": [b[0] for b in catalog_vocab.BRANDS],
            "material": [m[0] for m in catalog_vocab.MATERIALS]}
    table = {}
    for slice_name, fields in catalog_text.TEMPLATES:
        ordered = [f for f in ("brand", "color", "pattern", "material") if f in fields]
        for values in itertools.product(*(range(len(words[f])) for f in ordered),
                                        range(len(words["category"]))):
            query = " ".join([words[f][v] for f, v in zip(ordered, values[:-1], strict=True)]
                             + [words["category"][values[-1]]])
            assert query not in table, f"query string {query!r} is ambiguous"
            constraint = {f: keys[f][v] for f, v in zip(ordered, values[:-1], strict=True)}
            constraint["category"] = keys["category"][values[-1]]
            table[query] = (slice_name, constraint)
    return table


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    a = _tree_bytes(catalog.generate_catalog(str(tmp_path / "a"), 150, 3)["out_dir"])
    b = _tree_bytes(catalog.generate_catalog(str(tmp_path / "b"), 150, 3)["out_dir"])
    c = _tree_bytes(catalog.generate_catalog(str(tmp_path / "c"), 150, 4)["out_dir"])
    assert set(a) >= set(FILES) and len(a) == len(FILES) + 150
    assert a == b
    for name in FILES[:4]:
        assert a[name] != c[name], name
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) == len(pngs)


def test_layout_and_counts(en_dir):
    out, stats = en_dir
    items = _read_jsonl(os.path.join(out, "items.jsonl"))
    assert [it["item_id"] for it in items] == [catalog.item_id(i) for i in range(N_ITEMS)]
    for it in items:
        assert it["image"] == f"images/0000/{it['item_id']}.png"
        assert os.path.isfile(os.path.join(out, it["image"]))
        assert it["title"].strip()
    with Image.open(os.path.join(out, items[0]["image"])) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    for split in ("train", "valid", "test"):
        pairs = _read_jsonl(os.path.join(out, f"{split}.jsonl"))
        assert len(pairs) == stats["num_pairs"][split]
        assert len({p["query"] for p in pairs}) == stats["num_queries"][split]
        assert all(p["slice"] in ("visual", "textual", "mixed") for p in pairs)
    # ~4 clicks per item (a few dropped when the combination is held out).
    assert 3.3 * N_ITEMS < stats["num_pairs"]["train"] < 4.5 * N_ITEMS
    assert stats["num_queries"]["valid"] == stats["num_queries"]["test"] == 60
    assert stats["eval_queries_per_slice"]["test"] == {"visual": 20, "textual": 20, "mixed": 20}
    assert 0 < stats["items_per_sec"] and stats["seconds"] > 0
    info = json.load(open(os.path.join(out, "catalog_info.json")))
    assert info["num_pairs"] == stats["num_pairs"] and info["seed"] == 7
    assert not [d for d in os.listdir(os.path.dirname(out)) if ".partial-" in d]


def test_vocabulary_size_and_coverage(en_dir):
    items = _read_jsonl(os.path.join(en_dir[0], "items.jsonl"))
    assert len(catalog_vocab.CATEGORIES) >= 10
    assert len(catalog_vocab.COLORS) >= 8 and len(catalog_vocab.PATTERNS) >= 5
    for field, vocab_list in (("category", catalog_vocab.CATEGORIES),
                              ("color", catalog_vocab.COLORS), ("pattern", catalog_vocab.PATTERNS)):
        assert len({it["attributes"][field] for it in items}) == len(vocab_list), field


def _title_words(title):
    return set(title.lower().replace(",", " ").split())


def test_visual_words_rarely_in_titles_brand_material_always(en_dir):
    items = _read_jsonl(os.path.join(en_dir[0], "items.jsonl"))
    colours = {c[1] for c in catalog_vocab.COLORS}
    pattern_words = {p[0]: p[1] for p in catalog_vocab.PATTERNS}
    material_words = {m[0]: m[1] for m in catalog_vocab.MATERIALS}
    with_colour = with_pattern = 0
    for it in items:
        a, title, words = it["attributes"], it["title"].lower(), _title_words(it["title"])
        named = words & colours
        assert named <= {a["color"]}, (title, a)  # never a wrong colour
        with_colour += bool(named)
        with_pattern += f" {pattern_words[a['pattern']]} " in f" {title} "
        assert a["brand"].lower() in words, title
        assert material_words[a["material"]] in title, title
    sd = math.sqrt(PROB * (1 - PROB) / N_ITEMS)
    assert abs(with_colour / N_ITEMS - PROB) < 4 * sd
    assert abs(with_pattern / N_ITEMS - PROB) < 4 * sd


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_title_colour_probability_extremes(lang):
    colours = [c[1 if lang == "en" else 2] for c in catalog_vocab.COLORS]
    rng = np.random.default_rng(0)
    for show in (False, True):
        for _ in range(50):
            codes = {"category": int(rng.integers(12)), "color": int(rng.integers(10)),
                     "pattern": int(rng.integers(6)), "brand": int(rng.integers(20)),
                     "material": 0}
            title = catalog_text.make_title(codes, rng.random(catalog_text.NUM_TITLE_UNIFORMS)
                                            .tolist(), lang, show, show)
            found = [c for c in colours if c in title.lower()]
            assert found == ([colours[codes["color"]]] if show else []), title


def _object_hues(png_path):
    """Hue (degrees) of the clearly saturated pixels of an image, measured from the PNG."""
    with Image.open(png_path) as im:
        hsv = np.asarray(im.convert("HSV")).reshape(-1, 3).astype(np.float64)
    sat = (hsv[:, 1] > 0.45 * 255) & (hsv[:, 2] > 60)  # dark pixels: hue is mostly noise
    return hsv[sat, 0] * 360.0 / 256.0, sat.mean()


def _circular_mean(deg):
    rad = np.radians(deg)
    return math.degrees(math.atan2(np.sin(rad).mean(), np.cos(rad).mean())) % 360


def _hue_distance(a, b):
    return min(abs(a - b) % 360, 360 - abs(a - b) % 360)


def test_colour_recoverable_from_pixels(en_dir):
    out = en_dir[0]
    items = _read_jsonl(os.path.join(out, "items.jsonl"))
    expected = {"red": 0.0, "green": 132.0, "blue": 222.0}
    seen = dict.fromkeys(expected, 0)
    for it in items:
        colour = it["attributes"]["color"]
        hues, frac = _object_hues(os.path.join(out, it["image"]))
        if colour in expected:
            seen[colour] += 1
            assert frac > 0.02, it  # the object is a saturated region
            assert _hue_distance(_circular_mean(hues), expected[colour]) < 20, it
        elif colour in ("white", "black"):
            assert frac < 0.02, it  # achromatic objects on a grey background: no saturated area
    assert min(seen.values()) >= 30


def _canonical_masks(jitter, per_category, seed):
    rng = np.random.default_rng(seed)
    n_cat = len(catalog_vocab.CATEGORIES)
    cats = np.repeat(np.arange(n_cat), per_category)
    _, masks = catalog_render.render_batch(rng, cats, cats % 10, cats % 6, 64, jitter=jitter)
    return masks.reshape(n_cat, per_category, 64, 64)


def _normalised_shape(mask, size=24):
    """The mask cropped to its bounding box and resized: position and scale removed."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)) / 255.0


def test_categories_have_distinct_silhouettes():
    upright = _canonical_masks(False, 1, 0)[:, 0].astype(np.float64)  # [C, 64, 64]
    n = len(upright)
    assert n >= 10
    for i in range(n):
        for j in range(i + 1, n):
            inter = (upright[i] * upright[j]).sum()
            union = np.maximum(upright[i], upright[j]).sum()
            assert inter / union < 0.8, (catalog_vocab.CATEGORIES[i].key,
                                         catalog_vocab.CATEGORIES[j].key, inter / union)
    # Under pose jitter (position, scale, rotation, mirroring) the shape still identifies the
    # category: nearest mean normalised silhouette, fit on one sample, scored on another.
    def shapes(seed, per_category):
        masks = _canonical_masks(True, per_category, seed)
        return np.array([[_normalised_shape(m) for m in cat] for cat in masks])

    means = shapes(1, 30).mean(axis=1)  # [C, 24, 24]
    test = shapes(2, 20)  # [C, 20, 24, 24]
    dist = ((test[:, :, None] - means[None, None]) ** 2).sum(axis=(-1, -2))  # [C, 20, C]
    accuracy = (dist.argmin(-1) == np.arange(n)[:, None]).mean()
    assert accuracy > 0.9, accuracy


def test_eval_relevant_sets_complete_and_splits_disjoint(en_dir):
    out = en_dir[0]
    items = _read_jsonl(os.path.join(out, "items.jsonl"))
    table = _query_table("en")
    by_split = {s: _read_jsonl(os.path.join(out, f"{s}.jsonl")) for s in ("train", "valid", "test")}
    queries = {s: {p["query"] for p in pairs} for s, pairs in by_split.items()}
    assert not queries["train"] & queries["valid"]
    assert not queries["train"] & queries["test"]
    assert not queries["valid"] & queries["test"]

    def matches(item, constraint):
        return all(item["attributes"][f] == v for f, v in constraint.items())

    for split, pairs in by_split.items():
        listed = {}
        for p in pairs:
            slice_name, constraint = table[p["query"]]
            assert p["slice"] == slice_name
            listed.setdefault(p["query"], []).append(p["item_id"])
        for query, ids in listed.items():
            constraint = table[query][1]
            assert "category" in constraint
            truth = [it["item_id"] for it in items if matches(it, constraint)]
            if split == "train":  # clicks are relevant items
                assert set(ids) <= set(truth), query
            else:  # every matching item, each once, in item order
                assert ids == truth, query
                assert 0 < len(ids) < 0.1 * len(items)


def test_zh_mode_same_items_cjk_text(en_dir, zh_dir):
    en_items = _read_jsonl(os.path.join(en_dir[0], "items.jsonl"))
    zh_items = _read_jsonl(os.path.join(zh_dir, "items.jsonl"))
    assert [it["attributes"] for it in zh_items] == [it["attributes"] for it in en_items]
    with open(os.path.join(zh_dir, zh_items[5]["image"]), "rb") as f1, \
            open(os.path.join(en_dir[0], en_items[5]["image"]), "rb") as f2:
        assert f1.read() == f2.read()  # same pixels: only the language changes

    def cjk(s):
        return any("\u4e00" <= ch <= "\u9fff" for ch in s)

    assert all(cjk(it["title"]) and " " not in it["title"] for it in zh_items)
    zh_colours = [c[2] for c in catalog_vocab.COLORS]
    with_colour = sum(any(c in it["title"] for c in zh_colours) for it in zh_items)
    assert abs(with_colour / N_ITEMS - PROB) < 4 * math.sqrt(PROB * (1 - PROB) / N_ITEMS)
    table = _query_table("zh")
    for split in ("train", "valid", "test"):
        pairs = _read_jsonl(os.path.join(zh_dir, f"{split}.jsonl"))
        assert pairs and all(cjk(p["query"]) and p["query"] in table for p in pairs)
    raw = open(os.path.join(zh_dir, "items.jsonl"), encoding="utf-8").read()
    assert "\\u" not in raw  # UTF-8 text, not ASCII escapes


def test_attributes_depend_only_on_seed_and_index():
    small = catalog.item_attributes(5, 300)
    large = catalog.item_attributes(5, 2500)
    np.testing.assert_array_equal(small, large[:300])
    assert not np.array_equal(small, catalog.item_attributes(6, 300))
    for c, m in zip(large[:, 0], large[:, 4], strict=True):  # materials fit the category
        assert catalog_vocab.MATERIALS[m][0] in catalog_vocab.CATEGORIES[c].materials


def test_workers_give_identical_output(tmp_path):
    one = catalog.generate_catalog(str(tmp_path / "one"), 1100, 2, num_eval_queries=9)
    two = catalog.generate_catalog(str(tmp_path / "two"), 1100, 2, num_eval_queries=9,
                                   num_workers=2)
    a, b = _tree_bytes(one["out_dir"]), _tree_bytes(two["out_dir"])
    assert a == b
    assert "images/0001/P0001099.png" in a  # second block -> second image folder


def test_cli_matches_library(tmp_path):
    cli_out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "vlp_jax.data.catalog", f"--out={cli_out}", "--num_items=80",
           "--seed=11", "--lang=zh", "--num_eval_queries=12", "--color_in_title_prob=0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "items/s" in proc.stdout
    lib = catalog.generate_catalog(str(tmp_path / "lib"), 80, 11, lang="zh", num_eval_queries=12,
                                   color_in_title_prob=0.5)
    assert _tree_bytes(str(cli_out)) == _tree_bytes(lib["out_dir"])
    bad = subprocess.run([*cmd[:3], f"--out={tmp_path / 'x'}", "--lang=fr"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "lang" in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_items=0), "num_items"),
    (dict(seed=-1), "seed"),
    (dict(lang="fr"), "lang"),
    (dict(color_in_title_prob=1.5), "color_in_title_prob"),
    (dict(image_size=8), "image_size"),
    (dict(num_eval_queries=-1), "num_eval_queries"),
    (dict(png_compress_level=10), "png_compress_level"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    args = dict(out_dir=str(tmp_path / "c"), num_items=10, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        catalog.generate_catalog(**args)
    assert not (tmp_path / "c").exists()


def test_existing_directory_and_overwrite(tmp_path):
    out = tmp_path / "c"
    out.mkdir()  # an empty directory is fine
    catalog.generate_catalog(str(out), 20, 0, num_eval_queries=3)
    before = (out / "items.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        catalog.generate_catalog(str(out), 20, 1)
    assert (out / "items.jsonl").read_bytes() == before
    catalog.generate_catalog(str(out), 20, 1, overwrite=True)
    assert (out / "items.jsonl").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporary directories left behind


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_encode(images, level=0):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through the images
        return real_encode(images, level)

    real_encode = catalog_render.encode_pngs
    monkeypatch.setattr(catalog_render, "encode_pngs", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        catalog.generate_catalog(str(tmp_path / "c"), 600, 0)
    assert os.listdir(tmp_path) == []
