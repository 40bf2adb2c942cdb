"""Titles and queries of the built-in catalog (English or Chinese, same attributes).

Titles imitate marketplace listings: brand first, then season/audience/style/material words, the
category name or a synonym, feature phrases and marketing filler. Brand and material are always
there; colour and pattern words only when the generator decides to show them (with probability
`color_in_title_prob`), so most titles are silent about what the image shows.

Queries are short: the attribute words of one *template* (a set of attribute fields) followed by the
category name, e.g. "nordvik red cotton t-shirt" / "北岸 红色 纯棉 T恤". Each (template, values)
combination has exactly one query string and no two combinations share a string (word lists are
disjoint), which is what lets the generator hold out whole combinations for valid/test.
"""

import functools

from vlp_jax.data.catalog import vocab

# Query templates: (slice, attribute fields besides the category, which every query includes).
TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("visual", ("color",)),
    ("visual", ("pattern",)),
    ("visual", ("color", "pattern")),
    ("textual", ("brand",)),
    ("textual", ("material",)),
    ("textual", ("brand", "material")),
    ("mixed", ("color", "brand")),
    ("mixed", ("color", "material")),
    ("mixed", ("pattern", "brand")),
    ("mixed", ("pattern", "material")),
)
SLICES: tuple[str, ...] = ("visual", "textual", "mixed")
_QUERY_ORDER = ("brand", "color", "pattern", "material")  # word order; the category comes last
NUM_TITLE_UNIFORMS = 18  # uniform numbers consumed by one title (drawn in bulk by the caller)

_LANG = {
    "en": dict(styles=vocab.EN_STYLES, audiences=vocab.EN_AUDIENCES, seasons=vocab.EN_SEASONS,
               fillers=vocab.EN_FILLERS, sep=" "),
    "zh": dict(styles=vocab.ZH_STYLES, audiences=vocab.ZH_AUDIENCES, seasons=vocab.ZH_SEASONS,
               fillers=vocab.ZH_FILLERS, sep=""),
}


def check_lang(lang: str) -> None:
    if lang not in _LANG:
        raise ValueError(f"lang must be one of {sorted(_LANG)}, got {lang!r}")


def query_text(template: int, codes: dict[str, int], lang: str) -> str:
    """The query string of `template` for attribute codes (a dict field -> code, incl. category)."""
    words = vocab.word_lists(lang)
    fields = TEMPLATES[template][1]
    parts = [words[f][codes[f]] for f in _QUERY_ORDER if f in fields]
    return " ".join([*parts, words["category"][codes["category"]]])


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


@functools.cache
def _cap(phrase: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in phrase.split(" "))


def make_title(codes: dict[str, int], u: list[float], lang: str, show_color: bool,
               show_pattern: bool) -> str:
    """A keyword-stuffed listing title.

    Args:
      codes: attribute codes (category, color, pattern, brand, material).
      u: NUM_TITLE_UNIFORMS numbers in [0, 1) that make every choice (so the caller can draw them
        for a whole block at once, which is much faster than drawing one by one).
      lang: "en" or "zh".
      show_color, show_pattern: whether the colour / pattern word is written.
    """
    lw = _LANG[lang]
    en = lang == "en"
    cat = vocab.CATEGORIES[codes["category"]]
    brand = vocab.BRANDS[codes["brand"]][0 if en else 1]
    material = vocab.MATERIALS[codes["material"]][1 if en else 2]
    synonyms = cat.en_synonyms if en else cat.zh_synonyms
    features = cat.en_features if en else cat.zh_features
    name = cat.en if en else cat.zh

    middle = [material, _pick(lw["styles"], u[3])]
    if u[4] < 0.5:
        second_style = _pick(lw["styles"], u[5])
        if second_style != middle[1]:
            middle.append(second_style)
    if show_pattern:
        word = vocab.PATTERNS[codes["pattern"]][1 if en else 2]
        middle.insert(int(u[13] * (len(middle) + 1)), word)
    if show_color:
        word = vocab.COLORS[codes["color"]][1 if en else 2]
        middle.insert(int(u[12] * (len(middle) + 1)), word)

    parts = [brand, _pick(lw["seasons"], u[0])]
    if u[1] < 0.6:
        parts.append(_pick(lw["audiences"], u[2]))
    parts += middle
    parts.append(name if u[6] < 0.4 else _pick(synonyms, u[14]))
    parts.append(_pick(features, u[7]))
    if u[8] < 0.7:
        parts.append(_pick(features, u[9]))
    parts.append(_pick(lw["fillers"], u[10]))
    if u[11] < 0.5:  # keyword stuffing: repeat the category in other words
        parts.append(_pick((name, *synonyms), u[15]))
    if u[16] < 0.6:
        parts.append(_pick(lw["fillers"], u[17]))
    out: list[str] = []
    for p in parts:  # drop immediate repeats ("Short Sleeve Short Sleeve")
        if not out or out[-1] != p:
            out.append(p)
    if en:
        return " ".join(_cap(p) for p in out)
    return "".join(out)
