"""Tests for vlp_jax.data.input.pipeline: the Grain train iterator and the eval iterators."""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from test_preprocess import WORDS, make_tokenizer

from vlp_jax.data.input import pipeline, preprocess

ROOT = Path(__file__).resolve().parents[1]
NUM_ITEMS, NUM_PAIRS, SIZE, PATCH = 20, 96, 16, 4


def data_cfg(**overrides):
    spec = importlib.util.spec_from_file_location("vlp_base_config", ROOT / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config().data
    cfg.image_size = SIZE
    cfg.query_len, cfg.title_len = 6, 8
    cfg.prefetch = 0
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(0)
    return [{"item_index": np.int64(i), "item_id": f"item{i}",
             "title": " ".join(rng.choice(WORDS[:10], rng.integers(1, 9))),
             "image": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)}
            for i in range(NUM_ITEMS)]


@pytest.fixture(scope="module")
def pairs():
    # Every query is a distinct word pair, so query_id identifies the pair.
    combos = list(itertools.product(WORDS[:10], WORDS[:10]))[:NUM_PAIRS]
    return [{"query": f"{a} {b}".encode(), "item_id": f"item{(7 * i) % NUM_ITEMS}",
             "item_index": np.int64((7 * i) % NUM_ITEMS), "slice": ""}
            for i, (a, b) in enumerate(combos)]


