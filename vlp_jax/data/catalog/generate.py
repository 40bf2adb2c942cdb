"""Built-in product catalog: synthetic products whose images show what their titles omit.

    python -m vlp_jax.data.catalog --out=DIR --num_items=N --seed=S [--lang=en|zh]

Writes the user data format (design.md "Data format") so the whole stack can be trained, evaluated
and demonstrated without a real marketplace:

- `items.jsonl`: `{"item_id", "title", "image": "images/BBBB/<item_id>.png", "attributes": {...}}`
  (the extra `attributes` = category/color/pattern/brand/material is ground truth for tests).
- `images/BBBB/`: 64x64 RGB PNGs (`image_size`), 1,000 per folder (`BLOCK_SIZE`).
- `train.jsonl`, `valid.jsonl`, `test.jsonl`: `{"query", "item_id", "slice"}` lines.
- `catalog_info.json`: generator parameters and counts (deterministic, no timings).

Items. Item i's attributes are a pure function of (seed, i): they are drawn for whole blocks of
`BLOCK_SIZE` items from a generator seeded by (seed, stream, block), so any block can be made
alone, and all attributes of a million items take ~10 MB and a second to recompute. Each category
has its own silhouette, colour and pattern live in the pixels (`catalog.render`), while titles
mention colour and pattern only with probability `color_in_title_prob` (`catalog.text`).

Queries and honest evaluation. A query is a *combination*: a template (which attribute fields:
e.g. colour + pattern) with values, always plus the category, e.g. "red striped dress"; slices:
`visual` (colour/pattern), `textual` (brand/material), `mixed` (one of each). Each combination has
exactly one query string. Valid and test queries are whole combinations held out from training,
chosen at random among the combinations that match at least one item (at most a quarter of each
slice's combinations, so training still covers most of them). Hence valid, test and train query
strings are pairwise disjoint: a test query, and its attribute combination, is never seen in
training, and answering it needs compositional generalisation ("red dress" and "striped shirt" were
trained, "red striped dress" was not). The relevant set of an eval query is *every* item matching
all its attributes; each is written, one line per item. `train.jsonl` holds sampled clicks: every
item gets Poisson(pairs_per_item x popularity) clicks (log-normal popularity, mean 1), each with a
random template (slices equally likely) filled in with the item's attributes; a click whose
combination is held out is re-drawn once with another template, else dropped.

Properties: deterministic (same arguments and numpy/Pillow/zlib versions -> identical bytes, for
any `num_workers`; no timestamps, fixed key order) and streaming (items are
rendered and written block by block; the eval pass needs attributes only: ~2 s and ~150 MB for a
million items).
The catalog is written into a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a directory that looks complete.

Options that make another catalog (the defaults give the bytes above, unchanged): `text_noise=
"realistic"` (keyword stuffing, synonyms, wrong attribute words, near-duplicate listings, click
noise; `catalog.noise`) and `object_scale` (object size as a fraction of the image side, e.g.
(1.0, 1.3) for object-centred close-ups whose every patch carries the product).
"""

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vlp_jax.data.catalog import noise, queries, render, text, vocab

BLOCK_SIZE = 1000  # items per generator block and per image folder
_RADIX = queries.RADIX
_STREAM_ATTR, _STREAM_ITEM, _STREAM_CLICK, _STREAM_EVAL, _STREAM_NOISE = range(5)  # independent
_BRAND_P = 1.0 / np.arange(1, len(vocab.BRANDS) + 1) ** 0.7  # Zipf-like brand popularity
_BRAND_P /= _BRAND_P.sum()
_MATERIAL_INDEX = {m[0]: i for i, m in enumerate(vocab.MATERIALS)}
_MAT_COUNT = np.array([len(c.materials) for c in vocab.CATEGORIES])
_MAT_TABLE = np.array([[_MATERIAL_INDEX[c.materials[min(j, len(c.materials) - 1)]]
                        for j in range(_MAT_COUNT.max())] for c in vocab.CATEGORIES])


def _block_attributes(seed: int, block: int) -> np.ndarray:
    """int64 [BLOCK_SIZE, 5] attribute codes (columns = catalog_queries.FIELDS) of one block."""
    rng = np.random.default_rng([seed, _STREAM_ATTR, block])
    n = BLOCK_SIZE
    cat = rng.integers(0, _RADIX[0], n)
    color = rng.integers(0, _RADIX[1], n)
    pattern = rng.integers(0, _RADIX[2], n)
    brand = rng.choice(_RADIX[3], n, p=_BRAND_P)
    material = _MAT_TABLE[cat, (rng.random(n) * _MAT_COUNT[cat]).astype(np.int64)]
    return np.stack([cat, color, pattern, brand, material], axis=1)


