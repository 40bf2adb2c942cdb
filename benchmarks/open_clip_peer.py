"""The real ``open_clip_torch`` train step beside the project's, at the matched CLIP size.

Why: ``benchmarks/torch_clip_reference.py`` is the project's own rewrite of open_clip's model, so
a claim "faster than open_clip" measured against it rests on that rewrite being faithful and
tuned like the original.  This benchmark times the package itself (open_clip_torch 3.3.0):
``open_clip.model.CLIP`` built from a custom model config (the dict below, in the format of
open_clip's ``model_configs/*.json``) at the size of ``benchmarks/clip_reference.py`` — ViT 64 px
/ 16, width 192, 4 layers, head width 64 (3 heads); causal text transformer, width 192, 3 heads,
4 layers, 32 tokens, vocab 30,522; 192-d embeddings; 9,651,073 parameters on both sides — with
``open_clip.loss.ClipLoss`` and AdamW (lr 1e-4, weight decay 0.1 on every parameter, as optax's
``adamw`` in the JAX step), eager mode, random images and random token ids (EOT = largest id).

Arms (every measurement in a fresh process):

* ``open_clip``: ``torch.optim.AdamW()`` with its defaults (on CPU that is the per-tensor loop:
  torch only defaults to ``foreach`` kernels on CUDA/XPU);
* ``open_clip_fused``: ``AdamW(fused=True)``;
* ``open_clip_fused_tcmalloc``: the same under tcmalloc (``LD_PRELOAD``, with the release
  settings ``vlp_jax/runtime/allocator.py`` gives the project);
* ``vlp_jax``: the project's ``clip_vlp_jax`` step, run by ``train_throughput.bench_reference``
  (``clip_reference.py`` in the project's formulation) under the project's normal setup: one CPU
  device and tcmalloc, as ``make train`` runs (``allocator.reexec_with_fast_allocator``).

torch uses one intra-op thread per core (``torch.set_num_threads(os.cpu_count())``); XLA:CPU's
own default is the same.  Every arm runs 2 warm-up steps (as ``train_throughput.py``) then
``--steps`` timed steps; its number is the median.  Rounds run the arms in alternating order
(round r is round r-1 reversed) so drift of this shared VM hits every arm alike; the table gives
the median over rounds and ``speedup`` = arm ms / vlp_jax ms (> 1: the project is faster).

    bash benchmarks/peer_env.sh                  # once: .peer_venv/ with torch + open_clip
    .venv/bin/python benchmarks/open_clip_peer.py --rounds=3 --batch_sizes=64,256
    .venv/bin/python benchmarks/open_clip_peer.py --smoke   # batch 8, 2 steps, 1 round

The driver needs only the standard library; torch arms run with ``--peer_python`` (default
``$PEER_VENV`` or ``.peer_venv``), the project arm with ``--project_python`` (default ``.venv``).
Writes ``benchmarks/results/open_clip_peer.json`` (settings, versions, host, load average at
start and end, every per-round number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from vlp_jax.runtime import allocator  # noqa: E402  (stdlib only: importable from any venv)

# open_clip's custom model config for the matched size (same layout as its model_configs JSON).
MODEL_CFG = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 192, "layers": 4,
                   "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 30522, "width": 192, "heads": 3,
                 "layers": 4},
}
PROJECT = "vlp_jax"
TORCH_ARMS = ("open_clip", "open_clip_fused", "open_clip_fused_tcmalloc")
ARMS = (*TORCH_ARMS, PROJECT)
WARMUP = 2  # as train_throughput._time_steps
RESULT_TAG = "OPEN_CLIP_PEER_RESULT "


# ----------------------------------------------------------------------------- child: torch
def torch_child(arm: str, batch: int, steps: int) -> dict:
    import numpy as np
    import open_clip
    import torch
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = CLIP(**MODEL_CFG)  # quick_gelu=False: exact nn.GELU, as clip_reference.py
    model.train()
    loss_fn = ClipLoss()
    fused = arm != "open_clip"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            fused=True if fused else None)
    vision, text = MODEL_CFG["vision_cfg"], MODEL_CFG["text_cfg"]
    size, length, vocab = vision["image_size"], text["context_length"], text["vocab_size"]
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, vocab - 1, (batch, length))
    tokens[:, -1] = vocab - 1  # EOT has the largest id: open_clip's argmax pooling finds it

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        return float(loss)

    losses = [step() for _ in range(WARMUP)]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "times_ms": [t * 1e3 for t in times], "losses": losses,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "optimizer": "AdamW(fused=True)" if fused else "AdamW() (CPU default: per-tensor loop)",
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }


# --------------------------------------------------------------------------- child: project
def project_child(batch: int, steps: int) -> dict:
    allocator.reexec_with_fast_allocator()  # as `make train`: re-runs this child under tcmalloc
    sys.path.insert(0, HERE)
    import jax
    import jaxlib
    import optax
    import train_throughput  # the project's benchmark: bench_reference runs the step

    row = train_throughput.bench_reference(batch, steps, formulation="vlp_jax")
    assert len(row["ms_per_step_all"]) == steps
    return {
        "params": row["params"], "times_ms": row["ms_per_step_all"],
        "step_gflops": row["step_gflops"], "model": row["model"],
        "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "optax": optax.__version__, "python": platform.python_version()},
    }


def child_main(args: argparse.Namespace) -> None:
    if args.arm == PROJECT:
        out = project_child(args.batch, args.steps)
    else:
        out = torch_child(args.arm, args.batch, args.steps)
    out.update(arm=args.arm, batch=args.batch, warmup=WARMUP,
               allocator=allocator.active_allocator() if args.arm == PROJECT
               else os.environ.get("LD_PRELOAD") or "system",
               ms_median=statistics.median(out["times_ms"]))
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------- driver
def _default_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def arm_environment(arm: str) -> dict[str, str]:
    """The child's environment: glibc malloc for torch arms unless the arm names tcmalloc."""
    env = dict(os.environ)
    for key in ("LD_PRELOAD", "VLP_ALLOCATOR_PRELOADED"):
        env.pop(key, None)  # a driver run under a preload must not leak it into other arms
    if arm.endswith("_tcmalloc"):
        found = allocator.find_allocator("auto")
        if found is None or "tcmalloc" not in found[0]:
            raise SystemExit(f"{arm}: libtcmalloc_minimal.so.4 not found "
                             "(apt-get install libtcmalloc-minimal4)")
        env = allocator.preload_environment(env, *found)
    return env


