"""Device mesh, shardings and multi-process start-up.

Data parallelism over one mesh axis, ``data``.  Parameters and optimizer state are replicated
(the towers are small; the memory bank, the only large state, is sharded on ``data`` by its own
module); batches are sharded on their leading dimension.  Keeping every sharding decision here
means the train step itself never names devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    **timeouts: int,
) -> None:
    """Call ``jax.distributed.initialize`` once, if the environment asks for several processes.

    Explicit arguments win (used by ``launch/local_multiprocess.sh``); otherwise JAX's own
    auto-detection handles TPU pods and SLURM.  A single-process run does nothing, so tests and
    laptops never wait for a coordinator.  ``timeouts`` (``heartbeat_timeout_seconds``,
    ``shutdown_timeout_seconds``) go to ``jax.distributed.initialize``; ``main`` sets them from
    ``--peer_timeout`` (``runtime.peers.jax_timeouts``).
    """
    if jax.distributed.is_initialized():
        return
    explicit = bool(coordinator_address) or num_processes > 1
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_multi = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    env_multi = slurm_multi or tpu_multi or "JAX_COORDINATOR_ADDRESS" in os.environ
    if explicit:
        if not coordinator_address or num_processes < 2 or process_id < 0:
            raise ValueError(
                "multi-process run needs all of --coordinator_address, --num_processes (>=2) "
                f"and --process_id (got {coordinator_address!r}, {num_processes}, {process_id})"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    elif env_multi:
        jax.distributed.initialize(**timeouts)
    else:
        return
    logging.info(
        "jax.distributed: process %d/%d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh(
    mesh_shape: Sequence[int] = (-1,), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build the 1-D ``data`` mesh; ``-1`` means all devices.

    The mesh is built from an explicit device array (not ``jax.make_mesh``) so the axis type is
    the classic auto-sharded one on every JAX version.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(mesh_shape) != 1:
        raise ValueError(f"train.mesh_shape must have one entry (the data axis), got {mesh_shape}")
    size = mesh_shape[0]
    if size == -1:
        size = len(devices)
    if size <= 0 or size > len(devices):
        raise ValueError(f"train.mesh_shape={tuple(mesh_shape)} but {len(devices)} devices exist")
    return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over ``data``; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_host_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's slice of the global batch into global arrays sharded on ``data``.

    Works for one process (the slice is the whole batch) and many (each process contributes the
    rows for its addressable devices), so the data pipeline never needs to know the topology.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {n} devices of the data axis"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes"
        )