def block_attributes(seed: int, block: int, text_noise: str = "none") -> np.ndarray:
    """`_block_attributes`, with the re-listed products of a `text_noise="realistic"` catalog."""
    attrs = _block_attributes(seed, block)
    if text_noise == "none":
        return attrs
    rng = np.random.default_rng([seed, _STREAM_NOISE, block, 0])
    return noise.duplicate_rows(attrs, rng, noise.REALISTIC.duplicate)


def item_attributes(seed: int, num_items: int, text_noise: str = "none") -> np.ndarray:
    """Attribute codes of items 0..num_items-1: int16 [num_items, 5], columns = queries.FIELDS.

    Item i's row depends only on (seed, i), so a smaller catalog is a prefix of a larger one.
    """
    blocks = [block_attributes(seed, b, text_noise).astype(np.int16)
              for b in range(math.ceil(num_items / BLOCK_SIZE))]
    return np.concatenate(blocks)[:num_items] if blocks else np.zeros((0, 5), np.int16)


@dataclass(frozen=True)
class _Job:
    """Everything a (possibly separate) worker process needs to make any block."""

    root: str
    seed: int
    num_items: int
    lang: str
    image_size: int
    color_in_title_prob: float
    pairs_per_item: float
    png_compress_level: int
    heldout: np.ndarray  # sorted int64 keys of valid + test combinations
    text_noise: str = "none"
    object_scale: tuple[float, float] = render.OBJECT_SCALE


def item_id(index: int) -> str:
    return f"P{index:07d}"


def _attribute_names(row: list[int]) -> dict[str, str]:
    c, col, p, b, m = row
    return {"category": vocab.CATEGORIES[c].key, "color": vocab.COLORS[col][0],
            "pattern": vocab.PATTERNS[p][0], "brand": vocab.BRANDS[b][0],
            "material": vocab.MATERIALS[m][0]}


