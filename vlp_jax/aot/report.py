"""Assemble the AOT report of one config on one topology, and print it.

The figures come from ``analysis`` (per compiled program) and from the abstract train state
(what each device holds of params, optimizer state, memory bank and EMA copies); this module
only runs the steps in order and formats them.  All of it is compile-time estimation: the
printout says so.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from vlp_jax.aot import analysis, estimate, topology
from vlp_jax.aot import programs as progs
from vlp_jax.config import check as config_check
from vlp_jax.convert import pretrained
from vlp_jax.models import param_count

GIB = 1024**3
PROGRAMS = ("train", "eval", "serve")


def build_report(config: ml_collections.ConfigDict, topology_name: str, *,
                 programs: tuple[str, ...] = PROGRAMS, vocab_size: int = 0,
                 serve_batch: int = 128, hlo_dir: str = "") -> dict[str, Any]:
    """Compile ``programs`` of ``config`` for ``topology_name``; raise ValueError (naming the
    config field) before any compile when the config is invalid or does not divide it."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown or not programs:
        raise ValueError(f"--programs must be a non-empty subset of {PROGRAMS}, got {programs}")
    config = pretrained.configure_text_init(config.copy_and_resolve_references())
    config_check.validate_config(config)
    topo = topology.get_topology(topology_name)
    mesh = topology.make_mesh(config, topo)
    topology.check_divisible(config, mesh, topo)
    vocab = int(vocab_size or config.data.vocab_size)
    if serve_batch < 1:
        raise ValueError(f"--serve_batch must be >= 1, got {serve_batch}")
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)

    def hlo_path(name):
        return os.path.join(hlo_dir, f"{name}.hlo.txt") if hlo_dir else ""

    results = []
    if "train" in programs:
        lowered, state = programs_lower_train(config, mesh, vocab)
        results.append(analysis.compile_program(lowered, topo.chip, hlo_path("train_step")))
    else:
        state = progs.abstract_state(config, mesh, vocab)[2]
    if "eval" in programs:
        for lowered in progs.lower_eval_encoders(config, mesh, vocab, state.params):
            results.append(analysis.compile_program(lowered, topo.chip, hlo_path(lowered.name)))
    if "serve" in programs:
        for lowered in progs.lower_serving_towers(config, topo.devices[0], vocab,
                                                     state.params, serve_batch):
            results.append(analysis.compile_program(lowered, topo.chip, hlo_path(lowered.name)))
    for p in results:
        if "error" not in p:
            n = int(mesh.devices.size) if p["devices"] > 1 else 1
            p["estimate"] = estimate.estimate(p, dataclasses.asdict(topo.chip), n,
                                              model_flops(config, vocab, p) / n)
    t, neg, m = config.train, config.negatives, config.model
    return {
        "topology": topo.name, "devices": topo.num_devices, "hosts": topo.num_hosts,
        "data_devices": int(mesh.devices.size),
        "chip": dataclasses.asdict(topo.chip),
        "config": {"batch_size": int(t.batch_size), "accum_steps": int(t.accum_steps),
                   "bank_size": int(neg.bank_size), "bank_dtype": neg.bank_dtype,
                   "dtype": m.dtype, "remat": m.remat, "width": int(m.width),
                   "depth": int(m.depth), "query_depth": int(m.query_depth),
                   "image_size": int(config.data.image_size),
                   "patch_size": int(m.patch_size), "vocab_size": vocab,
                   "momentum": float(neg.momentum), "cross_device": bool(neg.cross_device),
                   "ring": bool(neg.ring)},
        "param_count": param_count(state.params),
        "state_bytes_per_device": progs.state_bytes_per_device(state),
        "programs": results,
        "jax_version": jax.__version__,
    }


def model_flops(config: ml_collections.ConfigDict, vocab: int, p: dict[str, Any]) -> float:
    """Model FLOPs of one call of program ``p`` (all devices; ``aot.estimate``)."""
    if p["program"] == "train_step":
        return estimate.train_model_flops(config, vocab)["total"]
    kind = "query" if p["program"].endswith(("queries", "query")) else "item"
    return estimate.encoder_model_flops(config, vocab, kind, p["rows"])


