"""Command line of the catalog generator: ``python -m vlp_jax.data.catalog --out=DIR ...``.

Kept apart from ``generate`` so the generator module holds only the generator.
"""

from __future__ import annotations

import json

from vlp_jax.data.catalog import noise, render
from vlp_jax.data.catalog.generate import generate_catalog


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Output catalog directory.", required=True)
    flags.DEFINE_integer("num_items", 6000, "Number of products.")
    flags.DEFINE_integer("seed", 0, "Generator seed (same seed -> identical files).")
    flags.DEFINE_enum("lang", "en", ["en", "zh"], "Language of titles and queries.")
    flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
    flags.DEFINE_float("color_in_title_prob", 0.3, "P(title names the colour / the pattern).")
    flags.DEFINE_integer("num_eval_queries", 300, "Queries per eval split (valid, test).")
    flags.DEFINE_float("pairs_per_item", 4.0, "Mean train clicks per item.")
    flags.DEFINE_integer("png_compress_level", 0, "zlib level of the PNGs (0 = fastest).")
    flags.DEFINE_integer("num_workers", 1, "Processes rendering blocks in parallel.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out directory.")
    flags.DEFINE_enum("text_noise", "none", list(noise.TEXT_NOISE),
                      "'realistic': keyword stuffing, synonyms, wrong attribute words, "
                      "near-duplicate listings, click noise (English only).")
    flags.DEFINE_list("object_scale", [str(x) for x in render.OBJECT_SCALE],
                      "low,high object size as a fraction of the image side.")


def _main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if len(f.object_scale) != 2:
        raise app.UsageError(f"--object_scale needs two numbers, got {f.object_scale}")
    stats = generate_catalog(f.out, f.num_items, f.seed, f.lang, f.image_size,
                             f.color_in_title_prob, f.num_eval_queries, f.pairs_per_item,
                             f.png_compress_level, f.num_workers, f.overwrite,
                             text_noise=f.text_noise,
                             object_scale=tuple(float(x) for x in f.object_scale))
    print(json.dumps(stats, indent=1))
    print(f"wrote {stats['num_items']} items to {stats['out_dir']} in {stats['seconds']:.1f} s "
          f"({stats['items_per_sec']:.0f} items/s)")
