"""Provenance stamps of ablation runs, and the checks that read them.

A verdict is only as good as the claim that the runs behind it are what the grid says they are,
and were started after the claim was declared.  Each run folder's ``ablate_run.json`` therefore
carries a *stamp* written by the harness when the run first starts:

* ``run_id`` (random, unique per run), ``run_dir`` (absolute path), ``variant``, ``seed``;
* ``config_hash``: SHA-256 of the fully resolved config (base file + every override);
* ``commit`` (+ ``dirty``) of the code that started it, ``machine`` (host, platform, cores);
* ``started_at`` (UTC, ISO + epoch seconds); each attempt adds its own start/end times;

and, when the run finishes, ``recall_sha256`` of its ``eval/recall.json``.

``check_run`` compares a stamp with the job the grid plans for that folder; a mismatch means the
folder was copied (run_dir), relabelled (config hash, variant, seed) or its results swapped
(recall hash).  ``duplicate_run_ids`` finds one run counted twice.  Such runs are refused unless
the claim declares them reused.  ``declaration_time`` finds when a claim was committed, so a run
that started earlier is marked exploratory automatically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import uuid
from collections.abc import Sequence
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def now() -> dict[str, Any]:
    """The current time as ``{"iso": "...Z", "epoch": float}`` (UTC)."""
    t = dt.datetime.now(dt.UTC)
    return {"iso": t.strftime("%Y-%m-%dT%H:%M:%SZ"), "epoch": round(t.timestamp(), 3)}


def _git(args: Sequence[str], repo: str = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit(repo: str = REPO) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool}`` of the working tree that runs the harness."""
    sha = _git(["rev-parse", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return {"commit": sha, "dirty": bool(status)}


def machine() -> dict[str, Any]:
    return {"host": socket.gethostname(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def config_hash(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of the resolved config's canonical JSON (sorted keys): equal configs, equal hash."""
    canon = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def new_stamp(run_dir: str, variant: str, seed: int, cfg_hash: str, **fields: Any
              ) -> dict[str, Any]:
    """The stamp of a run about to start for the first time; ``fields``: e.g. ``grid`` and
    ``claims`` (``{claim_id: protocol.claim_hash}`` of the claims declared at the start)."""
    return {"run_id": uuid.uuid4().hex, "run_dir": os.path.abspath(run_dir), **fields,
            "variant": variant, "seed": seed, "config_hash": cfg_hash, **git_commit(),
            "machine": machine(), "started_at": now()}


def check_run(stamp: dict[str, Any] | None, run_dir: str, variant: str, seed: int,
              cfg_hash: str, recall_path: str | None = None) -> list[str]:
    """Reasons this folder's run is not the planned (variant, seed, config) run; [] = intact.

    ``recall_path``: the results file whose hash the stamp recorded at the end of the run.
    """
    if not stamp:
        return ["no stamp (run started by an older harness, or ablate_run.json was replaced)"]
    problems = []
    if stamp.get("run_dir") != os.path.abspath(run_dir):
        problems.append(f"copied or moved: stamped in {stamp.get('run_dir')}")
    if stamp.get("variant") != variant or stamp.get("seed") != seed:
        problems.append(f"relabelled: stamped as {stamp.get('variant')}/seed{stamp.get('seed')}")
    if stamp.get("config_hash") != cfg_hash:
        problems.append("relabelled: its config hash differs from the grid's config for it")
    if recall_path is not None and stamp.get("recall_sha256") is not None:
        if file_sha256(recall_path) != stamp["recall_sha256"]:
            problems.append(f"{os.path.basename(recall_path)} changed after the run finished")
    return problems


def duplicate_run_ids(stamps: dict[str, dict[str, Any] | None]) -> dict[str, list[str]]:
    """``{label: [other labels with the same run_id]}``: one run present in several folders."""
    by_id: dict[str, list[str]] = {}
    for label, s in stamps.items():
        if s and s.get("run_id"):
            by_id.setdefault(s["run_id"], []).append(label)
    return {lab: [o for o in labels if o != lab]
            for labels in by_id.values() if len(labels) > 1 for lab in labels}


def declaration_time(needle: str, path: str) -> dict[str, Any] | None:
    """The first commit that added ``needle`` (a claim's id literal) to ``path`` (in the git
    repository holding it): ``{"commit", "epoch", "iso"}`` (committer time), or None while the
    declaration is not committed."""
    path = os.path.abspath(path)
    out = _git(["log", "--reverse", "--format=%H %ct", "-S", needle, "--", path],
               os.path.dirname(path))
    if not out:
        return None
    sha, epoch = out.splitlines()[0].split()
    return {"commit": sha, "epoch": float(epoch),
            "iso": dt.datetime.fromtimestamp(int(epoch), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def is_exploratory(stamp: dict[str, Any] | None, declared: dict[str, Any] | None) -> bool:
    """A run is exploratory unless it provably started after its claim was committed."""
    if declared is None or not stamp or "started_at" not in stamp:
        return True
    return float(stamp["started_at"]["epoch"]) < float(declared["epoch"])
