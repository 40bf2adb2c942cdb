"""Realistic text and click noise for the built-in catalog (``text_noise="realistic"``).

The default catalog is *honest*: a title never names an attribute its item lacks, so "the title
holds every query keyword" is an oracle for relevance (precision 1.0 in
``benchmarks/results/keyword_precision.json``), and keyword-based false-negative control looks
better there than it can on a marketplace.  Real listings are noisier; this module adds, from its
own random stream (so the default catalog's bytes never change):

* **keyword stuffing**: a share of titles end with a run of colour words the seller hopes to rank
  for ("... Red Blue Black White 2026 New"), most of which the item does not have;
* **synonyms**: a named colour, pattern or material is often written with another word
  ("crimson" for red, "stripe" for striped, "cotton blend" for cotton), so exact containment
  misses relevant items;
* **wrong attribute words**: at a fixed rate the named colour, pattern or material is wrong;
* **near-duplicate listings**: a share of items re-list an earlier product of their block (same
  category, colour, pattern, brand, material) as another seller would: a fresh title draw and a
  fresh photo (other pose, background and noise), relevant to exactly the same queries;
* **click noise**: a share of training clicks lands on a random item of the block.

Relevance (valid/test relevant sets, ``catalog.relevance``) stays exact: it follows the items'
true attributes, including the duplicates'.  English only: the synonym tables are English.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from vlp_jax.data.catalog import vocab

TEXT_NOISE = ("none", "realistic")


@dataclass(frozen=True)
class NoiseRates:
    stuffing: float = 0.35  # P(title ends with a run of 3-5 colour words)
    synonym: float = 0.5  # P(a named colour / pattern / material is written as a synonym)
    wrong: float = 0.1  # P(the named colour / pattern / material is the wrong one), each
    duplicate: float = 0.15  # P(item re-lists an earlier product of its block)
    click: float = 0.1  # P(a training click goes to a random item of the block)


REALISTIC = NoiseRates()

# Synonyms (English), keyed by attribute key; disjoint from every query word.
COLOR_SYNONYMS = {
    "red": ("crimson", "scarlet", "burgundy"), "orange": ("tangerine", "coral"),
    "yellow": ("mustard", "lemon"), "green": ("olive", "emerald", "sage"),
    "blue": ("navy", "cobalt", "sky"), "purple": ("violet", "lavender", "plum"),
    "pink": ("rose", "blush", "fuchsia"), "brown": ("camel", "coffee", "khaki"),
    "black": ("jet", "ebony", "onyx"), "white": ("ivory", "cream", "snow"),
}
PATTERN_SYNONYMS = {
    "plain": ("plain", "pure colour"), "striped": ("stripe", "stripes", "pinstripe"),
    "dotted": ("dots", "dotted", "spotted"), "checked": ("checked", "tartan", "gingham"),
    "gradient": ("ombre", "tie dye"), "zigzag": ("chevron", "wave"),
}
MATERIAL_SYNONYMS = {
    "cotton": ("cotton blend", "pure cotton"), "linen": ("flax",), "polyester": ("poly",),
    "silk": ("satin", "mulberry silk"), "denim": ("jean",), "wool": ("merino", "cashmere"),
    "leather": ("pu", "genuine leather"), "canvas": ("duck canvas",), "nylon": ("ripstop",),
    "ceramic": ("porcelain", "stoneware"), "glass": ("borosilicate",),
    "steel": ("stainless", "metal"), "plastic": ("acrylic", "abs"),
}
STUFFING_TAILS = ("2026 New", "New", "Hot", "2026")
_MATERIAL_INDEX = {m[0]: i for i, m in enumerate(vocab.MATERIALS)}
NUM_UNIFORMS = 12  # uniform numbers one title's noise consumes


def check(text_noise: str, lang: str) -> None:
    if text_noise not in TEXT_NOISE:
        raise ValueError(f"text_noise must be one of {TEXT_NOISE}, got {text_noise!r}")
    if text_noise != "none" and lang != "en":
        raise ValueError(f"text_noise={text_noise!r} is English-only (its synonym tables are "
                         f"English); got lang={lang!r}")


def duplicate_rows(attrs: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """``attrs`` [n, 5] with a ``rate`` share of rows (never row 0) copied from an earlier row
    of the block: the re-listed products. Copies chain, so a product keeps one attribute set."""
    out = attrs.copy()
    n = len(out)
    dup = rng.random(n) < rate
    src = (rng.random(n) * np.arange(n)).astype(np.int64)  # uniform in [0, i)
    for i in np.flatnonzero(dup[1:] if n else dup).tolist():
        out[i + 1] = out[src[i + 1]]
    return out


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _other(code: int, radix: int, u: float) -> int:
    """A code != ``code`` drawn uniformly from the other ``radix - 1`` values."""
    return (code + 1 + min(int(u * (radix - 1)), radix - 2)) % radix


def title_codes(codes: dict[str, int], u: list[float], rates: NoiseRates) -> dict[str, int]:
    """The codes whose words the title writes: colour, pattern and material each wrong at
    ``rates.wrong`` (a wrong material is another one of the category's materials)."""
    out = dict(codes)
    allowed = [_MATERIAL_INDEX[m] for m in vocab.CATEGORIES[codes["category"]].materials]
    if u[10] < rates.wrong and len(allowed) > 1:
        others = [m for m in allowed if m != codes["material"]]
        out["material"] = others[min(int(u[11] * len(others)), len(others) - 1)]
    if u[0] < rates.wrong:
        out["color"] = _other(codes["color"], len(vocab.COLORS), u[1])
    if u[2] < rates.wrong:
        out["pattern"] = _other(codes["pattern"], len(vocab.PATTERNS), u[3])
    return out


def _cap(phrase: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in phrase.split(" "))


def _swap(title: str, word: str, synonym: str) -> str:
    return re.sub(rf"(?<!\S){re.escape(_cap(word))}(?!\S)", _cap(synonym), title, count=1)


def noisy_title(title: str, shown: dict[str, int], u: list[float], rates: NoiseRates) -> str:
    """Synonyms for the named attributes and keyword stuffing, applied to an English title.

    ``shown``: the codes the title was written with (``title_codes``)."""
    for field, table, words, j in (("color", COLOR_SYNONYMS, vocab.COLORS, 4),
                                   ("pattern", PATTERN_SYNONYMS, vocab.PATTERNS, 5),
                                   ("material", MATERIAL_SYNONYMS, vocab.MATERIALS, 6)):
        key, word = words[shown[field]][0], words[shown[field]][1]
        if u[j] < rates.synonym:
            title = _swap(title, word, _pick(table[key], (u[j] / rates.synonym)))
    if u[7] < rates.stuffing:
        k = 3 + min(int(u[8] * 3), 2)
        start = int(u[9] * len(vocab.COLORS))
        colors = [vocab.COLORS[(start + 3 * i) % len(vocab.COLORS)][1] for i in range(k)]
        tail = _pick(STUFFING_TAILS, (u[7] / rates.stuffing))
        title = " ".join([title, *(_cap(c) for c in colors), tail])
    return title


def noisy_clicks(item: np.ndarray, n: int, rng: np.random.Generator, rate: float
                 ) -> np.ndarray:
    """``item`` (clicked rows of a block of ``n``) with a ``rate`` share sent to random rows."""
    out = item.copy()
    wrong = rng.random(len(out)) < rate
    out[wrong] = rng.integers(0, n, int(wrong.sum()))
    return out
