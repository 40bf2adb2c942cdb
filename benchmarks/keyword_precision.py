"""Precision of keyword control's "title holds every query keyword" test, by signature size.

``negatives.keyword_control`` tests containment on one-hash bit signatures of the token ids
(``vlp_jax.losses.qic.false_negatives``).  A false bit makes an item a keyword match it is not; with
``keyword_control="positive"`` every such item among the loss's candidates becomes a wrong
positive, and a memory bank multiplies the candidates.  This script measures, on a built-in
catalog where relevance is known, for random training queries against random candidate items:

* keyword matches per query (signature test, exactly as the train step runs it: the project's
  tokenizer, ``data.query_len``/``data.title_len`` truncation, ``keyword_signature``,
  ``contains``), and how many of them are relevant;
* the same for exact token-set containment (no hashing), the bound the signatures approach.

    python benchmarks/keyword_precision.py --bits=256,512,1024,2048 --queries=300 --candidates=2000
    python benchmarks/keyword_precision.py --text_noise=realistic \
        --out=benchmarks/results/keyword_precision_noisy.json

``--text_noise=realistic`` measures the same on the catalog with realistic title noise (keyword
stuffing, synonyms, wrong attribute words, near-duplicates; ``vlp_jax.data.catalog.noise``),
generated once into the cache with the config's size, seed and image size.  "recall" is the
share of the relevant candidates the test matches (synonyms lower it).

Prints a table and writes ``benchmarks/results/keyword_precision.json``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.config.overrides import apply_overrides, load_config_file, parse_set_flags  # noqa: E402,E501
from vlp_jax.data import tokenizer  # noqa: E402
from vlp_jax.data.build import from_config  # noqa: E402
from vlp_jax.data.catalog import relevance  # noqa: E402
from vlp_jax.data.input import preprocess  # noqa: E402
from vlp_jax.losses.qic import false_negatives as fn_control  # noqa: E402
from vlp_jax.runtime import atomic_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/base.py", "Config whose data fields pick the catalog.")
flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE, e.g. "
                          "--set=data.builtin_lang=zh (repeatable).")
flags.DEFINE_list("bits", ["256", "512", "1024", "2048"], "Signature sizes to test.")
flags.DEFINE_integer("queries", 300, "Training queries sampled.")
flags.DEFINE_integer("candidates", 2000, "Candidate items per query (about a 2,048-entry bank).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", "benchmarks/results/keyword_precision.json", "JSON output.")
flags.DEFINE_enum("text_noise", "none", ["none", "realistic"], "Catalog text noise.")


def _word_sets(tokens: np.ndarray, mask: np.ndarray) -> list[frozenset[int]]:
    """Token ids between [CLS] and [SEP] of each row (what the signatures hash)."""
    lengths = mask.sum(axis=1)
    return [frozenset(row[1: n - 1].tolist()) for row, n in zip(tokens, lengths, strict=True)]


def measure(data_cfg, bits: list[int], num_queries: int, num_candidates: int, seed: int) -> dict:
    handle = from_config.prepare_dataset(data_cfg)
    catalog_dir = data_cfg.catalog_dir or from_config.builtin_catalog_dir(data_cfg)
    with open(os.path.join(catalog_dir, "items.jsonl")) as f:
        items = [json.loads(line) for line in f]
    with open(os.path.join(catalog_dir, "train.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    tables = relevance.relevance_tables(catalog_dir, [it["item_id"] for it in items])
    if tables is None:
        raise SystemExit(f"{catalog_dir} is not a built-in catalog: relevance is unknown")
    tok = tokenizer.load_tokenizer(handle.tokenizer_dir)
    rng = np.random.default_rng(seed)
    sample = [pairs[i] for i in rng.choice(len(pairs), num_queries, replace=False)]
    cand = rng.choice(len(items), num_candidates, replace=False)
    q_tok, q_mask = preprocess.encode_texts(tok, [p["query"] for p in sample], data_cfg.query_len)
    t_tok, t_mask = preprocess.encode_texts(tok, [items[c]["title"] for c in cand],
                                            data_cfg.title_len)
    hashes = np.asarray([preprocess.query_hash(p["query"]) for p in sample])
    pos = np.searchsorted(tables.query_hashes, hashes)
    relevant = np.asarray(relevance.is_relevant(tables.constraints[pos], tables.item_attrs[cand]))
    slices = np.asarray([p["slice"] for p in sample])

    q_words, t_words = _word_sets(q_tok, q_mask), _word_sets(t_tok, t_mask)
    exact = np.array([[bool(q) and q <= t for t in t_words] for q in q_words])
    rows = {"exact": exact}
    for b in bits:
        q_sig = np.asarray(fn_control.keyword_signature(q_tok, q_mask, b))
        t_sig = np.asarray(fn_control.keyword_signature(t_tok, t_mask, b))
        rows[str(b)] = np.asarray(fn_control.contains(q_sig[:, None, :], t_sig[None, :, :]))

    def summary(match: np.ndarray, keep: np.ndarray) -> dict:
        m, r = match[keep], relevant[keep]
        n = max(int(keep.sum()), 1)
        matched, right = float(m.sum()) / n, float((m & r).sum()) / n
        return {"matches_per_query": matched, "relevant_matches_per_query": right,
                "precision": right / matched if matched else float("nan"),
                "relevant_per_query": float(r.sum()) / n,
                "recall": float((m & r).sum()) / max(float(r.sum()), 1.0)}

    every = np.ones(len(sample), bool)
    out = {name: {"all": summary(m, every),
                  **{s: summary(m, slices == s) for s in sorted(set(slices.tolist()))}}
           for name, m in rows.items()}
    return {"catalog": catalog_dir, "queries": num_queries, "candidates": num_candidates,
            "seed": seed, "query_len": data_cfg.query_len, "title_len": data_cfg.title_len,
            "results": out}


def main(argv):
    del argv
    cfg = apply_overrides(load_config_file(FLAGS.config), parse_set_flags(FLAGS.set))
    if FLAGS.text_noise != "none":
        from vlp_jax.experiments import protocol

        spec = {"num_items": cfg.data.builtin_num_items, "seed": cfg.data.builtin_seed,
                "image_size": cfg.data.image_size, "text_noise": FLAGS.text_noise}
        cfg.data.catalog_dir = protocol.ensure_catalog(spec, cfg.data.cache_dir)
    bits = [int(b) for b in FLAGS.bits]
    result = measure(cfg.data, bits, FLAGS.queries, FLAGS.candidates, FLAGS.seed)
    print(f"{result['queries']} training queries x {result['candidates']} random candidates "
          f"({result['catalog']})")
    print(f"{'signature':>10} | {'matches/query':>13} | {'relevant':>8} | {'precision':>9} | "
          f"{'recall':>6} | precision by slice")
    for name, r in result["results"].items():
        by = ", ".join(f"{s} {v['precision']:.2f}" for s, v in r.items() if s != "all")
        a = r["all"]
        label = f"{name} bits" if name != "exact" else "exact"
        print(f"{label:>10} | {a['matches_per_query']:>13.2f} | "
              f"{a['relevant_matches_per_query']:>8.2f} | {a['precision']:>9.2f} | "
              f"{a['recall']:>6.2f} | {by}")
    atomic_io.write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
