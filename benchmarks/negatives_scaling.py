"""Cost of cross-device negatives: all-gather vs ring, with and without a memory bank.

For a fixed global batch B (default 256, d=128) and N devices in {1, 2, 4, 8} (so b = B/N per
device), times one jitted loss + gradient of ``losses.qic.qic_loss`` w.r.t. the query and
item embeddings, and reports the per-device logits memory:

* analytic: the largest logits block a device holds — gather ``b × N·b`` (in-batch) and
  ``N·b × K/N`` (bank); ring ``b × b`` and ``b × K/N`` (bank scored in N query chunks);
* measured: XLA's per-device temporary buffer size for the whole loss+grad program.

Without real accelerators it runs on fake CPU devices (``--xla_force_host_platform_device_count``)
that share the host's cores, so the times compare the two schemes' overheads on one machine; they
are not a prediction of accelerator step time.

    python benchmarks/negatives_scaling.py --batch=256 --dim=128

Prints a table and writes ``benchmarks/results/negatives_scaling.json``.

``--train_step`` instead measures the whole train step of ``configs/mbns.py`` (global batch
``--step_batch``, all devices) for each bank size in ``--step_banks``, the steps of all variants
alternating in one process (the VM drifts ±5–15 % between runs): median step time, overhead
over the same recipe without a bank (CDNS with momentum keys) and over ``configs/base.py``
(CDNS with online keys, no EMA tower), and per-device state and XLA temp bytes, which must grow
by ≈ K·(d·4 + 16)/N bytes (the bank shard) and not by K·d (no gather of the bank).
Writes ``benchmarks/results/negatives_scaling_step.json``.

    python benchmarks/negatives_scaling.py --train_step --step_banks=0,16384,65536
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlp_jax.losses.qic import qic_loss as sharded_qic_loss  # noqa: E402
from vlp_jax.parallel import memory_bank  # noqa: E402
from vlp_jax.parallel.mesh import DATA_AXIS, make_mesh  # noqa: E402

flags.DEFINE_integer("batch", 256, "Global batch B.")
flags.DEFINE_integer("dim", 128, "Embedding size d.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts N to try.")
flags.DEFINE_list("bank_sizes", ["0", "4096", "16384"], "Memory bank sizes K (0 = no bank).")
flags.DEFINE_string("kind", "softmax", "softmax | am_softmax | sigmoid.")
flags.DEFINE_bool("symmetric", False, "Add the item->query term.")
flags.DEFINE_integer("repeats", 5, "Timed calls per configuration (median reported).")
flags.DEFINE_string("out", "benchmarks/results/negatives_scaling.json", "JSON output path.")
flags.DEFINE_bool("train_step", False, "Time whole train steps of configs/mbns.py instead.")
flags.DEFINE_list("step_banks", ["0", "16384", "65536"], "Bank sizes K for --train_step.")
flags.DEFINE_integer("step_batch", 128, "Global batch for --train_step.")
flags.DEFINE_integer("step_repeats", 8, "Alternating timed steps per variant (--train_step).")
flags.DEFINE_string("step_out", "benchmarks/results/negatives_scaling_step.json",
                    "JSON output path of --train_step.")
FLAGS = flags.FLAGS


def analytic_logits(batch: int, n: int, bank: int, ring: bool, symmetric: bool) -> dict:
    """Largest logits block per device, in float32 elements."""
    b = batch // n
    in_batch = b * b if ring else b * n * b
    bank_block = (b if ring else batch) * (bank // n) if bank else 0
    return {
        "in_batch_block": [b, b] if ring else [b, n * b],
        "in_batch_elems": in_batch * (2 if symmetric and not ring else 1),
        "bank_block": ([b if ring else batch, bank // n] if bank else None),
        "bank_elems": bank_block,
        "peak_logits_bytes": 4 * max(in_batch, bank_block),
    }


def run_one(n: int, bank_size: int, ring: bool) -> dict:
    rng = np.random.default_rng(0)  # same data for every configuration
    mesh = make_mesh((n,))
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    bsz, d = FLAGS.batch, FLAGS.dim

    def unit(shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q, it = unit((bsz, d)), unit((bsz, d))
    qid = rng.integers(0, 10 * bsz, bsz).astype(np.int32)
    iid = rng.integers(0, 10 * bsz, bsz).astype(np.int32)
    args = [jax.device_put(x, sharding) for x in (q, it, qid, iid)]
    bank = None
    if bank_size:
        bank = memory_bank.init_bank(bank_size, d, n)
        bank = dict(bank, embeddings=jnp.asarray(unit((bank_size, d))), valid=bank["valid"] | True)
        bank = jax.device_put(bank, sharding)

    def loss(q, it, qid, iid, bank):
        return sharded_qic_loss(
            mesh, q, it, qid, iid, 20.0, kind=FLAGS.kind, margin=0.2,
            symmetric=FLAGS.symmetric, ring=ring, bank=bank,
        )[0]  # fmt: skip

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = fn.lower(*args, bank).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
    jax.block_until_ready(compiled(*args, bank))
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        value, _ = jax.block_until_ready(compiled(*args, bank))
        times.append(time.perf_counter() - t0)
    return {
        "devices": n,
        "per_device_batch": bsz // n,
        "mode": "ring" if ring else "gather",
        "bank_size": bank_size,
        "loss": float(value),
        "loss_grad_ms": 1e3 * float(np.median(times)),
        "compile_s": compile_s,
        "xla_temp_bytes_per_device": temp_bytes,
        **analytic_logits(bsz, n, bank_size, ring, FLAGS.symmetric),
    }


def _state_bytes_per_device(state) -> int:
    """Bytes of the state that device 0 holds (replicated leaves count in full)."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(state))


