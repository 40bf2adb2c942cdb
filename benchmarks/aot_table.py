"""docs/aot.md's table: the train step of two configs × three bank sizes compiled for four TPU
topologies (``python -m vlp_jax.aot``, one fresh process per cell), then one Markdown table.

    python benchmarks/aot_table.py                 # compile the missing cells, print the table
    python benchmarks/aot_table.py --workers=2     # two cells at a time
    python benchmarks/aot_table.py --table_only    # only print the table from the saved cells
    python benchmarks/aot_table.py --table_only --write_docs   # and put it into docs/aot.md

Each cell's report goes to ``benchmarks/results/aot/CONFIG_bankK_TOPOLOGY.json`` (a cell
already there is not compiled again, so an interrupted run resumes); a cell that does not
divide the topology keeps the error instead.  Needs libtpu (``pip install -e ".[tpu]"``).
Every figure is a compile-time estimate, not a measurement.  ``paper_scale`` runs at its own
global batch (4,096), ``base`` at 512 (``--base_batch``: the 128 pairs per chip of v5e:2x2,
2 per chip on v5e:16x16); both divide every topology of the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "aot")
TOPOLOGIES = ("v5e:2x2", "v5e:16x16", "v5p:4x4x4", "v4:4x4x8")
CONFIGS = ("base", "paper_scale")
BANKS = (0, 65536, 1048576)


def cell_path(config: str, bank: int, topo: str) -> str:
    return os.path.join(OUT, f"{config}_bank{bank}_{topo.replace(':', '_')}.json")


def run_cell(config: str, bank: int, topo: str, batch: int, hlo_root: str) -> str:
    """Compile one cell in a fresh process; returns a one-line status."""
    path = cell_path(config, bank, topo)
    claim = path + ".running"  # lets two drivers (e.g. one per config) share the folder
    if os.path.exists(path) or os.path.exists(claim):
        return f"{path}: kept"
    open(claim, "w").close()
    cmd = [sys.executable, "-m", "vlp_jax.aot", f"--config=configs/{config}.py",
           f"--topology={topo}", "--programs=train", f"--config.negatives.bank_size={bank}",
           f"--config.train.batch_size={batch}", f"--out={path}"]
    if hlo_root:
        cmd.append(f"--hlo_dir={os.path.join(hlo_root, os.path.basename(path)[:-5])}")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 2 or not os.path.exists(path):
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error", "  "))]
        with open(path, "w") as f:
            json.dump({"topology": topo, "error": "\n".join(err) or proc.stderr[-2000:],
                       "returncode": proc.returncode}, f, indent=1)
    os.remove(claim)
    return f"{path}: exit {proc.returncode} in {time.time() - start:.0f} s"


def cell_estimate(config: str, r: dict) -> dict:
    """The report's ``aot.estimate`` of its train step; recomputed (model FLOPs from the
    config at the cell's batch and bank) for cells saved before the estimator existed."""
    p = r["programs"][0]
    if "estimate" in p:
        return p["estimate"]
    sys.path.insert(0, ROOT)
    import importlib

    from vlp_jax.aot import estimate
    from vlp_jax.convert import pretrained

    cfg = importlib.import_module(f"configs.{config}").get_config()
    cfg.train.batch_size = r["config"]["batch_size"]
    cfg.negatives.bank_size = r["config"]["bank_size"]
    cfg = pretrained.configure_text_init(cfg)
    n = r["data_devices"]
    flops = estimate.train_model_flops(cfg, r["config"]["vocab_size"])["total"] / n
    return estimate.estimate(p, r["chip"], n, flops)


def _row(config: str, bank: int, topo: str) -> str:
    path = cell_path(config, bank, topo)
    blank = "| | | | | | |"
    if not os.path.exists(path):
        return f"| {topo} | {config} | {bank:,} | (not compiled) | {blank}"
    r = json.load(open(path))
    if "programs" not in r:
        first = r["error"].splitlines()[1 if len(r["error"].splitlines()) > 1 else 0].strip()
        return f"| {topo} | {config} | {bank:,} | — | config error: {first} {blank}"
    p = r["programs"][0]
    hbm = r["chip"]["hbm_bytes"] / 2**30
    if "error" in p:
        need = p.get("required_bytes")
        used = (f"needs {need / 2**30:.1f} (temporaries) of {p['available_bytes'] / 2**30:.2f}"
                if need else "—")
        return f"| {topo} | {config} | {bank:,} | {used} | **no** {blank}"
    e = cell_estimate(config, r)
    ag, ar = p["collectives"]["all-gather"], p["collectives"]["all-reduce"]
    lo, hi = (t * 1e3 for t in e["step_seconds_range"])
    rps, mfu = e["rows_per_second_range"], e["mfu_range"]
    cm = e["cost_model_seconds"]
    cost_model = f"{cm * 1e3:.2f}" if cm > 0 else f"unusable ({cm:.3g} s)"
    return (f"| {topo} | {config} | {bank:,} | {p['total_bytes'] / 2**30:.2f} of {hbm:.0f} | "
            f"{'yes' if p['fits'] else '**no**'} | {ag['count']} ({ag['bytes'] / 2**20:.2f}) | "
            f"{ar['count']} ({ar['bytes'] / 2**20:.2f}) | "
            f"{lo:.2f}–{hi:.2f} ({e['bound_lower']} / {e['bound_upper']}) | "
            f"{rps[0]:,.0f}–{rps[1]:,.0f} | {mfu[0]:.0%}–{mfu[1]:.0%} | {cost_model} |")


def table() -> str:
    head = ["| topology | config | bank | HBM per device (GiB) | fits | all-gathers per step "
            "(MiB per device) | all-reduces (MiB) | est. step (ms), low–high (bound at each "
            "end) | est. pairs/s | MFU (model FLOPs) | XLA cost model (ms) |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    rows = [_row(c, b, t) for t in TOPOLOGIES for c in CONFIGS for b in BANKS]
    return "\n".join(head + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4096,
                        help="global batch of the paper_scale cells")
    parser.add_argument("--base_batch", type=int, default=512,
                        help="global batch of the base cells (the issue's probe: 4 chips x 128)")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--write_docs", action="store_true",
                        help="also put the table into docs/aot.md (between its markers)")
    parser.add_argument("--hlo_dir", default="", help="keep each cell's compiled HLO here")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if not args.table_only:
        # Most telling first (a run may be cut short): the 2^16 bank on every topology, then
        # 2^20, then no bank; paper_scale before base.
        order = [(c, b) for b in (65536, 1048576, 0) for c in reversed(CONFIGS)]
        cells = [(c, b, t) for c, b in order if c in args.configs.split(",")
                 for t in args.topologies.split(",")]
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            def run(cell):
                batch = args.base_batch if cell[0] == "base" else args.batch
                return run_cell(*cell, batch, args.hlo_dir)

            for status in pool.map(run, cells):
                print(status, flush=True)
    print(table())
    if args.write_docs:
        write_docs(table())


def write_docs(text: str, path: str = os.path.join(ROOT, "docs", "aot.md")) -> None:
    """Replace the table between ``<!-- aot_table -->`` and ``<!-- /aot_table -->``."""
    with open(path) as f:
        doc = f.read()
    start, end = "<!-- aot_table -->\n", "<!-- /aot_table -->"
    i, j = doc.index(start) + len(start), doc.index(end)
    with open(path, "w") as f:
        f.write(doc[:i] + text + "\n" + doc[j:])


if __name__ == "__main__":
    main()
