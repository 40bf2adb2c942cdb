"""Input-pipeline throughput: train batches/s of vlp_jax.data.input.pipeline on a synthetic
source.

Builds ~5k items (64×64 RGB, 12-word titles) and ~5k (query, item) pairs in memory, a WordPiece
tokenizer trained on them, and times ``make_train_iterator`` (tokenise, MLM + patch masking,
patchify) for a few worker/prefetch settings.  In-memory sources isolate the pipeline's CPU cost
from storage; a TFDS array_record source adds its read time on top.

    python benchmarks/pipeline_throughput.py --batch_size=256 --steps=20

Prints a table and writes ``benchmarks/results/pipeline_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.base import get_config  # noqa: E402
from vlp_jax.data.input import pipeline  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def synthetic_sources(num: int, image_size: int, seed: int = 0):
    """``num`` items and ``num`` pairs following the TFDS record contract."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9)))
             for _ in range(500)]
    items = [{"item_index": i, "item_id": f"item{i}", "title": " ".join(rng.choice(words, 12)),
              "image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)}
             for i in range(num)]
    pairs = []
    for _ in range(num):
        item = int(rng.integers(num))
        title_words = items[item]["title"].split()
        query = " ".join(rng.choice(title_words, rng.integers(2, 5)))
        pairs.append({"query": query, "item_id": f"item{item}", "item_index": item, "slice": ""})
    return pairs, items


def train_tokenizer(texts: list[str], vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def bench(pairs, items, tok, data_cfg, *, batch_size: int, patch_size: int, steps: int) -> float:
    """Batches/s over ``steps`` batches after 2 warm-up batches (start-up excluded)."""
    it = pipeline.make_train_iterator(pairs, items, tok, data_cfg, global_batch_size=batch_size,
                                      patch_size=patch_size, seed=0, shard_index=0, shard_count=1)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    rate = steps / (time.perf_counter() - start)
    del it  # stops worker processes before the next setting starts
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=5000, help="items and pairs")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", default="0:0,0:2,2:2",
                        help="comma-separated worker_count:prefetch settings")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "pipeline_throughput.json"))
    args = parser.parse_args()

    config = get_config()
    data_cfg, patch_size = config.data, config.model.patch_size
    pairs, items = synthetic_sources(args.num, data_cfg.image_size)
    tok = train_tokenizer([it["title"] for it in items])
    rows = []
    for setting in args.settings.split(","):
        workers, prefetch = (int(x) for x in setting.split(":"))
        cfg = data_cfg.copy_and_resolve_references()
        cfg.worker_count, cfg.prefetch = workers, prefetch
        rate = bench(pairs, items, tok, cfg, batch_size=args.batch_size, patch_size=patch_size,
                     steps=args.steps)
        rows.append({"worker_count": workers, "prefetch": prefetch, "batches_per_s": rate,
                     "examples_per_s": rate * args.batch_size})

    print(f"batch {args.batch_size}, {args.num} pairs/items, {data_cfg.image_size}px, "
          f"patch {patch_size}, {os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'prefetch':>8} {'batches/s':>10} {'examples/s':>11}")
    for r in rows:
        print(f"{r['worker_count']:>8} {r['prefetch']:>8} {r['batches_per_s']:>10.2f} "
              f"{r['examples_per_s']:>11.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch_size": args.batch_size, "num_records": args.num,
                   "image_size": data_cfg.image_size, "patch_size": patch_size,
                   "query_len": data_cfg.query_len, "title_len": data_cfg.title_len,
                   "steps": args.steps, "cpu_count": os.cpu_count(),
                   "platform": platform.platform(), "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