def run_child(python: str, arm: str, batch: int, steps: int) -> dict:
    cmd = [python, os.path.abspath(__file__), f"--arm={arm}", f"--batch={batch}",
           f"--steps={steps}"]
    proc = subprocess.run(cmd, env=arm_environment(arm), cwd=ROOT, capture_output=True,
                          text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"arm {arm} at batch {batch} failed (exit {proc.returncode}): "
                         f"{' '.join(cmd)}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def host_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")
    except OSError:
        pass
    return {"node": platform.node(), "platform": platform.platform(), "cpu": model,
            "cpu_count": os.cpu_count()}


def summarize(measurements: list[dict], batches: list[int], arms: list[str]) -> list[dict]:
    rows = []
    for b in batches:
        per_arm = {a: [m["ms_median"] for m in measurements if m["batch"] == b and m["arm"] == a]
                   for a in arms}
        project = statistics.median(per_arm[PROJECT]) if per_arm.get(PROJECT) else None
        for a in arms:
            ms = statistics.median(per_arm[a])
            rows.append({"batch": b, "arm": a, "ms_median": ms, "ms_per_round": per_arm[a],
                         "examples_per_sec": b / ms * 1e3,
                         "speedup_of_project": ms / project if project else None})
    return rows


def print_table(rows: list[dict], rounds: int) -> None:
    print(f"\n{'batch':>5} {'arm':>26} {'ms/step':>9} {'ex/s':>8} {'vlp_jax x':>9}  "
          f"per-round medians (ms, {rounds} round(s))")
    for r in rows:
        speed = f"{r['speedup_of_project']:.2f}" if r["speedup_of_project"] else "n/a"
        per_round = ", ".join(f"{x:.1f}" for x in r["ms_per_round"])
        print(f"{r['batch']:>5} {r['arm']:>26} {r['ms_median']:>9.1f} "
              f"{r['examples_per_sec']:>8.1f} {speed:>9}  {per_round}")
    print("vlp_jax x = arm ms / vlp_jax ms (> 1: the project's step is faster)")


