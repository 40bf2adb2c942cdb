"""Query combinations of the built-in catalog: keys, held-out eval queries, relevant sets.

A query is a combination (template, attribute values), always including the category. Each
combination is encoded as one int64 *key* (template and values in mixed radix), so "which items
match this query" and "is this query held out" are vectorised integer comparisons over the
attribute array, with no text involved; `query_for_key` turns a key into its single query string.
Held-out (valid/test) queries are whole combinations, which is what keeps the splits' query
strings disjoint (see `vlp_jax.data.catalog`).
"""

import numpy as np

from vlp_jax.data.catalog import text, vocab

FIELDS = ("category", "color", "pattern", "brand", "material")  # columns of the attribute array
RADIX = (len(vocab.CATEGORIES), len(vocab.COLORS), len(vocab.PATTERNS), len(vocab.BRANDS),
         len(vocab.MATERIALS))
_MULT = tuple(int(np.prod(RADIX[:i])) for i in range(len(RADIX)))
KEYS_PER_TEMPLATE = int(np.prod(RADIX))
MAX_HELDOUT_FRACTION = 0.25  # of each slice's non-empty combinations, for valid + test together

_SLICE_SIZES = np.array([sum(s == name for s, _ in text.TEMPLATES) for name in text.SLICES])
_SLICE_TEMPLATES = np.array([[[t for t, (s, _) in enumerate(text.TEMPLATES) if s == name][
    min(j, size - 1)] for j in range(_SLICE_SIZES.max())]
    for name, size in zip(text.SLICES, _SLICE_SIZES, strict=True)])  # [slice, j] -> template


def combo_keys(attrs: np.ndarray, template: int) -> np.ndarray:
    """int64 key of each item's (template, values) combination; equal keys = same query.

    attrs: int [N, 5] attribute codes, columns = FIELDS.
    """
    key = np.full(len(attrs), template * KEYS_PER_TEMPLATE, np.int64)
    for f in ("category", *text.TEMPLATES[template][1]):
        j = FIELDS.index(f)
        key += attrs[:, j].astype(np.int64) * _MULT[j]
    return key


def decode_key(key: int) -> tuple[int, dict[str, int]]:
    """Inverse of `combo_keys`: (template, {field: code}) for the template's fields + category."""
    template, rest = divmod(int(key), KEYS_PER_TEMPLATE)
    codes = {f: rest // _MULT[j] % RADIX[j] for j, f in enumerate(FIELDS)}
    return template, {f: codes[f] for f in ("category", *text.TEMPLATES[template][1])}


def query_for_key(key: int, lang: str) -> str:
    template, codes = decode_key(key)
    return text.query_text(template, codes, lang)


def slice_for_key(key: int) -> str:
    return text.TEMPLATES[int(key) // KEYS_PER_TEMPLATE][0]


def draw_templates(rng: np.random.Generator, n: int) -> np.ndarray:
    """n templates: a uniformly drawn slice, then a uniformly drawn template of that slice."""
    s = rng.integers(0, len(text.SLICES), n)
    return _SLICE_TEMPLATES[s, (rng.random(n) * _SLICE_SIZES[s]).astype(np.int64)]


def select_eval(attrs: np.ndarray, rng: np.random.Generator, num_eval_queries: int
                ) -> tuple[list[int], list[int]]:
    """Held-out combination keys for (valid, test): disjoint, each matching >= 1 item.

    Per split, `num_eval_queries` are spread evenly over the slices; a slice gives up at most
    MAX_HELDOUT_FRACTION of its non-empty combinations (valid + test together), so small catalogs
    get fewer eval queries rather than a training set stripped of whole query families.
    """
    valid: list[int] = []
    test: list[int] = []
    for j, slice_name in enumerate(text.SLICES):
        want = num_eval_queries // 3 + (j < num_eval_queries % 3)  # per split
        templates = [t for t, (s, _) in enumerate(text.TEMPLATES) if s == slice_name]
        pool = np.unique(np.concatenate([combo_keys(attrs, t) for t in templates]))
        take = min(2 * want, int(MAX_HELDOUT_FRACTION * len(pool)))
        chosen = pool[rng.permutation(len(pool))[:take]].tolist()
        valid += chosen[: (take + 1) // 2]
        test += chosen[(take + 1) // 2:]
    return ([valid[i] for i in rng.permutation(len(valid))],
            [test[i] for i in rng.permutation(len(test))])


def relevant_items(attrs: np.ndarray, keys: list[int]) -> dict[int, np.ndarray]:
    """key -> ascending indices of *every* item whose combination equals the key."""
    out: dict[int, np.ndarray] = {}
    by_template: dict[int, list[int]] = {}
    for k in keys:
        by_template.setdefault(decode_key(k)[0], []).append(k)
    for t, ks in by_template.items():
        all_keys = combo_keys(attrs, t)
        order = np.argsort(all_keys, kind="stable")  # ties keep ascending item order
        sorted_keys = all_keys[order]
        lo = np.searchsorted(sorted_keys, ks, "left")
        hi = np.searchsorted(sorted_keys, ks, "right")
        for k, a, b in zip(ks, lo, hi, strict=True):
            out[k] = order[a:b]
    return out
