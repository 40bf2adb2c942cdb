"""The catalog generator's options (``text_noise="realistic"``, ``object_scale``) and the proof
that the default catalog is byte-identical to the generator before the options existed.

Expectations are measured from the written files against the true attributes, not from the
noise module's own bookkeeping.
"""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from vlp_jax.data import catalog
from vlp_jax.data.catalog import noise, relevance, render, vocab

# sha256 over (relative path, bytes) of every file of generate_catalog(out, 1500, 3,
# image_size=32, num_eval_queries=60), recorded with the generator of commit f15229b (before
# text_noise / object_scale existed). Same numpy / Pillow / zlib as the venv.
DEFAULT_FINGERPRINTS = {
    "en": "5ff224951ff08cb838e636aa7cdb2b196cbe0cba5c3095c4fe2e3e6b3ef8e882",
    "zh": "20a2cdbfc1d886e373daa2e7435db47504c825c4f950052a262ff63824175d82",
}
N = 2000


def _fingerprint(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_default_catalog_bytes_unchanged(tmp_path, lang):
    out = tmp_path / lang
    catalog.generate_catalog(str(out), 1500, 3, lang=lang, image_size=32, num_eval_queries=60)
    assert _fingerprint(out) == DEFAULT_FINGERPRINTS[lang]
    with open(out / "catalog_info.json") as f:
        info = json.load(f)
    assert "text_noise" not in info and "object_scale" not in info


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "c"
    catalog.generate_catalog(str(out), N, 5, image_size=32, num_eval_queries=90,
                             text_noise="realistic")
    return str(out)


def _colour_words(title):
    words = set(re.findall(r"[a-z]+", title.lower()))
    return {c[0] for c in vocab.COLORS if c[1] in words}


def test_noisy_titles_stuffed_wrong_and_synonyms(noisy):
    items = _jsonl(os.path.join(noisy, "items.jsonl"))
    named = [_colour_words(it["title"]) for it in items]
    truth = [it["attributes"]["color"] for it in items]
    wrong = np.mean([bool(n - {t}) for n, t in zip(named, truth, strict=True)])
    stuffed = np.mean([len(n) >= 3 for n in named])
    # ~35 % of titles end with 3-5 colour words; wrong single colour words add a few percent.
    assert 0.28 < stuffed < 0.42 and wrong > stuffed
    synonyms = {w for table in (noise.COLOR_SYNONYMS, noise.MATERIAL_SYNONYMS)
                for ws in table.values() for w in ws}
    lower = [it["title"].lower() for it in items]
    with_syn = np.mean([any(re.search(rf"(?<!\S){re.escape(s)}(?!\S)", t) for s in synonyms)
                        for t in lower])
    assert 0.3 < with_syn < 0.8  # every title names its material; half of those as a synonym


def test_noisy_duplicates_and_exact_relevance(noisy):
    items = _jsonl(os.path.join(noisy, "items.jsonl"))
    fields = ("category", "color", "pattern", "brand", "material")
    rows = [tuple(it["attributes"][f] for f in fields) for it in items]
    seen, dups = set(), 0
    for b in range(0, N, catalog.BLOCK_SIZE):
        seen.clear()
        for r in rows[b:b + catalog.BLOCK_SIZE]:
            dups += r in seen
            seen.add(r)
    assert 0.10 * N < dups < 0.20 * N  # 15 % re-listed (plus rare natural coincidences)
    codes = catalog.item_attributes(5, N, "realistic")
    assert [vocab.COLORS[c][0] for c in codes[:, 1]] == [r[1] for r in rows]
    # Eval relevant sets follow the true attributes, duplicates included.
    tables = relevance.relevance_tables(noisy, [it["item_id"] for it in items])
    by_id = {it["item_id"]: i for i, it in enumerate(items)}
    for split in ("valid", "test"):
        pairs = _jsonl(os.path.join(noisy, f"{split}.jsonl"))
        from vlp_jax.data.input import preprocess

        for q in {p["query"] for p in pairs}:
            pos = np.searchsorted(tables.query_hashes, preprocess.query_hash(q))
            rel = np.flatnonzero(np.asarray(relevance.is_relevant(
                tables.constraints[pos:pos + 1], tables.item_attrs))[0])
            assert set(rel.tolist()) == {by_id[p["item_id"]] for p in pairs if p["query"] == q}


def test_click_noise_rate(noisy, tmp_path):
    def irrelevant_share(root, items):
        tables = relevance.relevance_tables(root, [it["item_id"] for it in items])
        by_id = {it["item_id"]: i for i, it in enumerate(items)}
        from vlp_jax.data.input import preprocess

        pairs = _jsonl(os.path.join(root, "train.jsonl"))
        pos = np.searchsorted(tables.query_hashes,
                              [preprocess.query_hash(p["query"]) for p in pairs])
        attrs = tables.item_attrs[[by_id[p["item_id"]] for p in pairs]]
        ok = np.all((tables.constraints[pos] == -1) | (tables.constraints[pos] == attrs), axis=1)
        return 1.0 - ok.mean()

    assert 0.07 < irrelevant_share(noisy, _jsonl(os.path.join(noisy, "items.jsonl"))) < 0.11
    clean = tmp_path / "clean"
    catalog.generate_catalog(str(clean), 1000, 5, image_size=16, num_eval_queries=30)
    assert irrelevant_share(str(clean), _jsonl(os.path.join(clean, "items.jsonl"))) == 0.0


def test_noise_options_checked(tmp_path):
    with pytest.raises(ValueError, match="English-only"):
        catalog.generate_catalog(str(tmp_path / "a"), 10, 0, lang="zh", text_noise="realistic")
    with pytest.raises(ValueError, match="text_noise must be one of"):
        catalog.generate_catalog(str(tmp_path / "b"), 10, 0, text_noise="loud")
    with pytest.raises(ValueError, match="object_scale"):
        catalog.generate_catalog(str(tmp_path / "c"), 10, 0, object_scale=(0.9, 0.5))


def test_object_scale_fills_patches():
    """Object-centred close-ups: most 16 px patches of a 64 px image carry the object, and a
    large object never bleeds into the next image of the batch."""
    attrs = catalog.item_attributes(0, 300)

    def patches(scale):
        rng = np.random.default_rng(0)
        _, m = render.render_batch(rng, attrs[:, 0], attrs[:, 1], attrs[:, 2], 64,
                                   object_scale=scale)
        return m, m.reshape(-1, 4, 16, 4, 16).mean(axis=(2, 4)).reshape(len(attrs), 16)

    _, base = patches(render.OBJECT_SCALE)
    masks, close = patches((1.1, 1.4))
    assert (base <= 0.05).sum(1).mean() > 7 and (close <= 0.05).sum(1).mean() < 4
    assert (close >= 0.5).sum(1).mean() > 7.5
    assert masks.shape == (300, 64, 64)
    # Overhang: item 0 alone vs item 0 above a 3 x size item; tile 0 must be identical.
    cat, one = np.array([0, 2]), np.ones(2)  # category 2 overhangs upwards at 3 x size
    big = np.array([0.8 * 64, 3.0 * 64])
    centre = np.full(2, 32.0)
    alone = render._draw_masks(cat[:1], big[:1], np.zeros(1), one[:1], centre[:1], centre[:1],
                               64, render.tile_gap(big[:1], 64))
    pair = render._draw_masks(cat, big, np.zeros(2), one, centre, centre, 64,
                              render.tile_gap(big, 64))
    assert pair[1].mean() > 0.5 and alone[0].sum() > 0
    np.testing.assert_array_equal(pair[0], alone[0])