def driver_main(args: argparse.Namespace) -> None:
    if args.smoke:
        args.batch_sizes, args.steps, args.rounds = "8", 2, 1
    batches = [int(b) for b in args.batch_sizes.split(",")]
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose from {ARMS}")
    pythons = {a: args.project_python if a == PROJECT else args.peer_python for a in arms}
    for a, py in pythons.items():
        if not os.path.isfile(py):
            hint = "bash benchmarks/peer_env.sh" if a != PROJECT else "make venv"
            raise SystemExit(f"{a}: no interpreter at {py} (create it with `{hint}`)")
    out = args.out or (os.path.join("/tmp", "open_clip_peer_smoke.json") if args.smoke else
                       os.path.join(HERE, "results", "open_clip_peer.json"))
    load_start, started = os.getloadavg(), time.time()
    print(f"{os.cpu_count()} cores, load average {load_start[0]:.2f}; arms {arms}; batches "
          f"{batches}; {args.rounds} round(s) x {WARMUP} warm-up + {args.steps} timed steps")
    busy = load_start[0] > 0.5 * (os.cpu_count() or 1)
    if busy:  # torch's OpenMP workers spin at barriers: oversubscribed, they slow down far more
        print(f"WARNING: load average {load_start[0]:.1f} on {os.cpu_count()} cores: another job "
              "is running; step times (torch's above all) are not comparable")
    measurements = []
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        for b in batches:
            for a in order:
                m = run_child(pythons[a], a, b, args.steps)
                m["round"] = r
                measurements.append(m)
                print(f"round {r} batch {b:>4} {a:>26}: {m['ms_median']:8.1f} ms/step "
                      f"({m['params']:,} params, allocator {m['allocator']})", flush=True)
    load_end = os.getloadavg()
    counts = {m["params"] for m in measurements}
    if len(counts) != 1:
        print(f"WARNING: parameter counts differ between arms: {sorted(counts)}")
    rows = summarize(measurements, batches, arms)
    print_table(rows, args.rounds)
    versions = {("project" if m["arm"] == PROJECT else "peer"): m["versions"]
                for m in measurements}
    settings = {
        "arms": arms, "batch_sizes": batches, "rounds": args.rounds, "steps": args.steps,
        "warmup": WARMUP, "smoke": args.smoke, "model_cfg": MODEL_CFG,
        "order": "round r runs the arms in reverse order of round r-1",
        "torch_threads": "torch.set_num_threads(os.cpu_count())",
        "pythons": pythons,
    }
    result = {
        "settings": settings, "versions": versions, "host": host_info(),
        "params": {m["arm"]: m["params"] for m in measurements},
        "load_average_start": load_start, "load_average_end": load_end, "busy_at_start": busy,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started, "rows": rows, "measurements": measurements,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}; wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arm", choices=ARMS, help="(child) time one arm in this process")
    parser.add_argument("--batch", type=int, default=64, help="(child) batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--batch_sizes", default="64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--smoke", action="store_true", help="batch 8, 2 steps, 1 round")
    parser.add_argument("--peer_python", default=_default_python(
        os.environ.get("PEER_VENV", os.path.join(ROOT, ".peer_venv"))))
    parser.add_argument("--project_python", default=_default_python(os.path.join(ROOT, ".venv")))
    parser.add_argument("--out", default="", help="JSON path (default results/open_clip_peer"
                        ".json; --smoke: /tmp/open_clip_peer_smoke.json)")
    args = parser.parse_args()
    if args.arm:
        child_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
