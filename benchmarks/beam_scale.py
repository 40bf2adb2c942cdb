"""Scale of the Beam jobs: built-in catalog generation → Beam dataset build → Beam embedding +
IVF index, with 1 and 2 DirectRunner worker processes, on this box.

Per stage: wall seconds and items/s, and peak resident memory of the driver process (which on
the DirectRunner also runs the runner and holds its shuffles) and of each worker process
(sampled every 0.2 s with psutil over the stage's process tree).  Then the IVF index's
recall@k against the exact (flat) index on the catalog's first ``--num_queries`` distinct
queries, encoded with the bundle's query tower.

    python benchmarks/beam_scale.py --num_items=1000000 --workers=1,2
    python benchmarks/beam_scale.py --num_items=20000 --out=benchmarks/results/beam_scale_20k.json
    # the same jobs with catalog, bundle and outputs on s3:// (a SeaweedFS server on
    # 127.0.0.1, started here as the tests start it), alternating with local runs
    python benchmarks/beam_scale.py --num_items=2000 --workers=2 --stores=local,s3 --rounds=2 \
        --out=benchmarks/results/beam_s3_2k.json

``--bundle=RUN/export`` embeds with a trained bundle; without it an untrained
``configs/base.py`` model is exported (same shapes, so the same speed; its recall figure is on
untrained embeddings).  Each stage is its CLI in a subprocess; writes JSON to ``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_items", 1_000_000, "Built-in catalog size.")
flags.DEFINE_list("workers", ["1", "2"], "DirectRunner worker processes to measure.")
flags.DEFINE_integer("image_size", 64, "Image side (the base config's).")
flags.DEFINE_float("chunk_mb", 4.0, "Build: MB of a catalog file per read range / block.")
flags.DEFINE_integer("chunk_size", 8192, "Embedding: items per Beam task / chunk.")
flags.DEFINE_integer("batch_size", 256, "Embedding: items per encoder call.")
flags.DEFINE_integer("num_queries", 1000, "Queries for recall vs exact.")
flags.DEFINE_integer("k", 100, "Recall@k.")
flags.DEFINE_integer("ivf_nprobe", 16, "IVF cells probed per query.")
flags.DEFINE_string("bundle", "", "Serving bundle ('' = untrained configs/base.py).")
flags.DEFINE_string("workdir", "", "Scratch directory ('' = a new temporary one).")
flags.DEFINE_string("out", "benchmarks/results/beam_scale.json", "JSON output path.")
flags.DEFINE_list("stores", ["local"], "Where catalog, bundle and outputs are: local and/or s3 "
                  "(a local SeaweedFS server; no recall measured there: same embeddings).")
flags.DEFINE_integer("rounds", 1, "Repeat the (store x workers) runs, alternating, for medians.")


def _rss_mb(proc: psutil.Process) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _last_json(text: str) -> dict:
    """The last JSON object printed at the start of a line (the CLIs' summaries)."""
    starts = [0] if text.startswith("{") else []
    starts += [i + 1 for i in range(len(text)) if text.startswith("\n{", i)]
    for start in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text, start)[0]
        except json.JSONDecodeError:
            continue
    return {}


