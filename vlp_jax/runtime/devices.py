"""Process-wide runtime settings applied once at start-up by ``main`` (and the tests).

Kept in one place so library code never mutates global JAX/logging state behind a caller.
"""

from __future__ import annotations

import logging
import math
import os

import jax

from vlp_jax import _tpu_host


class _DropLibraryInfo(logging.Filter):
    """Orbax logs every save phase at INFO; keep its warnings, drop its chatter."""

    NOISY = ("orbax", "tensorflow_datasets", "tensorboardX")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
    """Install the filter on absl's handler (used by ``main``; tests keep full logs)."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def enable_compilation_cache(cache_dir: str = "") -> str:
    """Persist compiled XLA programs so a rerun (resume, eval, tests) skips recompiling.

    On this 2-core CPU a train-step compile costs 10-20 s; the cache makes the second start of
    the same config nearly free.  Returns the directory used.
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache_dir


def cpu_devices_for(config, cores: int | None = None) -> int:
    """How many CPU devices ``train.cpu_devices`` asks for on this host (1 = one device).

    0 (auto) = one device per core, reduced to the largest count that divides every sharded
    size: the (micro-)batch, the eval batch and the memory bank: each core then runs its share
    of the batch as its own program.  It was the default while the model's weight gradients
    went through XLA:CPU's transposed-copy path (base config on 2 cores, batch 256: 1.19-1.23 s
    vs 1.40-1.69 s on one device).  Since ``models/dense.py`` flattens Dense inputs, one device
    is faster at every measured batch (batch 64: 297-351 vs 377-382 ms; 256: 1.24-1.27 vs
    1.50-1.70 s; docs/performance.md), so the default is 1 and 0 stays an
    option for other models and hosts.  The loss is the same either way: with
    ``negatives.cross_device`` every query still sees every item of the global batch.
    """
    requested = int(config.train.cpu_devices)
    if requested < 0:
        raise ValueError(f"train.cpu_devices must be >= 0 (0 = one per core), got {requested}")
    if requested:
        return requested
    explicit_mesh = [int(n) for n in config.train.mesh_shape]
    if explicit_mesh and all(n > 0 for n in explicit_mesh):
        return math.prod(explicit_mesh)  # the user sized the mesh: give it exactly its devices
    if not cores:
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    sizes = [config.train.batch_size // max(1, config.train.accum_steps), config.eval.batch_size]
    if config.negatives.bank_size > 0:
        sizes.append(config.negatives.bank_size)
    return max(d for d in range(1, cores + 1) if all(s % d == 0 for s in sizes))


def set_cpu_devices(config) -> int:
    """Give the CPU backend ``cpu_devices_for(config)`` devices; call before JAX starts.

    Does nothing (returns 0) when ``XLA_FLAGS`` already fixes the device count (tests, the
    ablation harness, multi-process launchers) -- the user's setting wins.  On GPU/TPU hosts
    the setting only shapes the unused CPU backend.  Returns the count set.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    count = cpu_devices_for(config)
    jax.config.update("jax_num_cpu_devices", count)
    return count


def skip_absent_tpu() -> bool:
    """Keep a run on the CPU without probing for TPU chips this host does not have.

    ``import vlp_jax`` already sets ``JAX_PLATFORMS=cpu`` on such a host (``vlp_jax._tpu_host``);
    this covers a caller that removed it after the import.  Returns True when it set
    ``jax_platforms="cpu"``; does nothing when ``JAX_PLATFORMS`` is set, libtpu is absent, the
    host has a Google PCI device (a TPU VM) or another accelerator plugin is installed.  Call it
    before JAX starts its backends.
    """
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    if not _tpu_host.libtpu_without_chips():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