def _make_block(job: _Job, block: int) -> tuple[str, str, np.ndarray]:
    """Renders and writes one block's images; returns (items.jsonl text, train.jsonl text,
    combination keys of the block's train clicks)."""
    start = block * BLOCK_SIZE
    n = min(BLOCK_SIZE, job.num_items - start)
    attrs = block_attributes(job.seed, block, job.text_noise)[:n]
    rng = np.random.default_rng([job.seed, _STREAM_ITEM, block])
    shown = (rng.random((n, 2)) < job.color_in_title_prob).tolist()
    uniforms = rng.random((n, text.NUM_TITLE_UNIFORMS)).tolist()
    folder = f"images/{block:04d}"
    os.makedirs(os.path.join(job.root, folder), exist_ok=True)
    chunk = max(1, 2**20 // job.image_size**2)  # items rendered together (4 MB per float plane)
    for c0 in range(0, n, chunk):
        a = attrs[c0:c0 + chunk]
        images, _ = render.render_batch(rng, a[:, 0], a[:, 1], a[:, 2], job.image_size,
                                        object_scale=job.object_scale)
        for i, png in enumerate(render.encode_pngs(images, job.png_compress_level), start + c0):
            with open(os.path.join(job.root, folder, item_id(i) + ".png"), "wb") as f:
                f.write(png)

    lines = []
    noisy = job.text_noise != "none"
    nrng = np.random.default_rng([job.seed, _STREAM_NOISE, block, 1])
    nu = nrng.random((n, noise.NUM_UNIFORMS)).tolist() if noisy else []
    for i, row in enumerate(attrs.tolist()):
        codes = dict(zip(queries.FIELDS, row, strict=True))
        written = noise.title_codes(codes, nu[i], noise.REALISTIC) if noisy else codes
        title = text.make_title(written, uniforms[i], job.lang, shown[i][0], shown[i][1])
        if noisy:
            title = noise.noisy_title(title, written, nu[i], noise.REALISTIC)
        iid = item_id(start + i)
        lines.append(json.dumps({"item_id": iid, "title": title,
                                 "image": f"{folder}/{iid}.png",
                                 "attributes": _attribute_names(row)}, ensure_ascii=False) + "\n")

    crng = np.random.default_rng([job.seed, _STREAM_CLICK, block])
    popularity = crng.lognormal(-0.32, 0.8, n)  # mean exp(-0.32 + 0.8**2 / 2) = 1
    item = np.repeat(np.arange(n), crng.poisson(job.pairs_per_item * popularity))
    num_templates = len(text.TEMPLATES)
    all_keys = np.stack([queries.combo_keys(attrs, t) for t in range(num_templates)])  # [T, n]
    first = queries.draw_templates(crng, len(item))
    second = crng.integers(0, num_templates, len(item))
    keys = all_keys[first, item]
    held = np.isin(keys, job.heldout)
    keys[held] = all_keys[second[held], item[held]]
    keep = ~np.isin(keys, job.heldout)
    item, keys = item[keep], keys[keep]
    if noisy:  # the query stays the clicked-for one; the click lands elsewhere
        item = noise.noisy_clicks(item, n, nrng, noise.REALISTIC.click)
    order = crng.permutation(len(item))  # a click log is not grouped by item
    heads: dict[int, str] = {}
    tails: dict[int, str] = {}
    train = []
    for i, k in zip(item[order].tolist(), keys[order].tolist(), strict=True):
        if k not in heads:
            heads[k], tails[k] = _pair_parts(queries.query_for_key(k, job.lang),
                                             queries.slice_for_key(k))
        train.append(f"{heads[k]}{item_id(start + i)}{tails[k]}")
    return "".join(lines), "".join(train), keys


def _pair_parts(query: str, slice_name: str) -> tuple[str, str]:
    """A pair line is head + item_id + tail: formatting one JSON object per query instead of one
    per line makes writing millions of pairs cheap; the bytes equal json.dumps of the record."""
    line = json.dumps({"query": query, "item_id": "\0", "slice": slice_name}, ensure_ascii=False)
    head, tail = line.split('"\\u0000"')
    return head + '"', '"' + tail + "\n"


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _worker_block(block: int) -> tuple[str, str, np.ndarray]:
    assert _WORKER_JOB is not None
    return _make_block(_WORKER_JOB, block)


def _blocks(job: _Job, num_blocks: int, num_workers: int) -> Iterator[tuple[str, str, np.ndarray]]:
    """Blocks in order; with workers, made in parallel ("spawn": safe even if the caller has
    already started JAX threads). Output is identical for any number of workers."""
    if num_workers <= 1 or num_blocks <= 1:
        for b in range(num_blocks):
            yield _make_block(job, b)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(num_workers, num_blocks), _init_worker, (job,)) as pool:
        yield from pool.imap(_worker_block, range(num_blocks))


def _check_args(num_items: int, seed: int, lang: str, image_size: int, color_in_title_prob: float,
                num_eval_queries: int, pairs_per_item: float, png_compress_level: int,
                text_noise: str = "none", object_scale: tuple[float, float] = render.OBJECT_SCALE
                ) -> None:
    if not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    text.check_lang(lang)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= color_in_title_prob <= 1.0:
        raise ValueError(f"color_in_title_prob must be in [0, 1], got {color_in_title_prob}")
    if num_eval_queries < 0:
        raise ValueError(f"num_eval_queries must be >= 0, got {num_eval_queries}")
    if not pairs_per_item > 0:
        raise ValueError(f"pairs_per_item must be > 0, got {pairs_per_item}")
    if not 0 <= png_compress_level <= 9:
        raise ValueError(f"png_compress_level must be in 0..9, got {png_compress_level}")
    noise.check(text_noise, lang)
    render.check_object_scale(object_scale)