def train_iter(pairs, items, tokenizer, cfg=None, **kwargs):
    kwargs = {"global_batch_size": 16, "patch_size": PATCH, "seed": 0, "shard_index": 0,
              "shard_count": 1, **kwargs}
    return pipeline.make_train_iterator(pairs, items, tokenizer, cfg or data_cfg(), **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def pair_of(batch, pairs):
    lookup = {preprocess.query_hash(preprocess.as_str(p["query"])): i for i, p in enumerate(pairs)}
    return [lookup[int(q)] for q in batch["query_id"]]


def test_train_batch_keys_dtypes_shapes_and_content(pairs, items, tokenizer):
    batch = next(train_iter(pairs, items, tokenizer, global_batch_size=8, shard_count=2))
    b, n = 4, (SIZE // PATCH) ** 2
    expected = {
        "query_tokens": (np.int32, (b, 6)), "query_mask": (np.bool_, (b, 6)),
        "query_mlm_tokens": (np.int32, (b, 6)), "query_mlm_targets": (np.int32, (b, 6)),
        "query_mlm_weights": (np.float32, (b, 6)),
        "title_tokens": (np.int32, (b, 8)), "title_mask": (np.bool_, (b, 8)),
        "title_mlm_tokens": (np.int32, (b, 8)), "title_mlm_targets": (np.int32, (b, 8)),
        "title_mlm_weights": (np.float32, (b, 8)),
        "patches": (np.float32, (b, n, PATCH * PATCH * 3)), "patch_mask": (np.bool_, (b, n)),
        "item_index": (np.int32, (b,)), "query_id": (np.int32, (b,)),
    }
    assert set(batch) == set(expected) == set(pipeline.TRAIN_KEYS)
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype and batch[key].shape == shape, key
    # The join is right: each row's item, title and image come from its pair's item.
    for row, p in enumerate(pair_of(batch, pairs)):
        item = items[int(pairs[p]["item_index"])]
        assert batch["item_index"][row] == item["item_index"]
        tokens, mask = preprocess.encode_texts(tokenizer, [item["title"]], 8)
        np.testing.assert_array_equal(batch["title_tokens"][row], tokens[0])
        np.testing.assert_array_equal(batch["title_mask"][row], mask[0])
        np.testing.assert_array_equal(
            batch["patches"][row], preprocess.image_to_patches(item["image"][None], PATCH)[0])
    np.testing.assert_array_equal(batch["query_mlm_targets"], batch["query_tokens"])
    np.testing.assert_array_equal(batch["title_mlm_targets"], batch["title_tokens"])
    np.testing.assert_array_equal(batch["patch_mask"].sum(1), round(0.25 * n))


def test_masking_rates_over_many_batches(pairs, items, tokenizer):
    batches = take(train_iter(pairs, items, tokenizer, global_batch_size=32), 30)
    tokens = np.concatenate([b["title_tokens"] for b in batches])
    mask = np.concatenate([b["title_mask"] for b in batches])
    weights = np.concatenate([b["title_mlm_weights"] for b in batches])
    mlm = np.concatenate([b["title_mlm_tokens"] for b in batches])
    eligible = mask & (tokens >= 5)
    assert not ((weights > 0) & ~eligible).any()
    assert abs(weights.sum() / eligible.sum() - 0.15) < 0.025
    assert abs(np.mean(mlm[weights > 0] == 4) - 0.8) < 0.06


def test_same_seed_same_batches_other_seed_differs_new_order_each_epoch(pairs, items, tokenizer):
    a = take(train_iter(pairs, items, tokenizer), 12)
    assert_batches_equal(a, take(train_iter(pairs, items, tokenizer), 12))
    other = take(train_iter(pairs, items, tokenizer, seed=1), 1)[0]
    assert not np.array_equal(other["query_id"], a[0]["query_id"])
    steps = NUM_PAIRS // 16
    epoch0 = [p for b in a[:steps] for p in pair_of(b, pairs)]
    epoch1 = [p for b in a[steps : 2 * steps] for p in pair_of(b, pairs)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(NUM_PAIRS))
    assert epoch0 != epoch1
    # Same pair, next epoch: new masks (the position differs).
    row0 = epoch0.index(0)
    row1 = epoch1.index(0)
    m0 = a[row0 // 16]["patch_mask"][row0 % 16]
    m1 = a[steps + row1 // 16]["patch_mask"][row1 % 16]
    assert not np.array_equal(m0, m1)


def test_shards_are_disjoint_and_concatenate_to_the_global_batch(pairs, items, tokenizer):
    steps = NUM_PAIRS // 16
    full = take(train_iter(pairs, items, tokenizer), steps)
    shards = [take(train_iter(pairs, items, tokenizer, shard_index=k, shard_count=2), steps)
              for k in range(2)]
    seen = [{p for b in s for p in pair_of(b, pairs)} for s in shards]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(NUM_PAIRS))
    # Process-count independence: shard batches (incl. random masks) tile the global batch.
    for step in range(steps):
        for key in pipeline.TRAIN_KEYS:
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), full[step][key])


def test_drop_remainder_and_finite_epochs(pairs, items, tokenizer):
    it = train_iter(pairs, items, tokenizer, global_batch_size=40, num_epochs=2)
    batches = list(it)
    assert len(batches) == 2 * (NUM_PAIRS // 40)
    assert all(b["query_tokens"].shape[0] == 40 for b in batches)


def test_state_round_trip_resumes_mid_epoch(pairs, items, tokenizer):
    it = train_iter(pairs, items, tokenizer, global_batch_size=8, cfg=data_cfg(prefetch=2))
    take(it, 7)  # mid epoch (12 steps per epoch)
    state = it.get_state()
    expected = take(it, 8)  # crosses into the next epoch
    resumed = train_iter(pairs, items, tokenizer, global_batch_size=8, cfg=data_cfg(prefetch=2))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 8), expected)


def test_orbax_checkpoint_args_round_trip(pairs, items, tokenizer, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = train_iter(pairs, items, tokenizer)
    take(it, 3)
    save_args, _ = pipeline.iterator_checkpoint_args(it)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=save_args))
    expected = take(it, 2)
    fresh = train_iter(pairs, items, tokenizer)
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        mngr.restore(3, args=ocp.args.Composite(
            data_iter=pipeline.iterator_checkpoint_args(fresh)[1]))
    assert_batches_equal(take(fresh, 2), expected)


