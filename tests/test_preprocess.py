"""Tests for vlp_jax.data.input.preprocess: tokenisation, BERT masking, patches, patch masking."""

import zlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlp_jax.data.input import preprocess

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["red", "shoe", "blue", "dress", "bag", "hat", "green", "big", "small", "soft", "##s"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_encode_texts_exact_ids_truncation_and_padding(tokenizer):
    tokens, mask = preprocess.encode_texts(
        tokenizer, ["Red shoes", b"blue xyz", "", "red blue green big small"], 5)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_ and tokens.shape == (4, 5)
    # red=5 shoe=6 ##s=15, blue=7, unknown word -> [UNK]=1; [CLS]=2 [SEP]=3 [PAD]=0
    np.testing.assert_array_equal(tokens, [[2, 5, 6, 15, 3], [2, 7, 1, 3, 0], [2, 3, 0, 0, 0],
                                           [2, 5, 7, 11, 3]])  # truncated, still ends in [SEP]
    np.testing.assert_array_equal(mask, tokens != 0)


def test_encode_texts_direct_rust_path_equals_the_transformers_call(tokenizer):
    """encode_texts calls the Rust tokenizer directly when it has no truncation or padding
    set; the ids equal those of transformers' call.  A backend that has truncation set
    (a saved tokenizer.json can) goes through the call, which clears it: still full ids."""
    texts = ["Red shoes", "blue xyz", "", "red blue green big small", "SOFT  bags!", "caf\u00e9"]

    def reference(tok):
        return tok(texts, add_special_tokens=False, truncation=False, padding=False,
                   return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    tokens, mask = preprocess.encode_texts(tokenizer, texts, 12)
    got = [list(row[1:n - 1]) for row, n in zip(tokens, mask.sum(axis=1), strict=True)]
    assert got == reference(tokenizer)
    truncating = make_tokenizer()
    truncating.backend_tokenizer.enable_truncation(max_length=2)
    tokens2, _ = preprocess.encode_texts(truncating, texts, 12)
    np.testing.assert_array_equal(tokens2, tokens)


def test_encode_texts_rejects_too_short_max_len(tokenizer):
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        preprocess.encode_texts(tokenizer, ["red"], 1)


def _random_tokens(n_rows: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, length - 1, n_rows)  # content tokens, plus [CLS]/[SEP]
    tokens = np.zeros((n_rows, length), np.int32)
    mask = np.zeros((n_rows, length), bool)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, n + 1] = 2, 3
        tokens[i, 1 : n + 1] = rng.integers(5, 5 + len(WORDS), n)
        mask[i, : n + 2] = True
    return tokens, mask


def test_mlm_mask_rates_and_invariants(tokenizer):
    mask_id, special, replacement = preprocess.mlm_vocab(tokenizer)
    assert mask_id == 4 and set(special) == {0, 1, 2, 3, 4}
    tokens, mask = _random_tokens(3000, 24)
    rngs = [preprocess.record_rng(0, i) for i in range(len(tokens))]
    out, targets, weights = preprocess.mlm_mask(tokens, mask, rngs, mlm_prob=0.15, mask_id=mask_id,
                                                special_ids=special, replacement_ids=replacement)
    assert out.dtype == np.int32 and targets.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(targets, tokens)
    eligible = mask & (tokens >= 5)
    selected = weights == 1.0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert not (selected & ~eligible).any(), "special or padding token selected"
    np.testing.assert_array_equal(out[~selected], tokens[~selected])
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.01
    sel_out, sel_orig = out[selected], tokens[selected]
    frac_mask = np.mean(sel_out == mask_id)
    frac_random = np.mean((sel_out != mask_id) & (sel_out != sel_orig))
    frac_same = np.mean(sel_out == sel_orig)
    n_repl = len(replacement)
    assert abs(frac_mask - 0.8) < 0.03
    # A random replacement equals the original with prob 1/n_repl: it then counts as "unchanged".
    assert abs(frac_random - 0.1 * (1 - 1 / n_repl)) < 0.02
    assert abs(frac_same - (0.1 + 0.1 / n_repl)) < 0.02
    assert np.isin(sel_out[sel_out != mask_id], replacement).all()  # never a special token
    # Deterministic given the generators.
    again = preprocess.mlm_mask(tokens, mask, [preprocess.record_rng(0, i) for i in range(3000)],
                                mlm_prob=0.15, mask_id=mask_id, special_ids=special,
                                replacement_ids=replacement)
    np.testing.assert_array_equal(again[0], out)


def test_mlm_cap_keeps_the_earliest_draws_and_leaves_the_rest_untouched(tokenizer):
    mask_id, special, replacement = preprocess.mlm_vocab(tokenizer)
    assert [preprocess.mlm_max_predictions(n, 0.3) for n in (12, 24, 10, 1)] == [4, 8, 3, 1]
    assert preprocess.mlm_max_predictions(24, 1.0) == 24
    with pytest.raises(ValueError, match="max fraction"):
        preprocess.mlm_max_predictions(24, 0.0)
    tokens, mask = _random_tokens(400, 24)
    kwargs = dict(mlm_prob=0.6, mask_id=mask_id, special_ids=special, replacement_ids=replacement)
    free = preprocess.mlm_mask(tokens, mask, [preprocess.record_rng(0, i) for i in range(400)],
                               **kwargs)
    capped = preprocess.mlm_mask(tokens, mask, [preprocess.record_rng(0, i) for i in range(400)],
                                 max_predictions=3, **kwargs)
    counts = capped[2].sum(axis=1)
    assert counts.max() == 3 and (counts == np.minimum(free[2].sum(axis=1), 3)).all()
    assert not (capped[2] > free[2]).any()  # a subset of the uncapped selection
    kept = capped[2] == 1.0
    np.testing.assert_array_equal(capped[0][kept], free[0][kept])  # same 80/10/10 action
    np.testing.assert_array_equal(capped[0][~kept], tokens[~kept])  # dropped: original token


def test_mlm_mask_validates_inputs(tokenizer):
    mask_id, special, replacement = preprocess.mlm_vocab(tokenizer)
    tokens, mask = _random_tokens(2, 8)
    kwargs = dict(mask_id=mask_id, special_ids=special, replacement_ids=replacement)
    with pytest.raises(ValueError, match="mlm_prob"):
        preprocess.mlm_mask(tokens, mask, [np.random.default_rng(0)] * 2, mlm_prob=1.5, **kwargs)
    with pytest.raises(ValueError, match="one generator per row"):
        preprocess.mlm_mask(tokens, mask, [np.random.default_rng(0)], mlm_prob=0.15, **kwargs)


def test_image_to_patches_layout_values_and_round_trip():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 51]
    patches = preprocess.image_to_patches(images, 4)
    assert patches.dtype == np.float32 and patches.shape == (3, 16, 48)
    np.testing.assert_allclose(patches[0, 0, :3], [-1.0, 1.0, 51 / 255 * 2 - 1], rtol=1e-6)
    # Patch 5 = grid row 1, column 1; flattened in (py, px, channel) order.
    expected = (images[2, 4:8, 4:8, :].reshape(-1) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(patches[2, 5], expected, rtol=1e-6, atol=1e-6)
    back = preprocess.patches_to_images(patches, 4)
    np.testing.assert_allclose(back, (images / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(np.round((back + 1) * 127.5).astype(np.uint8), images)


@pytest.mark.parametrize(
    "images, patch, match",
    [(np.zeros((1, 16, 16, 3), np.float32), 4, "uint8"),
     (np.zeros((1, 16, 16), np.uint8), 4, r"\[B, S, S, 3\]"),
     (np.zeros((1, 16, 16, 3), np.uint8), 5, "not divisible by patch_size 5")])
def test_image_to_patches_errors(images, patch, match):
    with pytest.raises(ValueError, match=match):
        preprocess.image_to_patches(images, patch)


def test_patch_mask_exact_count_uniform_and_deterministic():
    rngs = [preprocess.record_rng(3, i) for i in range(2000)]
    m = preprocess.patch_mask(64, 0.25, rngs)
    assert m.dtype == np.bool_ and m.shape == (2000, 64)
    np.testing.assert_array_equal(m.sum(1), 16)
    assert np.abs(m.mean(0) - 0.25).max() < 0.05  # every position masked about equally often
    np.testing.assert_array_equal(
        preprocess.patch_mask(64, 0.25, [preprocess.record_rng(3, i) for i in range(2000)]), m)
    np.testing.assert_array_equal(preprocess.patch_mask(10, 0.33, rngs[:4]).sum(1), 3)  # round
    assert not preprocess.patch_mask(16, 0.0, rngs[:2]).any()
    for bad in (1.0, -0.1, 0.99):
        with pytest.raises(ValueError, match="patch_mask_ratio"):
            preprocess.patch_mask(16, bad, rngs[:2])


def test_query_hash_is_stable_and_canonical():
    assert preprocess.query_hash("red shoe") == zlib.crc32(b"red shoe") & 0x7FFFFFFF
    assert preprocess.query_hash("  Red   SHOE ") == preprocess.query_hash("red shoe")
    assert preprocess.query_hash("red shoe") != preprocess.query_hash("red shoes")
    assert 0 <= preprocess.query_hash("连衣裙 红色") < 2**31


def test_record_rng_depends_on_seed_and_position():
    draw = lambda s, p: preprocess.record_rng(s, p).random(4)
    np.testing.assert_array_equal(draw(0, 7), draw(0, 7))
    assert not np.allclose(draw(0, 7), draw(0, 8))
    assert not np.allclose(draw(0, 7), draw(1, 7))