def generate_catalog(out_dir: str, num_items: int, seed: int, lang: str = "en",
                     image_size: int = 64, color_in_title_prob: float = 0.3,
                     num_eval_queries: int = 300, pairs_per_item: float = 4.0,
                     png_compress_level: int = 0, num_workers: int = 1,
                     overwrite: bool = False, text_noise: str = "none",
                     object_scale: tuple[float, float] = render.OBJECT_SCALE) -> dict:
    """Writes a catalog to `out_dir` (see the module docstring) and returns statistics.

    Args:
      out_dir: target directory; must not exist or be empty unless `overwrite`.
      num_items: number of products.
      seed: non-negative generator seed; same arguments -> byte-identical output.
      lang: "en" or "zh" (titles and queries; attributes and images are the same).
      image_size: image side in pixels.
      color_in_title_prob: probability that a title names the item's colour (and, drawn
        independently, its pattern).
      num_eval_queries: queries per eval split (valid and test each); fewer when the catalog is
        too small to hold out that many non-empty combinations.
      pairs_per_item: mean number of train clicks per item (train pairs ~ this x num_items).
      png_compress_level: zlib level of the PNGs (0 = stored: fastest, ~12 KB per 64x64 image).
      num_workers: processes rendering blocks in parallel (1 = in this process).
      overwrite: replace an existing non-empty `out_dir`.
      text_noise: "none" (honest titles) or "realistic" (`catalog.noise`; English only).
      object_scale: (low, high) object size as a fraction of the image side, drawn per item.

    Returns:
      {"num_items", "num_pairs": {split: n}, "num_queries": {split: distinct queries},
       "eval_queries_per_slice": {split: {slice: n}}, "seconds", "items_per_sec", "out_dir"}.
    """
    object_scale = (float(object_scale[0]), float(object_scale[1]))
    _check_args(num_items, seed, lang, image_size, color_in_title_prob, num_eval_queries,
                pairs_per_item, png_compress_level, text_noise, object_scale)
    out = os.path.abspath(out_dir)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    t0 = time.perf_counter()
    # A hidden sibling (same filesystem, so the final rename is atomic); os.mkdir honours the
    # umask, unlike tempfile.mkdtemp's 0700.
    tmp = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}-{time.time_ns()}")
    os.mkdir(tmp)
    try:
        stats = _write(tmp, num_items, seed, lang, image_size, color_in_title_prob,
                       num_eval_queries, pairs_per_item, png_compress_level, num_workers,
                       text_noise, object_scale)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    return {**stats, "seconds": seconds, "items_per_sec": num_items / max(seconds, 1e-9),
            "out_dir": out}


def _write(root: str, num_items: int, seed: int, lang: str, image_size: int,
           color_in_title_prob: float, num_eval_queries: int, pairs_per_item: float,
           png_compress_level: int, num_workers: int, text_noise: str = "none",
           object_scale: tuple[float, float] = render.OBJECT_SCALE) -> dict:
    attrs = item_attributes(seed, num_items, text_noise)
    eval_rng = np.random.default_rng([seed, _STREAM_EVAL])
    valid_keys, test_keys = queries.select_eval(attrs, eval_rng, num_eval_queries)
    job = _Job(root, seed, num_items, lang, image_size, color_in_title_prob, pairs_per_item,
               png_compress_level, np.unique(np.asarray(valid_keys + test_keys, np.int64)),
               text_noise, object_scale)
    num_pairs = {"train": 0}
    train_keys: set[int] = set()
    with open(os.path.join(root, "items.jsonl"), "w", encoding="utf-8") as items_f, \
            open(os.path.join(root, "train.jsonl"), "w", encoding="utf-8") as train_f:
        for items_text, train_text, keys in _blocks(job, math.ceil(num_items / BLOCK_SIZE),
                                                    num_workers):
            items_f.write(items_text)
            train_f.write(train_text)
            num_pairs["train"] += len(keys)
            train_keys.update(keys.tolist())

    per_slice: dict[str, dict[str, int]] = {}
    for split, keys in (("valid", valid_keys), ("test", test_keys)):
        relevant = queries.relevant_items(attrs, keys)
        per_slice[split] = dict.fromkeys(text.SLICES, 0)
        num_pairs[split] = 0
        with open(os.path.join(root, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for k in keys:
                query, slice_name = queries.query_for_key(k, lang), queries.slice_for_key(k)
                per_slice[split][slice_name] += 1
                head, tail = _pair_parts(query, slice_name)
                f.writelines(f"{head}{item_id(i)}{tail}" for i in relevant[k].tolist())
                num_pairs[split] += len(relevant[k])
    stats = {"num_items": num_items, "num_pairs": num_pairs,
             "num_queries": {"train": len(train_keys), "valid": len(valid_keys),
                             "test": len(test_keys)},
             "eval_queries_per_slice": per_slice}
    info = {"generator": "vlp_jax.data.catalog", "format_version": 1, "seed": seed, "lang": lang,
            "image_size": image_size, "color_in_title_prob": color_in_title_prob,
            "pairs_per_item": pairs_per_item, "num_eval_queries": num_eval_queries,
            "png_compress_level": png_compress_level, **stats}
    if text_noise != "none":  # keys only for the options' catalogs: the default's bytes stay
        info.update(text_noise=text_noise, noise_rates=dataclasses.asdict(noise.REALISTIC))
    if object_scale != render.OBJECT_SCALE:
        info["object_scale"] = list(object_scale)
    with open(os.path.join(root, "catalog_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    return stats


def _move_into_place(tmp: str, out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} appeared while generating; not replacing it")
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(trash, "old"))
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