def programs_lower_train(config, mesh, vocab):
    """(the train step lowered, the abstract state) — split out so tests can stub it."""
    return progs.lower_train_step(config, mesh, vocab)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """Plain-text report: one block per program."""
    chip = r["chip"]
    c = r["config"]
    lines = [
        f"AOT compile-time estimates (not measurements) for {r['topology']}: {r['devices']} "
        f"{chip['device_kind']} devices on {r['hosts']} hosts; data axis {r['data_devices']}",
        f"chip: {_gib(chip['hbm_bytes'])} HBM, {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s "
        f"bf16 peak ({chip['source']})",
        f"config: batch {c['batch_size']} (accum {c['accum_steps']}), bank {c['bank_size']} "
        f"({c['bank_dtype']}), {c['dtype']} compute, remat {c['remat']}, "
        f"{r['param_count']:,} params",
        "state per device: " + ", ".join(f"{k} {_gib(v)}"
                                          for k, v in r["state_bytes_per_device"].items()),
    ]
    for p in r["programs"]:
        lines.append("")
        head = f"[{p['program']}] {p['rows']} rows per call on {p['devices']} device(s), " \
               f"compiled in {p['compile_seconds']:.0f} s"
        lines.append(head)
        if "error" in p:
            need = p.get("required_bytes")
            lines.append(f"  DOES NOT FIT: {p['error']}" + (
                f" (needs {_gib(need)} of {_gib(p['available_bytes'])})" if need else ""))
            continue
        lines.append(
            f"  memory per device: arguments {_gib(p['argument_bytes'])}, temp "
            f"{_gib(p['temp_bytes'])}, outputs not donated "
            f"{_gib(p['output_bytes'] - p['alias_bytes'])}, code {_gib(p['code_bytes'])}; "
            f"total {_gib(p['total_bytes'])} of {_gib(p['hbm_bytes'])} -> "
            f"{'fits' if p['fits'] else 'DOES NOT FIT'}")
        lines.append("  " + format_estimate(p))
        for kind, v in p["collectives"].items():
            if v["count"]:
                lines.append(f"  {kind}: {v['count']} per call, {v['bytes'] / 2**20:.2f} MiB "
                             "per device")
        for item in p["collective_list"]:  # labels re-derived: saved reports print current ones
            why = analysis.origin(item["op_name"], item["shape"], item["kind"])
            lines.append(f"    {item['kind']} {item['shape'][:100]} x{item['executions']}: {why}")
    return "\n".join(lines)


def format_estimate(p: dict[str, Any]) -> str:
    """One line: the step-time range with its bounding terms, MFU / HFU, the cost model apart."""
    e = p["estimate"]
    lo, hi = e["step_seconds_range"]
    tl, th = e["terms_lower_s"], e["terms_upper_s"]
    text = (f"time per call {lo * 1e3:.2f}-{hi * 1e3:.2f} ms ({e['bound_lower']}-bound at the "
            f"low end, {e['bound_upper']}-bound at the high end; compute {tl['compute'] * 1e3:.2f}"
            f" ms from {e['model_flops_per_device'] / 1e9:.1f} {e['flops_source']} GFLOP, "
            f"memory {tl['memory'] * 1e3:.2f}-{th['memory'] * 1e3:.2f} ms, ICI "
            f"{tl['ici'] * 1e3:.2f} ms)")
    if "mfu_range" in e:
        rps, mfu, hfu = e["rows_per_second_range"], e["mfu_range"], e["hfu_range"]
        text += (f"; {rps[0]:,.0f}-{rps[1]:,.0f} rows/s; MFU {mfu[0]:.0%}-{mfu[1]:.0%}, "
                 f"hardware {hfu[0]:.0%}-{hfu[1]:.0%}")
    cm = e["cost_model_seconds"]
    return text + (f"; XLA cost model {cm * 1e3:.2f} ms" if cm > 0
                   else f"; XLA cost model unusable ({cm:.3g} s)")


def advice(r: dict[str, Any]) -> str:
    """What to change when a program does not fit, by config field."""
    bad = [p["program"] for p in r["programs"] if not p.get("fits", False)]
    return (
        f"error: {', '.join(bad)} does not fit the {r['chip']['generation']} chip's "
        f"{_gib(r['chip']['hbm_bytes'])} on {r['topology']}. Per-device memory falls with "
        "train.accum_steps (GradCache: same negatives, k micro-batches), model.remat='block', "
        "a smaller train.batch_size (or more chips: a larger --topology), negatives.bank_size "
        "or negatives.bank_dtype='bfloat16'; eval.batch_size for eval_*, --serve_batch for "
        "serve_*.")
