"""Checkpoint save/restore time: local disk vs the GCS emulator (Orbax, the project's options).

    python benchmarks/object_store_io.py [--sizes_mb=20,200] [--repeats=3]

Starts a GCS emulator on 127.0.0.1 (tests/object_stores.py), saves and restores a pytree of
float32 arrays of each size with the same ``CheckpointManager`` options training uses (async save,
waited for), alternating local and gs:// rounds, and prints medians.  Loopback numbers: they show
the cost of the object-store path in the client stack (HTTP, tensorstore's gs:// driver, commit
markers instead of renames), not a cloud bucket's bandwidth.  Writes
``benchmarks/results/object_store_io.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _tree(size_mb: int):
    import numpy as np

    n = size_mb * (1 << 20) // 4 // 8
    rng = np.random.default_rng(0)
    return {f"layer_{i}": rng.standard_normal(n, dtype=np.float32) for i in range(8)}


def _round(directory: str, tree, step: int) -> tuple[float, float]:
    import jax
    import orbax.checkpoint as ocp

    arrays = jax.tree_util.tree_map(jax.numpy.asarray, tree)
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True, create=True))
    start = time.perf_counter()
    manager.save(step, args=ocp.args.StandardSave(arrays))
    manager.wait_until_finished()
    saved = time.perf_counter() - start
    start = time.perf_counter()
    restored = manager.restore(step, args=ocp.args.StandardRestore(arrays))
    jax.block_until_ready(restored)
    loaded = time.perf_counter() - start
    manager.close()
    return saved, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mb", default="20,200")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "object_store_io.json"))
    args = parser.parse_args()
    from object_stores import export_env, start_gcs

    store = start_gcs()
    export_env(store)
    rows = []
    try:
        for size in (int(s) for s in args.sizes_mb.split(",")):
            tree = _tree(size)
            times: dict[str, dict[str, list[float]]] = {
                "local": {"save": [], "restore": []}, "gs": {"save": [], "restore": []}}
            local_root = tempfile.mkdtemp(prefix="vlp_ckpt_bench_")
            for r in range(args.repeats):  # alternate: the VM is noisy
                for kind in ("local", "gs"):
                    base = (os.path.join(local_root, f"r{r}") if kind == "local"
                            else store.uri(f"ckpt{size}", f"r{r}"))
                    save, restore = _round(base, tree, 1)
                    times[kind]["save"].append(save)
                    times[kind]["restore"].append(restore)
            for kind, t in times.items():
                row = {"size_mb": size, "backend": kind,
                       "save_s": statistics.median(t["save"]),
                       "restore_s": statistics.median(t["restore"]), "runs": args.repeats}
                row["save_mb_s"] = size / row["save_s"]
                row["restore_mb_s"] = size / row["restore_s"]
                rows.append(row)
    finally:
        store.stop()
    print(f"{'size MB':>8} {'backend':>8} {'save s':>8} {'MB/s':>7} {'restore s':>10} {'MB/s':>7}")
    for row in rows:
        print(f"{row['size_mb']:>8} {row['backend']:>8} {row['save_s']:>8.2f} "
              f"{row['save_mb_s']:>7.0f} {row['restore_s']:>10.2f} {row['restore_mb_s']:>7.0f}")
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows,
              "note": "medians over alternating rounds; GCS emulator on 127.0.0.1 (loopback)"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