def run_stage(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, last JSON object it printed, peak RSS of it and its children."""
    start = time.perf_counter()
    err_log = tempfile.TemporaryFile()  # Beam logs a lot: not into this process
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err_log, text=True)
    root = psutil.Process(proc.pid)
    peaks: dict[int, float] = {}
    workers: set[int] = set()  # Beam SDK worker processes (not the shells that start them)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                tree = []
            for p in tree:
                if p.pid not in peaks:
                    try:
                        if p.name().startswith("python") and "sdk_worker_main" in " ".join(
                                p.cmdline()):
                            workers.add(p.pid)
                    except psutil.Error:
                        pass
                peaks[p.pid] = max(peaks.get(p.pid, 0.0), _rss_mb(p))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        err_log.seek(max(0, err_log.seek(0, os.SEEK_END) - 4000))
        tail = err_log.read().decode("utf-8", "replace")
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    summary = _last_json(out)
    children = sorted((v for k, v in peaks.items() if k in workers), reverse=True)
    return {"seconds": round(seconds, 2), "summary": summary,
            "driver_peak_mb": round(peaks.get(proc.pid, 0.0), 1),
            "worker_peak_mb": [round(v, 1) for v in children]}


def _queries(catalog: str, n: int) -> list[str]:
    out: dict[str, None] = {}
    for split in ("test", "valid", "train"):
        with open(os.path.join(catalog, f"{split}.jsonl"), encoding="utf-8") as f:
            for line in f:
                out.setdefault(json.loads(line)["query"], None)
                if len(out) >= n:
                    return list(out)
    return list(out)


def recall_vs_exact(index_dir: str, bundle_dir: str, catalog: str) -> dict:
    import faiss

    from vlp_jax.serve import load_bundle, search_index

    queries = _queries(catalog, FLAGS.num_queries)
    q = load_bundle(bundle_dir, towers=("query",), num_devices=1).encode_queries(queries)
    _, exact = search_index.SearchIndex(index_dir, "flat").search(q, FLAGS.k)
    ivf = search_index.SearchIndex(index_dir, "ivf")
    start = time.perf_counter()
    _, approx = ivf.search(q, FLAGS.k)
    ms = (time.perf_counter() - start) / len(q) * 1e3
    hits = [len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)]
    return {"queries": len(q), "k": FLAGS.k, f"recall@{FLAGS.k}": round(float(np.mean(hits)), 4),
            "ivf_nlist": int(faiss.extract_index_ivf(ivf.index).nlist),
            "ivf_nprobe": ivf.params.ivf_nprobe, "ivf_ms_per_query_batched": round(ms, 3)}


def main(argv: list[str]) -> None:
    del argv
    work = FLAGS.workdir or tempfile.mkdtemp(prefix="vlp_beam_scale_")
    py, n = sys.executable, FLAGS.num_items
    catalog = os.path.join(work, "catalog")
    result: dict = {"num_items": n, "date": time.strftime("%Y-%m-%d"), "host": {
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()]},
        "settings": {k: FLAGS[k].value for k in ("image_size", "chunk_mb", "chunk_size",
                                                 "batch_size", "ivf_nprobe")}}
    if os.path.isfile(FLAGS.out):  # a resumed run keeps the stages it already measured
        with open(FLAGS.out) as f:
            previous = json.load(f)
        if previous.get("num_items") == n:
            result = {**previous, **{k: result[k] for k in ("date", "host", "settings")}}
    if not os.path.isfile(os.path.join(catalog, "items.jsonl")):
        gen = run_stage([py, "-m", "vlp_jax.data.catalog", f"--out={catalog}", f"--num_items={n}",
                         f"--image_size={FLAGS.image_size}", "--num_workers=2"])
        result["generate"] = {**gen, "items_per_sec": round(n / gen["seconds"], 1)}
    bundle = FLAGS.bundle
    if not bundle:
        import serving

        bundle = serving.untrained_bundle(os.path.join(work, "bundle"))
    result["bundle"] = FLAGS.bundle or "untrained configs/base.py"
    _save(result)
    s3 = _start_s3(work, catalog, bundle) if "s3" in FLAGS.stores else None
    if s3 is not None:
        result["s3_upload_seconds"] = s3["upload_seconds"]
    try:
        for r in range(FLAGS.rounds):
            for w in (int(x) for x in FLAGS.workers):
                for store in FLAGS.stores:
                    key = f"workers_{w}" if store == "local" else f"{store}_workers_{w}"
                    if FLAGS.rounds > 1:
                        key += f"_round_{r}"
                    result[key] = _measure(py, work, n, catalog, bundle, w, store, s3)
                    print(json.dumps(result[key], indent=1))
                    _save(result)
    finally:
        if s3 is not None:
            s3["store"].stop()
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    _save(result)
    print(f"wrote {FLAGS.out}")


def _start_s3(work: str, catalog: str, bundle: str) -> dict:
    """The tests' SeaweedFS server (tests/object_stores.py) with the catalog and the bundle
    uploaded; its environment exported, so the stages' subprocesses find it too."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from object_stores import export_env, start_s3

    from vlp_jax.data.build import beam_io

    store = start_s3()
    export_env(store)
    opts = [f"--s3_endpoint_url={store.endpoint}",
            f"--s3_access_key_id={store.env['AWS_ACCESS_KEY_ID']}",
            f"--s3_secret_access_key={store.env['AWS_SECRET_ACCESS_KEY']}",
            "--s3_region_name=us-east-1"]
    beam_io.configure(opts)
    root = store.uri()
    start = time.perf_counter()
    beam_io.upload_tree(catalog, f"{root}/catalog")
    beam_io.upload_tree(bundle, f"{root}/bundle")
    return {"store": store, "root": root, "options": opts,
            "upload_seconds": round(time.perf_counter() - start, 2)}


def _measure(py: str, work: str, n: int, catalog: str, bundle: str, w: int, store: str,
             s3: dict | None) -> dict:
    """One Beam build and one Beam embedding + index with ``w`` workers on ``store``."""
    opts = ["--", f"--direct_num_workers={w}", "--direct_running_mode=multi_processing"]
    tag = f"{store}_w{w}_{time.time_ns()}"
    if store == "local":
        where = {"catalog": catalog, "bundle": bundle, "data": f"{work}/tfds_w{w}",
                 "index": os.path.join(work, f"index_w{w}")}
    else:
        assert s3 is not None, store
        where = {"catalog": f"{s3['root']}/catalog", "bundle": f"{s3['root']}/bundle",
                 "data": f"{s3['root']}/{tag}/tfds", "index": f"{s3['root']}/{tag}/index"}
        opts += s3["options"]
    if store == "local" and FLAGS.rounds > 1:  # every round builds anew, as on the store
        where["data"] = f"{work}/{tag}/tfds"
    build = run_stage([py, "-m", "vlp_jax.data.build", f"--catalog_dir={where['catalog']}",
                       f"--data_dir={where['data']}", f"--image_size={FLAGS.image_size}",
                       f"--chunk_mb={FLAGS.chunk_mb}", "--runner=DirectRunner", *opts])
    beam = build["summary"].get("beam") or {}
    write = beam.get("write_seconds") or (build["summary"]["build_seconds"] - beam.get(
        "check_seconds", 0) - beam.get("tokenizer_seconds", 0))
    build["items_per_sec"] = round(n / build["seconds"], 1)
    build["check_items_per_sec"] = round(n / beam["check_seconds"], 1) if beam else None
    build["write_items_per_sec"] = round(n / write, 1) if write > 0 else None
    embed = run_stage([py, "-m", "vlp_jax.indexing.beam_embed", f"--bundle={where['bundle']}",
                       f"--items={where['catalog']}/items.jsonl", f"--out={where['index']}",
                       "--ann=ivf", f"--ivf_nprobe={FLAGS.ivf_nprobe}",
                       f"--chunk_size={FLAGS.chunk_size}", f"--batch_size={FLAGS.batch_size}",
                       "--num_devices=1", "--overwrite", *opts])
    embed["items_per_sec"] = round(n / embed["seconds"], 1)
    embed["embed_items_per_sec"] = embed["summary"]["beam"]["items_per_sec"]
    out = {"store": store, "build": build, "embed_and_index": embed,
           "load_average": [round(x, 1) for x in os.getloadavg()]}
    if store == "local":
        out["recall"] = recall_vs_exact(where["index"], bundle, catalog)
    return out


def _save(result: dict) -> None:
    """Write the JSON after every stage, atomically: a long run keeps what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    tmp = f"{FLAGS.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