def train_step_overhead() -> dict:
    """Whole train steps of configs/mbns.py per bank size (and of configs/base.py), alternating."""
    from configs import base, mbns
    from vlp_jax.config.overrides import apply_overrides
    from vlp_jax.perf import step_harness

    variants = {"base (CDNS, online keys)": base.get_config()}
    for k in [int(x) for x in FLAGS.step_banks]:
        variants[f"mbns K={k}"] = apply_overrides(mbns.get_config(), {"negatives.bank_size": k})
    built = {}
    for name, cfg in variants.items():
        harness = step_harness.build(cfg, FLAGS.step_batch, 4000)
        compiled = harness.lower().compile()
        mem = compiled.memory_analysis()
        built[name] = {"harness": harness, "compiled": compiled, "times": [],
                       "state_bytes": _state_bytes_per_device(harness.state),
                       "temp_bytes": int(mem.temp_size_in_bytes)}
        for _ in range(2):  # warm-up
            harness.state, m = compiled(harness.state, harness.batch)
            jax.block_until_ready(m)
    for _ in range(FLAGS.step_repeats):
        for v in built.values():
            h = v["harness"]
            t = time.perf_counter()
            h.state, m = v["compiled"](h.state, h.batch)
            jax.block_until_ready(m)
            v["times"].append(time.perf_counter() - t)
    n = jax.device_count()
    rows = []
    ref_base = float(np.median(built["base (CDNS, online keys)"]["times"]))
    no_bank = [v for k, v in built.items() if k == "mbns K=0"]
    ref_cdns = float(np.median(no_bank[0]["times"])) if no_bank else float("nan")
    print(f"{'variant':<26} {'step ms':>8} {'vs CDNS':>8} {'vs base':>8} "
          f"{'state MB/dev':>12} {'temp MB/dev':>11}")
    for name, v in built.items():
        ms = float(np.median(v["times"])) * 1e3
        row = {"variant": name, "step_ms_median": ms, "step_ms_all": [t * 1e3 for t in v["times"]],
               "overhead_vs_cdns": ms / (ref_cdns * 1e3) - 1.0,
               "overhead_vs_base": ms / (ref_base * 1e3) - 1.0,
               "state_bytes_per_device": v["state_bytes"], "temp_bytes_per_device": v["temp_bytes"]}
        rows.append(row)
        print(f"{name:<26} {ms:>8.1f} {row['overhead_vs_cdns']:>+8.1%} "
              f"{row['overhead_vs_base']:>+8.1%} {v['state_bytes'] / 2**20:>12.2f} "
              f"{v['temp_bytes'] / 2**20:>11.2f}", flush=True)
    return {"batch": FLAGS.step_batch, "devices": n, "repeats": FLAGS.step_repeats,
            "note": "median of alternating steps in one process; fake CPU devices share 2 cores",
            "rows": rows}


def main(argv):
    del argv
    if FLAGS.train_step:
        result = train_step_overhead()
        os.makedirs(os.path.dirname(FLAGS.step_out) or ".", exist_ok=True)
        with open(FLAGS.step_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {FLAGS.step_out}")
        return
    devices = [int(x) for x in FLAGS.devices]
    if max(devices) > jax.device_count():
        raise ValueError(f"asked for {max(devices)} devices, only {jax.device_count()} exist")
    rows = []
    header = (
        f"{'N':>2} {'b':>4} {'mode':>6} {'bank K':>7} {'loss+grad ms':>12} "
        f"{'in-batch blk':>12} {'bank blk':>11} {'peak logits':>11} {'XLA temp':>10}"
    )
    print(header)
    print("-" * len(header))
    for bank_size in [int(x) for x in FLAGS.bank_sizes]:
        for n in devices:
            for ring in (False, True):
                r = run_one(n, bank_size, ring)
                rows.append(r)
                bank_blk = "x".join(map(str, r["bank_block"])) if r["bank_block"] else "-"
                print(
                    f"{n:>2} {r['per_device_batch']:>4} {r['mode']:>6} {bank_size:>7} "
                    f"{r['loss_grad_ms']:>12.2f} {'x'.join(map(str, r['in_batch_block'])):>12} "
                    f"{bank_blk:>11} {r['peak_logits_bytes'] / 1024:>9.0f}KB "
                    f"{r['xla_temp_bytes_per_device'] / 2**20:>8.2f}MB",
                    flush=True,
                )
                if ring:  # both schemes compute the same loss
                    assert abs(rows[-1]["loss"] - rows[-2]["loss"]) < 1e-4 * abs(r["loss"]), rows
    result = {
        "batch": FLAGS.batch,
        "dim": FLAGS.dim,
        "kind": FLAGS.kind,
        "symmetric": FLAGS.symmetric,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "host_cpus": os.cpu_count(),
        "note": "fake CPU devices share the host cores; compare modes, not absolute step time",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