def test_worker_processes_give_identical_batches(pairs, items, tokenizer):
    expected = take(train_iter(pairs, items, tokenizer), 5)
    it = train_iter(pairs, items, tokenizer, cfg=data_cfg(worker_count=2, prefetch=1))
    got = take(it, 3)
    state = it.get_state()
    got += take(it, 2)
    assert_batches_equal(got, expected)
    resumed = train_iter(pairs, items, tokenizer, cfg=data_cfg(worker_count=2, prefetch=1))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 2), expected[3:])


@pytest.mark.parametrize(
    "kwargs, cfg, match",
    [({"global_batch_size": 9, "shard_count": 2}, {}, "not divisible by the 2 processes"),
     ({"global_batch_size": 128}, {}, "cannot fill one global batch"),
     ({"patch_size": 5}, {}, "not divisible by patch_size=5"),
     ({"shard_index": 2, "shard_count": 2}, {}, "shard_index"),
     ({}, {"query_len": 1}, "query_len"),
     ({}, {"patch_mask_ratio": 1.0}, "patch_mask_ratio")])
def test_invalid_arguments_raise_clear_errors(pairs, items, tokenizer, kwargs, cfg, match):
    with pytest.raises(ValueError, match=match):
        train_iter(pairs, items, tokenizer, cfg=data_cfg(**cfg), **kwargs)


def test_bad_records_raise_clear_errors(pairs, items, tokenizer):
    bad_pairs = [dict(p, item_index=NUM_ITEMS + 5) for p in pairs]
    with pytest.raises(ValueError, match="outside the 20 items"):
        next(train_iter(bad_pairs, items, tokenizer))
    small = [dict(it, image=it["image"][:8, :8]) for it in items]
    with pytest.raises(ValueError, match="data.image_size"):
        next(train_iter(pairs, small, tokenizer))


def test_item_batches_cover_every_item_once_with_padding(items, tokenizer):
    batches = list(pipeline.iterate_item_batches(items, tokenizer, data_cfg(), 8, patch_size=PATCH))
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"title_tokens", "title_mask", "patches", "item_index", "valid"}
        assert b["title_tokens"].dtype == np.int32 and b["title_tokens"].shape == (8, 8)
        assert b["title_mask"].dtype == np.bool_ and b["patches"].dtype == np.float32
        assert b["patches"].shape == (8, 16, 48)
        assert b["item_index"].dtype == np.int32 and b["valid"].dtype == np.bool_
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["item_index"] for b in batches])
    np.testing.assert_array_equal(valid, np.arange(24) < NUM_ITEMS)
    np.testing.assert_array_equal(index[valid], np.arange(NUM_ITEMS))
    np.testing.assert_array_equal(index[~valid], -1)
    tokens, _ = preprocess.encode_texts(tokenizer, [it["title"] for it in items], 8)
    np.testing.assert_array_equal(np.concatenate([b["title_tokens"] for b in batches])[valid],
                                  tokens)
    patches = np.concatenate([b["patches"] for b in batches])
    np.testing.assert_array_equal(
        patches[valid], preprocess.image_to_patches(np.stack([it["image"] for it in items]), PATCH))
    assert batches[-1]["title_mask"][~batches[-1]["valid"]].any(axis=1).all()  # no empty rows


def test_query_batches_cover_every_query_once_with_padding(tokenizer):
    queries = [f"{a} {b}" for a, b in itertools.product(WORDS[:3], WORDS[:3])]  # 9 queries
    batches = list(pipeline.iterate_query_batches(queries, tokenizer, data_cfg(), 4))
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 4, [True] + [False] * 3]
    tokens = np.concatenate([b["query_tokens"] for b in batches])[:9]
    assert tokens.dtype == np.int32 and batches[0]["query_mask"].dtype == np.bool_
    np.testing.assert_array_equal(tokens, preprocess.encode_texts(tokenizer, queries, 6)[0])
    assert list(pipeline.iterate_query_batches([], tokenizer, data_cfg(), 4)) == []
