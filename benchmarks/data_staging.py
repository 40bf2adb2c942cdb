"""Reading a TFDS build from object storage: direct random reads vs a staged local copy.

For each config's built-in catalog (``tiny``: 1,000 items at 32 px; ``base``: 6,000 at 64 px)
the local build is published to the GCS emulator and to SeaweedFS's S3 (both on 127.0.0.1,
started here as the tests start them), then, in alternating rounds:

- ``local``: random reads from the local build (the floor);
- ``gs direct``: the same random reads through ArrayRecord's own gs:// reader (one ranged GET
  per record);
- ``s3 direct``: what ArrayRecord does with s3:// (it cannot open it);
- ``stage``: ``store_commit.stage_build`` into a fresh folder (listing checked against the
  commit marker, every file copied and size-checked), then reads from that copy; and the
  ``re-check`` cost when the copy is current (a listing, no copy).

And, for ``--build_configs``, ``prepare_dataset`` from scratch with catalog and cache local vs
on each store (build on local disk, publish, stage), plus a second host's ``prepare_dataset``.

Random reads are single records in a random order (``source[i]``, as a Grain sampler without
batching does) and batches of 64 through ``__getitems__``.  Loopback hides network latency: a
real bucket adds ~10-50 ms per GET, which multiplies the direct-read cost and barely changes
the staging cost (a few large files).

    python benchmarks/data_staging.py --configs=tiny,base --reads=2000 --rounds=3

Prints a table and writes ``benchmarks/results/data_staging.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from configs import base as base_config  # noqa: E402
from configs import tiny as tiny_config  # noqa: E402
from vlp_jax.data import shard_check, store_commit  # noqa: E402
from vlp_jax.data.build import from_config  # noqa: E402
from vlp_jax.data.input import dataset_reader  # noqa: E402

SPLITS = ("items", "train")
BATCH = 64


def _shard_bytes(local_dir: str, split: str) -> int:
    return sum(os.path.getsize(p) for p, _ in shard_check.shard_files(local_dir)
               if f"-{split}.array_record" in p)


def _time_reads(source, order: np.ndarray) -> dict[str, float]:
    """Seconds for single random reads and for batched reads of the same indices (after a
    warm-up read, so opening the shard readers is not charged to the first mode timed)."""
    source.__getitems__([int(i) for i in order[:BATCH]])
    t0 = time.perf_counter()
    for i in order:
        source[int(i)]
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, len(order), BATCH):
        source.__getitems__([int(i) for i in order[start:start + BATCH]])
    return {"single_s": single, "batched_s": time.perf_counter() - t0}


def _direct_source(attempt_uri: str, split: str, image_size: int):
    import tensorflow_datasets as tfds

    tfds_builder = tfds.builder_from_directory(attempt_uri)
    return dataset_reader.TextSource(tfds_builder.as_data_source(split), split, image_size)


def _s3_direct(attempt_uri: str, image_size: int) -> str:
    try:
        source = _direct_source(attempt_uri, "train", image_size)
        n = len(source)
        source[0]
    except Exception as err:  # noqa: BLE001 - the outcome is what we report
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"len() = {n if 'n' in locals() else '?'}; first read: {type(err).__name__}: " \
               f"{first[:160]}"
    return f"read {n} records"


def bench_config(name: str, config, stores: dict, reads: int, rounds: int, cache: str) -> dict:
    config.data.cache_dir = cache
    t0 = time.perf_counter()
    local = from_config.prepare_dataset(config.data)
    prepare_s = time.perf_counter() - t0
    size = int(local.report["image_size"])
    work = tempfile.mkdtemp(prefix="data_staging_")
    copy = os.path.join(work, "build")
    shutil.copytree(local.dataset_dir, copy)
    published = {}
    for scheme, store in stores.items():
        location = store.uri("tfds", name, "1.0.0")
        t0 = time.perf_counter()
        shutil.copytree(local.dataset_dir, copy, dirs_exist_ok=True)
        attempt = store_commit.publish(copy, location, os.path.join(work, f"adopt-{scheme}"))
        published[scheme] = {"location": location, "attempt": attempt,
                             "publish_s": time.perf_counter() - t0}
    total_bytes = sum(store_commit.local_files(local.dataset_dir).values())
    rng = np.random.default_rng(0)
    orders = {s: rng.integers(0, len(local.sources[s]), min(reads, len(local.sources[s])))
              for s in SPLITS}
    per_record = {s: _shard_bytes(local.dataset_dir, s) / len(local.sources[s]) for s in SPLITS}
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    gs = published["gs"]
    for r in range(rounds):
        for split in SPLITS:
            for key, sec in _time_reads(local.sources[split], orders[split]).items():
                add(f"local/{split}/{key}", sec)
            direct = _direct_source(gs["attempt"], split, size)
            for key, sec in _time_reads(direct, orders[split]).items():
                add(f"gs_direct/{split}/{key}", sec)
        for scheme, pub in published.items():
            stage_dir = os.path.join(work, f"stage-{scheme}-{r}")
            t0 = time.perf_counter()
            local_copy, _ = store_commit.stage_build(pub["location"], stage_dir)
            add(f"{scheme}_stage/cold_s", time.perf_counter() - t0)
            t0 = time.perf_counter()
            store_commit.stage_build(pub["location"], stage_dir)
            add(f"{scheme}_stage/recheck_s", time.perf_counter() - t0)
            if scheme == "gs":
                staged = dataset_reader.load_dataset(local_copy)
                for split in SPLITS:
                    for key, sec in _time_reads(staged.sources[split], orders[split]).items():
                        add(f"staged/{split}/{key}", sec)
            shutil.rmtree(stage_dir, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "items": len(local.sources["items"]), "train_pairs": len(local.sources["train"]),
        "image_size": size, "build_mb": round(total_bytes / 1e6, 2),
        "local_prepare_s": round(prepare_s, 2),
        "publish_s": {s: round(p["publish_s"], 2) for s, p in published.items()},
        "s3_direct": _s3_direct(published["s3"]["attempt"], size),
        "reads": {}, "staging": {},
    }
    for split in SPLITS:
        n = len(orders[split])
        for mode in ("local", "gs_direct", "staged"):
            for key in ("single", "batched"):
                sec = med[f"{mode}/{split}/{key}_s"]
                result["reads"][f"{mode}/{split}/{key}"] = {
                    "records": n, "seconds": round(sec, 4),
                    "records_per_s": round(n / sec, 1),
                    "mb_per_s": round(n * per_record[split] / 1e6 / sec, 2)}
    for scheme in published:
        cold = med[f"{scheme}_stage/cold_s"]
        result["staging"][scheme] = {
            "cold_s": round(cold, 3), "mb_per_s": round(total_bytes / 1e6 / cold, 1),
            "recheck_s": round(med[f"{scheme}_stage/recheck_s"], 3)}
    result["raw_seconds"] = {k: [round(x, 4) for x in v] for k, v in samples.items()}
    shutil.rmtree(work, ignore_errors=True)
    return result


def bench_build(name: str, make_config, stores: dict, cache: str) -> dict:
    """Seconds of ``prepare_dataset`` from scratch with catalog and cache local vs on a store
    (build on local disk + publish + stage), and of a second host's ``prepare_dataset``."""
    config = make_config()
    config.data.cache_dir = cache
    catalog = from_config.builtin_catalog_dir(config.data)
    work = tempfile.mkdtemp(prefix="data_build_")
    out = {}
    try:
        config.data.catalog_dir = catalog
        config.data.cache_dir = os.path.join(work, "local")
        t0 = time.perf_counter()
        from_config.prepare_dataset(config.data)
        out["local"] = {"prepare_s": round(time.perf_counter() - t0, 2)}
        for scheme, store in stores.items():
            t0 = time.perf_counter()
            config.data.catalog_dir = store.uri("catalog")
            store_commit.upload_tree(catalog, config.data.catalog_dir, last=("items.jsonl",))
            upload = time.perf_counter() - t0
            config.data.cache_dir = store.uri("cache")
            config.data.staging_dir = os.path.join(work, f"host0-{scheme}")
            t0 = time.perf_counter()
            from_config.prepare_dataset(config.data)
            first = time.perf_counter() - t0
            config.data.staging_dir = os.path.join(work, f"host1-{scheme}")
            t0 = time.perf_counter()
            from_config.prepare_dataset(config.data)
            out[scheme] = {"catalog_upload_s": round(upload, 2),
                           "prepare_s": round(first, 2),
                           "other_host_prepare_s": round(time.perf_counter() - t0, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def print_table(results: dict) -> None:
    print(f"{'config':6} {'split':6} {'mode':10} {'read':8} {'records/s':>11} {'MB/s':>8} "
          f"{'vs local':>9}")
    for name, res in results.items():
        for split in SPLITS:
            for key in ("single", "batched"):
                base = res["reads"][f"local/{split}/{key}"]["records_per_s"]
                for mode in ("local", "gs_direct", "staged"):
                    row = res["reads"][f"{mode}/{split}/{key}"]
                    print(f"{name:6} {split:6} {mode:10} {key:8} {row['records_per_s']:11.1f} "
                          f"{row['mb_per_s']:8.2f} {row['records_per_s'] / base:8.2f}x")
        for scheme, row in res["staging"].items():
            print(f"{name:6} stage {scheme}: {res['build_mb']} MB in {row['cold_s']} s "
                  f"({row['mb_per_s']} MB/s); re-check of a current copy {row['recheck_s']} s")
        print(f"{name:6} s3 direct: {res['s3_direct']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,base")
    parser.add_argument("--reads", type=int, default=2000, help="random records per split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build_configs", default="tiny", help="configs whose build from "
                        "scratch is timed with catalog and cache local vs on each store")
    parser.add_argument("--cache_dir", default="", help="local cache for the builds "
                        "(default: ~/.cache/vlp_jax)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "data_staging.json"))
    args = parser.parse_args()
    from object_stores import export_env, start_gcs, start_s3

    gcs, s3 = start_gcs(), start_s3()
    try:
        for store in (gcs, s3):
            export_env(store)
        stores = {"gs": gcs, "s3": s3}
        makers = {"tiny": tiny_config.get_config, "base": base_config.get_config}
        cache = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax")
        results = {name: bench_config(name, makers[name](), stores, args.reads, args.rounds,
                                      cache)
                   for name in args.configs.split(",")}
        builds = {name: bench_build(name, makers[name], stores, cache)
                  for name in args.build_configs.split(",") if name}
    finally:
        gcs.stop()
        s3.stop()
    print_table(results)
    for name, rows in builds.items():
        for where, row in rows.items():
            print(f"{name:6} prepare_dataset from scratch, {where:5}: {row}")
    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
           "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "note": "object stores on 127.0.0.1 (fake-gcs-server, SeaweedFS): no network "
                   "latency; medians of alternating rounds", "results": results,
           "builds": builds}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
