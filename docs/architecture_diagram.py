"""Draw the data-flow picture of docs/architecture.md: ``python docs/architecture_diagram.py``.

Writes ``docs/architecture.png`` (or ``--out=PATH``).  The picture is generated, never edited by
hand: change the boxes below and rerun.  Needs only matplotlib (a dependency of vlp_jax).

The flow reads as a snake: the top row left to right (data), the middle row right to left
(training), the bottom row left to right (evaluation, export and serving).
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

# Colours by group of packages (fill, edge).
DATA = ("#dbe9f6", "#2f6ea5")  # vlp_jax.data
MODEL = ("#fde6cf", "#c46a10")  # models, losses, parallel
TRAIN = ("#dcefd9", "#3b7d34")  # train
OUT = ("#e8def3", "#6a4a9a")  # eval, indexing, serve

COL_X = (12.5, 37.5, 62.5, 87.5)  # box centres of the four columns
ROW_Y = (80.0, 50.0, 20.0)  # box centres of the three rows
BOX_W, BOX_H = 21.0, 19.0

# name: (centre x, centre y, width, height, title, module, detail, colours)
BOXES = {
    "builtin": (COL_X[0], ROW_Y[0] + 5.5, BOX_W, 8.5, "Built-in catalog",
                "python -m vlp_jax.data.catalog", "", DATA),
    "user": (COL_X[0], ROW_Y[0] - 5.5, BOX_W, 8.5, "or your catalog",
             "--config.data.catalog_dir=DIR", "", DATA),
    "tfds": (COL_X[1], ROW_Y[0], BOX_W, BOX_H, "TFDS build", "vlp_jax.data.build",
             "array_record splits: items,\ntrain, valid, test; tokenizer/;\n"
             "bad records skipped + counted", DATA),
    "grain": (COL_X[2], ROW_Y[0], BOX_W, BOX_H, "Grain pipeline", "vlp_jax.data.input",
              "shuffle, shard per process,\ntokenise, mask, batch;\niterator state checkpointed",
              DATA),
    "towers": (COL_X[3], ROW_Y[0], BOX_W, BOX_H, "Query + item towers", "vlp_jax.models",
               "query tokens → embedding\nitem: one stream over\n[title tokens ; image patches]",
               MODEL),
    "losses": (COL_X[3], ROW_Y[1], BOX_W, BOX_H, "Losses + negatives",
               "vlp_jax.losses, .parallel",
               "MLM, MPM_R, query-item QIC\nCDNS: items of all devices\nMBNS: sharded memory bank",
               MODEL),
    "step": (COL_X[2], ROW_Y[1], BOX_W, BOX_H, "Sharded train step", "vlp_jax.train",
             "jit over the data mesh;\nGradCache, non-finite guard,\npreemption, workdir lock",
             TRAIN),
    "ckpt": (COL_X[1], ROW_Y[1], BOX_W, BOX_H, "Orbax checkpoints", "RUN/checkpoints/",
             "train state + data iterator,\nasync, keep-N; a corrupt\nstep falls back", TRAIN),
    "eval": (COL_X[0], ROW_Y[1], BOX_W, BOX_H, "Evaluation", "vlp_jax.eval → RUN/eval/",
             "every item is a candidate;\nRecall@K overall and\nper query slice", OUT),
    "export": (COL_X[1], ROW_Y[2], BOX_W, BOX_H, "Serving bundle", "--mode=export → RUN/export/",
               "params-only query and item\ntowers, config, tokenizer,\nmanifest", OUT),
    "index": (COL_X[2], ROW_Y[2], BOX_W, BOX_H, "Item embeddings + ANN",
              "python -m vlp_jax.indexing.index",
              "item tower over the catalog,\nfaiss flat + HNSW / IVF;\n"
              "resumable, bad records counted", OUT),
    "service": (COL_X[3], ROW_Y[2], BOX_W, BOX_H, "Query service",
                "python -m vlp_jax.serve.server",
                "query tower online;\nGET /search, / (search page),\n/healthz", OUT),
}

# (from, to, from side, to side); sides: l, r, t, b.
ARROWS = [
    ("builtin", "tfds", "r", "l"), ("user", "tfds", "r", "l"), ("tfds", "grain", "r", "l"),
    ("grain", "towers", "r", "l"), ("towers", "losses", "b", "t"), ("losses", "step", "l", "r"),
    ("step", "ckpt", "l", "r"), ("ckpt", "eval", "l", "r"), ("ckpt", "export", "b", "t"),
    ("export", "index", "r", "l"), ("index", "service", "r", "l"),
]


def _anchor(name: str, side: str) -> tuple[float, float]:
    x, y, w, h = BOXES[name][:4]
    return {"l": (x - w / 2, y), "r": (x + w / 2, y), "t": (x, y + h / 2),
            "b": (x, y - h / 2)}[side]


def draw(out: pathlib.Path) -> None:
    fig = plt.figure(figsize=(13, 8.6), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(-8, 100)
    ax.axis("off")
    ax.text(50, 96.5, "vlp_jax: from a product catalog to a search service", ha="center",
            va="center", fontsize=17, weight="bold")

    for x, y, w, h, title, module, detail, (fill, edge) in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                    boxstyle="round,pad=0.3,rounding_size=1.2",
                                    facecolor=fill, edgecolor=edge, linewidth=1.8))
        if detail:
            ax.text(x, y + h / 2 - 2.6, title, ha="center", va="center", fontsize=13,
                    weight="bold", color="#1a1a1a")
            ax.text(x, y + h / 2 - 5.7, module, ha="center", va="center", fontsize=9.5,
                    family="DejaVu Sans Mono", color=edge)
            ax.text(x, y - 2.8, detail, ha="center", va="center", fontsize=10.5,
                    linespacing=1.35, color="#1a1a1a")
        else:
            ax.text(x, y + 1.6, title, ha="center", va="center", fontsize=12.5, weight="bold")
            ax.text(x, y - 1.9, module, ha="center", va="center", fontsize=9,
                    family="DejaVu Sans Mono", color=edge)

    for a, b, sa, sb in ARROWS:
        ax.add_patch(FancyArrowPatch(_anchor(a, sa), _anchor(b, sb), arrowstyle="-|>",
                                     mutation_scale=20, linewidth=2.0, color="#444444",
                                     shrinkA=3, shrinkB=3))
    # The service loads the bundle's query tower too (the index holds the item side).
    ax.add_patch(FancyArrowPatch(_anchor("export", "b"), _anchor("service", "b"),
                                 connectionstyle="arc3,rad=0.22", arrowstyle="-|>",
                                 mutation_scale=20, linewidth=2.0, color="#444444",
                                 shrinkA=3, shrinkB=3))
    ax.text(COL_X[2], ROW_Y[2] - BOX_H / 2 - 3.6, "query tower", ha="center", va="center",
            fontsize=10.5, style="italic", color="#444444")

    # What a user brings, under the two catalog boxes; what a run writes, in the free corner.
    ax.text(COL_X[0], ROW_Y[0] - 13.2, "items.jsonl, images/,\ntrain|valid|test.jsonl",
            ha="center", va="center", fontsize=9.5, style="italic", color=DATA[1])
    ax.text(COL_X[0], ROW_Y[2] + 3, "A run writes to RUN/:\nmetrics.jsonl, tensorboard/,\n"
            "checkpoints/, eval/, export/,\nconfig.json", ha="center", va="center",
            fontsize=10.5, linespacing=1.35, color="#333333",
            bbox={"boxstyle": "round,pad=0.6", "facecolor": "white", "edgecolor": "#999999",
                  "linestyle": "--"})

    legend = [Patch(facecolor=f, edgecolor=e, label=label) for (f, e), label in (
        (DATA, "data"), (MODEL, "models, losses, parallel"), (TRAIN, "train"),
        (OUT, "eval, indexing, serve"))]
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=4,
              fontsize=11, frameon=False, title="vlp_jax packages", title_fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor="white")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "architecture.png"), help="PNG to write.")
    draw(pathlib.Path(parser.parse_args().out))


if __name__ == "__main__":
    main()
